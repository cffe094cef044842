#!/usr/bin/env python3
"""tessera.dcp with the real torch.distributed.checkpoint: saves through tessera.dcp.Writer, loads
through tessera.dcp.Reader, compares every tensor bit for bit. Needs PyTorch >= 2.4 (DCP, DTensor,
torch.distributed.checkpoint.state_dict); a GPU is used when there is one, and the resharding
cases run on CPU processes (gloo), so the script also runs on a CPU-only machine with PyTorch 2.x.

    TESSERAD=BUNDLE/bin/tesserad TESSERA_LIBRARY=BUNDLE/lib/libtessera.so \\
        python3 tests/gpu/dcp_on_device.py [--seed N] [--device cuda|cpu] [--skip-reshard]

It starts its own tesserad (store in /dev/shm, removed at exit), then runs:

1. same layout, one process in a world of 1 (``cpu:gloo,cuda:nccl`` on a GPU, else gloo): a small
   model trained 3 AdamW steps, its ``get_state_dict`` saved with ``dcp.save`` and, one step
   later, with ``dcp.async_save`` (each into a job of its own), the model and optimizer changed,
   each checkpoint loaded back with ``dcp.load`` and ``set_state_dict``, and the state compared
   with the saved one;
2. resharded: 4 processes save DTensors sharded by rows (``Shard(0)``, uneven) and a replicated
   tensor and a non-tensor value; then 2 processes load them sharded by columns (``Shard(1)``),
   3 processes by rows again (another split), and this process into plain whole tensors
   (``no_dist``); every local shard is compared with the same shard of the tensors regenerated
   from the seed;
3. a Snapshotter's snapshot resharded: 4 processes train DTensor parameters (``Shard(0)``) with
   AdamW and snapshot them through `tessera.torch.Snapshotter` (not DCP); 2 processes load the
   snapshot through ``tessera.dcp.SnapshotReader`` sharded by columns, 3 by rows, and this
   process whole; parameters, AdamW moments and steps, a buffer and the param groups are
   compared with the same steps run on whole tensors in one process.

Prints one PASS or FAIL line per case and exits 1 when any failed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "agent" / "python"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

SHAPES = {"layers.0.w": (37, 23), "layers.1.w": (50, 3, 4), "emb": (61, 16)}
DTYPES = {"layers.0.w": torch.float32, "layers.1.w": torch.bfloat16, "emb": torch.float16}


def log(message: str) -> None:
    print(message, flush=True)


def start_daemon(workdir: Path) -> Tuple[subprocess.Popen, Path]:
    """A tesserad on a store of its own in /dev/shm; sets TESSERA_SOCKET to its socket."""
    tesserad = os.environ.get("TESSERAD") or str(REPO / "bazel-bin" / "daemon" / "tesserad")
    if not os.path.isfile(tesserad):
        sys.exit(f"tesserad not found at {tesserad}: set TESSERAD")
    store = Path(tempfile.mkdtemp(prefix="tessera-dcp-", dir="/dev/shm"))
    socket_path = workdir / "agent.sock"
    log_path = workdir / "tesserad.log"
    process = subprocess.Popen(
        [tesserad, "--set", "node.id=n0", "--set", f"store.directory={store}",
         "--set", f"agent.socket_path={socket_path}", "--set", "store.capacity_bytes=4GiB"],
        stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"tesserad exited with {process.returncode}:\n{log_path.read_text()}")
        if socket_path.exists() and b" ready" in log_path.read_bytes():
            os.environ["TESSERA_SOCKET"] = str(socket_path)
            return process, store
        time.sleep(0.05)
    sys.exit(f"tesserad did not get ready in 30 s:\n{log_path.read_text()}")


def stop_daemon(daemon: subprocess.Popen, store: Path, workdir: Path, failed: int) -> None:
    """Stops start_daemon's tesserad and removes its store; the work directory too unless a case
    failed (its log is then named)."""
    daemon.terminate()
    daemon.wait(timeout=60)
    if failed:
        log(f"tesserad log: {workdir / 'tesserad.log'}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    shutil.rmtree(store, ignore_errors=True)


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_bit_equal(a: Any, b: Any, path: str = "state") -> int:
    """Compares nested dicts, lists, tensors and values bit for bit; returns the tensor bytes
    compared."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: tensor vs {type(b).__name__}"
        assert (a.dtype, tuple(a.shape)) == (b.dtype, tuple(b.shape)), (
            f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
        assert tensor_bytes(a) == tensor_bytes(b), f"{path}: the bytes differ"
        return a.numel() * a.element_size()
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {set(a)} vs {set(b)}"
        return sum(assert_bit_equal(a[k], b[k], f"{path}[{k!r}]") for k in a)
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
        return sum(assert_bit_equal(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    assert a == b, f"{path}: {a!r} vs {b!r}"
    return 0


def cpu_copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: cpu_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [cpu_copy(v) for v in value]
    return value


# -- case 1: same layout, a world of 1 -----------------------------------------------------------


def case_same_layout(device: str, seed: int, workdir: Path) -> str:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import tessera.dcp

    backend = "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{workdir}/pg-same", rank=0,
                            world_size=1)
    try:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(),
                                    torch.nn.Linear(128, 64)).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def train(steps: int) -> None:
            for _ in range(steps):
                loss = model(torch.randn(32, 64, device=device)).square().mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()

        def state() -> Dict[str, Any]:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            return {"model": model_sd, "optim": optim_sd}

        train(3)
        # A job holds one complete checkpoint (a newer one releases it): one job per way of
        # saving, so that both checkpoints can be loaded at the end.
        saved = {}
        sd = state()
        saved["dcp-save"] = cpu_copy(sd)
        start = time.perf_counter()
        dcp.save(sd, storage_writer=tessera.dcp.Writer("dcp-save", 1))
        save_s = time.perf_counter() - start
        train(1)
        notes = [f"dcp.save {save_s * 1e3:.1f} ms"]
        if hasattr(dcp, "async_save"):
            sd = state()
            saved["dcp-async"] = cpu_copy(sd)
            start = time.perf_counter()
            pending = dcp.async_save(sd, storage_writer=tessera.dcp.Writer("dcp-async", 1))
            blocked_s = time.perf_counter() - start
            # A Future; from PyTorch 2.9 an AsyncSaveResponse when staging is asynchronous too.
            getattr(pending, "upload_completion", pending).result()
            notes.append(f"async_save blocked {blocked_s * 1e3:.1f} ms, done "
                         f"{(time.perf_counter() - start) * 1e3:.1f} ms")
        compared = 0
        for job, want in saved.items():
            train(2)  # the live state moves on: the load must bring the saved one back
            sd = state()
            start = time.perf_counter()
            dcp.load(sd, storage_reader=tessera.dcp.Reader(job, 1))
            notes.append(f"load of {job} {(time.perf_counter() - start) * 1e3:.1f} ms")
            set_state_dict(model, optimizer, model_state_dict=sd["model"],
                           optim_state_dict=sd["optim"])
            compared += assert_bit_equal(want, cpu_copy(state()), job)
        return f"{compared} tensor bytes bit-exact on {device}; " + ", ".join(notes)
    finally:
        dist.destroy_process_group()


# -- case 2: resharded, DTensors on CPU processes ------------------------------------------------


def reference(seed: int) -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(shape, generator=gen, dtype=torch.float64) + 0.5).to(DTYPES[name])
            for name, shape in SHAPES.items()}


