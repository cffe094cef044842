#!/usr/bin/env python3
"""DTensor training state over several ranks: FSDP2, tensor parallelism and FSDP2+TP in worlds of
2 and 4 processes, one rank killed with its snapshot in flight, every rank restored bit-exact; and
a 4-rank FSDP2 snapshot loaded into 2 ranks of FSDP2 and into 4 ranks of FSDP2+TP through
`tessera.dcp.SnapshotReader`, checked tensor by tensor against the same state gathered whole.
Needs PyTorch >= 2.4 (DTensor, fully_shard); prints SKIP and exits 0 otherwise.

    TESSERAD=BUNDLE/bin/tesserad TESSERA_LIBRARY=BUNDLE/lib/libtessera.so \\
        python3 tests/gpu/multi_rank_on_device.py [--device cuda|cpu] [--worlds 2,4] [--seed N]

--device cuda runs one GPU per rank (NCCL; a world larger than the GPUs there are is skipped,
saying so); --device cpu runs the same on CPU processes (gloo), which any machine with PyTorch
2.x can. One tesserad (store in /dev/shm, removed at exit) holds every rank's snapshots.

Per layout and world W (the model of dtensor_on_device.py: 4 MLP blocks of 256 -> 1024 -> 256):
1. train: W processes shard the model, train 3 AdamW steps and snapshot step 3 (a Snapshotter,
   rank r of W), wait until it is sealed and write their local shards (parameters and AdamW
   state) aside; rank 0 also writes the whole state, gathered (``get_state_dict`` with
   ``full_state_dict``), as the reference of step 3. Then 2 more steps, the reference and the
   local shards of step 5, and a snapshot of step 5: every rank but the last waits until it is
   sealed; the last SIGKILLs itself as soon as its snapshot has started, its copy in flight.
2. restore: W new processes (the model initialised from another seed, the optimizer empty)
   call ``restore_latest()``: every rank must restore the same step (3, or 5 if the killed rank's
   copy was sealed before it died), and its local shards bit-exact as written for that step.
3. resharded (FSDP2 in a world of 4): the snapshot restored in 2 is loaded through
   ``tessera.dcp.SnapshotReader`` into 2 processes of FSDP2, and into 4 processes of FSDP2+TP
   (2 x 2); each gathers its state whole, and rank 0 compares every parameter and every AdamW
   tensor bit for bit with the reference of that step.

Prints one PASS or FAIL line per case and ends with "N passed, N failed, N skipped".
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "agent" / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dcp_on_device import assert_bit_equal, cpu_copy, start_daemon, stop_daemon  # noqa: E402
from dtensor_on_device import build, local_state, shard, train  # noqa: E402

LAYOUTS = ("fsdp2", "tp", "fsdp2+tp")


def log(message: str) -> None:
    print(message, flush=True)


def init(rank: int, world: int, device: str, init_file: str, socket: str) -> torch.device:
    """This rank's process group and device."""
    os.environ["TESSERA_SOCKET"] = socket
    backend = "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    if device == "cuda":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def whole_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """The model's and the optimizer's state gathered whole (a collective of every rank), on
    the CPU, keyed by fully qualified names: rank 0's; the other ranks get empty dicts."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model_sd, optim_sd = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return cpu_copy({"model": model_sd, "optim": optim_sd.get("state", {})})


def train_worker(rank: int, layout: str, world: int, device_name: str, init_file: str,
                 socket: str, out: str, job: str, seed: int) -> None:
    import tessera.torch as tt
    device = init(rank, world, device_name, init_file, socket)
    model = shard(build(seed, device), layout, device.type, world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, optimizer, 3, seed, device)
    snap = tt.Snapshotter(model, optimizer, job_id=job, rank=rank, world_size=world)
    assert snap.snapshot(3), f"rank {rank}: the snapshot of step 3 was skipped"
    snap.wait()
    torch.save(local_state(model, optimizer), f"{out}/local.3.{rank}.pt")
    reference = whole_state(model, optimizer)
    if rank == 0:
        torch.save(reference, f"{out}/whole.3.pt")
    train(model, optimizer, 2, seed + 1, device)
    torch.save(local_state(model, optimizer), f"{out}/local.5.{rank}.pt")
    reference = whole_state(model, optimizer)
    if rank == 0:
        torch.save(reference, f"{out}/whole.5.pt")
    dist.barrier()  # the last collective: the killed rank takes no part in a teardown
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert snap.snapshot(5), f"rank {rank}: the snapshot of step 5 was skipped"
    if rank == world - 1:
        os.kill(os.getpid(), signal.SIGKILL)
    snap.wait()
    snap.close()
    Path(out, f"trained.{rank}").write_text("ok")
    os._exit(0)  # no process-group teardown with a rank gone