def dtensor_api() -> Any:
    try:
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    except ImportError:  # PyTorch < 2.4
        from torch.distributed._tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.device_mesh import init_device_mesh
    return Replicate, Shard, distribute_tensor, init_device_mesh


@contextlib.contextmanager
def gloo_mesh(rank: int, world: int, init_file: str, socket: str) -> Iterator[Any]:
    """A worker's process group (gloo) and 1-D CPU mesh of `world`; every rank meets at a barrier
    before the group goes."""
    os.environ["TESSERA_SOCKET"] = socket
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        yield dtensor_api()[3]("cpu", (world,))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def reshard_worker(rank: int, phase: str, world: int, init_file: str, seed: int, socket: str,
                   report_dir: str) -> None:
    import torch.distributed.checkpoint as dcp

    import tessera.dcp

    with gloo_mesh(rank, world, init_file, socket) as mesh:
        Replicate, Shard, distribute_tensor, _ = dtensor_api()
        full = reference(seed)
        placement = {"save": Shard(0), "load-columns": Shard(1), "load-rows": Shard(0)}[phase]
        if phase == "save":
            sd: Dict[str, Any] = {name: distribute_tensor(t, mesh, [placement])
                                  for name, t in full.items()}
            sd["bias"] = distribute_tensor(torch.arange(7, dtype=torch.float32) + 0.25, mesh,
                                           [Replicate()])
            sd["step"] = 7
            dcp.save(sd, storage_writer=tessera.dcp.Writer("dcp-reshard", 7))
        else:
            sd = {name: distribute_tensor(torch.zeros_like(t), mesh, [placement])
                  for name, t in full.items()}
            sd["bias"] = distribute_tensor(torch.zeros(7), mesh, [Replicate()])
            sd["step"] = 0
            dcp.load(sd, storage_reader=tessera.dcp.Reader("dcp-reshard", 7))
            compared = 0
            for name, t in full.items():
                want = distribute_tensor(t, mesh, [placement]).to_local()
                compared += assert_bit_equal(want, sd[name].to_local(), f"rank {rank} {name}")
            assert_bit_equal(torch.arange(7, dtype=torch.float32) + 0.25,
                             sd["bias"].to_local(), "bias")
            assert sd["step"] == 7, f"step came back as {sd['step']!r}"
            Path(report_dir, f"{phase}.{rank}").write_text(str(compared))


def spawn_phases(worker: Any, phases: Sequence[Tuple[str, int]], seed: int, reports: Path,
                 expected_bytes: int) -> List[str]:
    """Runs each (phase, world) as `world` processes of `worker`; the first phase saves, each
    later one loads and reports how many bytes its ranks compared, which must add up to
    `expected_bytes`. Returns a note per phase."""
    import torch.multiprocessing as mp

    reports.mkdir(exist_ok=True)
    notes = []
    for i, (phase, world) in enumerate(phases):
        start = time.perf_counter()
        mp.spawn(worker, args=(phase, world, str(reports.parent / f"pg-{phase}"), seed,
                               os.environ["TESSERA_SOCKET"], str(reports)),
                 nprocs=world, join=True)
        notes.append(f"{phase} x{world} {time.perf_counter() - start:.1f} s")
        if i > 0:
            got = [int((reports / f"{phase}.{r}").read_text()) for r in range(world)]
            assert sum(got) == expected_bytes, f"{phase}: compared {got} of {expected_bytes}"
    return notes


def case_reshard(seed: int, workdir: Path) -> str:
    import torch.distributed.checkpoint as dcp

    import tessera.dcp

    full_bytes = sum(t.numel() * t.element_size() for t in reference(seed).values())
    notes = spawn_phases(reshard_worker, (("save", 4), ("load-columns", 2), ("load-rows", 3)),
                         seed, workdir / "reports", full_bytes)
    full = reference(seed)
    whole: Dict[str, Any] = {name: torch.zeros_like(t) for name, t in full.items()}
    whole["bias"] = torch.zeros(7)
    whole["step"] = 0
    dcp.load(whole, storage_reader=tessera.dcp.Reader("dcp-reshard", 7), no_dist=True)
    assert_bit_equal(full, {k: whole[k] for k in full}, "whole")
    assert whole["step"] == 7
    notes.append("whole tensors (no_dist) bit-exact")
    return "saved by 4 ranks Shard(0); loaded by 2 ranks Shard(1), 3 ranks Shard(0), 1 whole: " \
           + ", ".join(notes)


# -- case 3: a Snapshotter's snapshot, resharded through tessera.dcp.SnapshotReader -----------

SNAP_SHAPES = {"a": (37, 23), "b": (61, 16)}
SNAP_STEPS = 2


class SnapNet(torch.nn.Module):
    """Two parameters (DTensors when a mesh is given) and a plain buffer."""

    def __init__(self, values: Dict[str, torch.Tensor], mesh: Any = None,
                 placement: Any = None) -> None:
        super().__init__()
        _, _, distribute_tensor, _ = dtensor_api() if mesh is not None else (None,) * 4
        for name, t in values.items():
            t = t.clone()
            if mesh is not None:
                t = distribute_tensor(t, mesh, [placement])
            self.register_parameter(name, torch.nn.Parameter(t))
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 5))


def snap_train(model: SnapNet, optimizer: Any, grads: Dict[str, torch.Tensor],
               mesh: Any = None, placement: Any = None) -> None:
    """SNAP_STEPS AdamW steps whose gradients are exactly `grads` (elementwise, so any sharding
    of the same steps gives the same bits)."""
    _, _, distribute_tensor, _ = dtensor_api() if mesh is not None else (None,) * 4
    for _ in range(SNAP_STEPS):
        for name, p in model.named_parameters():
            g = grads[name]
            p.grad = distribute_tensor(g, mesh, [placement]) if mesh is not None else g.clone()
        optimizer.step()
        optimizer.zero_grad()


def snap_reference(seed: int) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed + 17)
    values = {n: torch.randn(s, generator=gen) for n, s in SNAP_SHAPES.items()}
    grads = {n: torch.randn(s, generator=gen) for n, s in SNAP_SHAPES.items()}
    return values, grads