def restore_worker(rank: int, layout: str, world: int, device_name: str, init_file: str,
                   socket: str, out: str, job: str, seed: int) -> None:
    import tessera.torch as tt
    device = init(rank, world, device_name, init_file, socket)
    model = shard(build(seed + 99, device), layout, device.type, world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    snap = tt.Snapshotter(model, optimizer, job_id=job, rank=rank, world_size=world)
    step = snap.restore_latest()
    assert step in (3, 5), f"rank {rank} restored {step}, expected 3 or 5"
    compared = assert_bit_equal(torch.load(f"{out}/local.{step}.{rank}.pt"),
                                local_state(model, optimizer), f"rank {rank} step {step}")
    snap.close()
    Path(out, f"restored.{rank}").write_text(f"{step} {compared}")
    dist.barrier()
    dist.destroy_process_group()


def reshard_worker(rank: int, layout: str, world: int, device_name: str, init_file: str,
                   socket: str, out: str, job: str, seed: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import tessera.dcp
    device = init(rank, world, device_name, init_file, socket)
    step = int(Path(out, "restored.0").read_text().split()[0])
    model = shard(build(seed + 77, device), layout, device.type, world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, storage_reader=tessera.dcp.SnapshotReader(job, step))
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    got = whole_state(model, optimizer)
    if rank == 0:
        want = torch.load(f"{out}/whole.{step}.pt")
        compared = assert_bit_equal(want, got, f"{layout} x{world} step {step}")
        Path(out, f"resharded.{layout}.{world}").write_text(f"{step} {compared}")
    dist.barrier()
    dist.destroy_process_group()


def run(worker: Any, layout: str, world: int, device: str, out: Path, job: str, seed: int,
        phase: str, killed: Optional[int] = None, timeout_s: float = 600) -> None:
    """`world` processes of `worker`; each must exit 0, but rank `killed`, which must die of
    SIGKILL."""
    context = multiprocessing.get_context("spawn")
    init_file = out / f"pg-{phase}-{layout}-{world}"
    processes = [context.Process(target=worker,
                                 args=(r, layout, world, device, str(init_file),
                                       os.environ["TESSERA_SOCKET"], str(out), job, seed))
                 for r in range(world)]
    for p in processes:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in processes:
        p.join(max(1.0, deadline - time.monotonic()))
    stuck = [r for r, p in enumerate(processes) if p.is_alive()]
    for r in stuck:
        processes[r].kill()
    assert not stuck, f"{phase}: ranks {stuck} did not finish in {timeout_s:.0f} s"
    for r, p in enumerate(processes):
        want = -signal.SIGKILL if r == killed else 0
        assert p.exitcode == want, f"{phase}: rank {r} exited with {p.exitcode}, not {want}"


def case_kill_and_restore(layout: str, world: int, device: str, out: Path, seed: int) -> str:
    job = f"mr-{layout.replace('+', '-')}-{world}-{seed}"
    start = time.perf_counter()
    run(train_worker, layout, world, device, out, job, seed, "train", killed=world - 1)
    trained = time.perf_counter() - start
    run(restore_worker, layout, world, device, out, job, seed, "restore")
    restored = [Path(out, f"restored.{r}").read_text().split() for r in range(world)]
    steps = {int(s) for s, _ in restored}
    assert len(steps) == 1, f"the ranks restored different steps: {restored}"
    step = steps.pop()
    compared = sum(int(c) for _, c in restored)
    return (f"rank {world - 1} SIGKILLed with its snapshot of step 5 in flight; all {world} "
            f"ranks restored step {step}, {compared} bytes bit-exact (train {trained:.1f} s, "
            f"restore {time.perf_counter() - start - trained:.1f} s)")


def case_reshard(source: Path, into: Sequence[Tuple[str, int]], device: str, seed: int) -> str:
    job = f"mr-fsdp2-4-{seed}"
    notes = []
    for layout, world in into:
        start = time.perf_counter()
        run(reshard_worker, layout, world, device, source, job, seed, "reshard")
        step, compared = Path(source, f"resharded.{layout}.{world}").read_text().split()
        notes.append(f"{layout} x{world}: step {step}, {compared} bytes gathered bit-exact "
                     f"({time.perf_counter() - start:.1f} s)")
    return "4-rank FSDP2 snapshot through SnapshotReader into " + "; ".join(notes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "little") % 10**6)
    parser.add_argument("--device", choices=["cuda", "cpu"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    args = parser.parse_args()
    from tessera import _dtensor
    if not _dtensor.available():
        log(f"SKIP: needs DTensor and fully_shard (torch >= 2.4, have {torch.__version__})")
        print("0 passed, 0 failed, 1 skipped")
        return 0
    worlds = [int(w) for w in args.worlds.split(",")]
    layouts = args.layouts.split(",")
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    log(f"PyTorch {torch.__version__}, device {args.device}"
        f"{f' ({gpus} GPUs)' if args.device == 'cuda' else ''}, seed {args.seed} "
        f"(--seed {args.seed} repeats this run)")
    workdir = Path(tempfile.mkdtemp(prefix="tessera-multirank-"))
    daemon, store = start_daemon(workdir)
    passed = failed = skipped = 0
    try:
        for world in worlds:
            if args.device == "cuda" and world > gpus:
                for layout in layouts:
                    log(f"SKIP {layout} x{world}: needs {world} GPUs, this machine has {gpus}")
                    skipped += 1
                continue
            for layout in layouts:
                out = workdir / f"{layout}-{world}"
                out.mkdir()
                try:
                    log(f"PASS {layout} x{world}: "
                        f"{case_kill_and_restore(layout, world, args.device, out, args.seed)}")
                    passed += 1
                except Exception:
                    failed += 1
                    log(f"FAIL {layout} x{world}:\n{traceback.format_exc()}")
        source = workdir / "fsdp2-4"
        if not (source / "restored.0").exists():
            log("SKIP resharded: no 4-rank FSDP2 snapshot was restored in this run")
            skipped += 1
        else:
            try:
                log("PASS resharded: " + case_reshard(source, (("fsdp2", 2), ("fsdp2+tp", 4)),
                                                      args.device, args.seed))
                passed += 1
            except Exception:
                failed += 1
                log(f"FAIL resharded:\n{traceback.format_exc()}")
    finally:
        stop_daemon(daemon, store, workdir, failed)
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