def snap_expected(seed: int) -> Dict[str, Any]:
    """The state after the same steps on whole tensors in one process."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    values, grads = snap_reference(seed)
    model = SnapNet(values)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    snap_train(model, optimizer, grads)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return cpu_copy({"model": model_sd, "optim": optim_sd})


def snap_worker(rank: int, phase: str, world: int, init_file: str, seed: int, socket: str,
                report_dir: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import tessera.dcp
    import tessera.torch

    with gloo_mesh(rank, world, init_file, socket) as mesh:
        _, Shard, distribute_tensor, _ = dtensor_api()
        placement = {"snap-save": Shard(0), "snap-load-columns": Shard(1),
                     "snap-load-rows": Shard(0)}[phase]
        values, grads = snap_reference(seed)
        if phase == "snap-save":
            model = SnapNet(values, mesh, placement)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
            snap_train(model, optimizer, grads, mesh, placement)
            snap = tessera.torch.Snapshotter(model, optimizer, job_id="snap-reshard", rank=rank,
                                             world_size=world, socket_path=socket)
            assert snap.snapshot(SNAP_STEPS), "the snapshot was skipped"
            snap.wait()
            snap.close()
        else:
            zeros = {n: torch.zeros(s) for n, s in SNAP_SHAPES.items()}
            model = SnapNet(zeros, mesh, placement)
            model.scale.zero_()
            optimizer = torch.optim.AdamW(model.parameters(), lr=0.5)
            model_sd, optim_sd = get_state_dict(model, optimizer)
            sd = {"model": model_sd, "optim": optim_sd}
            dcp.load(sd, storage_reader=tessera.dcp.SnapshotReader("snap-reshard", SNAP_STEPS))
            set_state_dict(model, optimizer, model_state_dict=sd["model"],
                           optim_state_dict=sd["optim"])
            want = snap_expected(seed)
            compared = 0
            for name in SNAP_SHAPES:
                local = distribute_tensor(want["model"][name], mesh, [placement]).to_local()
                compared += assert_bit_equal(local, getattr(model, name).to_local(),
                                             f"rank {rank} {name}")
                state = optimizer.state[getattr(model, name)]
                for key in ("exp_avg", "exp_avg_sq"):
                    local = distribute_tensor(want["optim"]["state"][name][key], mesh,
                                              [placement]).to_local()
                    compared += assert_bit_equal(local, state[key].to_local(),
                                                 f"rank {rank} {name}.{key}")
                assert_bit_equal(want["optim"]["state"][name]["step"], state["step"],
                                 f"rank {rank} {name}.step")
            assert_bit_equal(want["model"]["scale"], model.scale, "scale")
            group = optimizer.param_groups[0]
            assert (group["lr"], group["weight_decay"]) == (1e-2, 0.1), group
            Path(report_dir, f"{phase}.{rank}").write_text(str(compared))


def case_snapshot_reshard(seed: int, workdir: Path) -> str:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    import tessera.dcp

    state_bytes = 3 * sum(4 * a * b for a, b in SNAP_SHAPES.values())
    notes = spawn_phases(snap_worker, (("snap-save", 4), ("snap-load-columns", 2),
                                       ("snap-load-rows", 3)), seed, workdir / "snap-reports",
                         state_bytes)
    # Whole tensors in this process, without a process group.
    model = SnapNet({n: torch.zeros(s) for n, s in SNAP_SHAPES.items()})
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = {"model": model_sd, "optim": optim_sd}
    start = time.perf_counter()
    dcp.load(sd, storage_reader=tessera.dcp.SnapshotReader("snap-reshard"), no_dist=True)
    notes.append(f"whole (no_dist, newest step) {(time.perf_counter() - start) * 1e3:.1f} ms")
    want = snap_expected(seed)
    assert_bit_equal(want["model"], sd["model"], "whole model")
    assert_bit_equal(want["optim"]["state"], sd["optim"]["state"], "whole optimizer state")
    return ("Snapshotter of 4 ranks, DTensors Shard(0), AdamW: loaded through SnapshotReader by 2 "
            "ranks Shard(1), 3 ranks Shard(0), 1 whole, model and optimizer bit-exact: "
            + ", ".join(notes))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    parser.add_argument("--device", choices=["cuda", "cpu"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-reshard", action="store_true")
    args = parser.parse_args()
    import tessera.dcp

    missing = tessera.dcp.dcp_available()
    if missing:
        log(f"SKIP: torch.distributed.checkpoint is not usable with PyTorch {torch.__version__}: "
            f"{missing}")
        return 0
    log(f"PyTorch {torch.__version__}, device {args.device}, seed {args.seed} "
        f"(--seed {args.seed} repeats this run)")
    workdir = Path(tempfile.mkdtemp(prefix="tsr-dcp"))
    daemon, store = start_daemon(workdir)
    failed = 0
    cases: List[tuple] = [("same layout", lambda: case_same_layout(args.device, args.seed,
                                                                     workdir))]
    if not args.skip_reshard:
        cases.append(("resharded", lambda: case_reshard(args.seed, workdir)))
        cases.append(("snapshot resharded",
                      lambda: case_snapshot_reshard(args.seed, workdir)))
    try:
        for name, run in cases:
            try:
                log(f"PASS {name}: {run()}")
            except Exception:
                failed += 1
                log(f"FAIL {name}:\n{traceback.format_exc()}")
    finally:
        tessera.dcp.release()  # the ranks this process saved, before their daemon goes
        stop_daemon(daemon, store, workdir, failed)
    log(f"{len(cases) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
