#!/usr/bin/env python3
"""DP-sharded snapshots on one GPU (issue 7): bytes each GPU copies per snapshot, and iteration
overhead, unsharded against sharded over data-parallel groups of 2, 4 and 8, at a snapshot every
1 and every 5 steps. One table.

The model, the trainer and the timing are examples/staging_gpu.py's (its `measure`, over
examples/compare_gpu.py's GPT: default 24 blocks of width 2048, MLP 2x, 0.82B parameters, ~9.9 GB
of state with AdamW, bf16 autocast). With one GPU, this process plays DP rank 0 of an N-member
group: `Snapshotter(dp_group=list(range(N)), world_size=N, rank=0)`. Rank 0 of a real N-GPU node
copies exactly that: its balanced 1/N slice of the parameters and optimizer state, plus its
whole blobs (RNG states, optimizer metadata, user dict). The other members are not needed to
snapshot (only a restore gathers from them), so each row is what one GPU of such a node pays;
what N GPUs sharing one host's PCIe and memory bandwidth would pay together is not measured.

For each group size (1 = unsharded) a Snapshotter is registered, and for each interval a
baseline without snapshots is measured just before its row, on the same model. Bytes per
snapshot are the copy engine's bytes_copied over the snapshots sealed in the row (warm-up
included); overhead is the mean iteration time against that baseline (compute-stream
synchronize, as in compare_gpu.py); Tessera's default when_busy="skip" and adaptive staging.

    source BUNDLE/env.sh
    TESSERAD=BUNDLE/bin/tesserad TESSERA_LIBRARY=BUNDLE/lib/libtessera.so \\
        python3 examples/dp_gpu.py     # sized for < 4 minutes on an H100 (estimate, not yet run)

    # a smoke run of the script on the CPU (the numbers mean nothing)
    TESSERAD=$PWD/bazel-bin/daemon/tesserad TESSERA_LIBRARY=$PWD/bazel-bin/agent/libtessera.so \\
        python3 examples/dp_gpu.py --cpu --tiny

With --gpus N (N GPUs on this machine), the group is real: one process per GPU, each member R of
an N-member group on GPU R, all snapshotting to one tesserad at the same time, so the rows show
what the GPUs pay together, sharing the host's PCIe and memory bandwidth. The processes meet at a
gloo barrier before every baseline and every row. Each member prints its own table; rows are
unsharded (each member copies its whole state) and sharded over the N members.
"""

from __future__ import annotations

import argparse
import platform
import signal
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "agent" / "python"))

import compare_gpu as cg  # noqa: E402  (the model, trainer, daemon and table helpers)
import tessera.torch  # noqa: E402
from staging_gpu import measure  # noqa: E402  (warm-up, alignment and the measured window)

ALIGNMENT = 256  # DpSlicing::kAlignment (common/dp_slices.h)
# staging_gpu.py's model and batch (0.82B parameters, 116-128 ms per iteration on an H100/H200).
MODEL_DEFAULTS = {"layers": 24, "width": 2048, "heads": 16, "mlp_ratio": 2, "vocab": 8192,
                  "batch": 8, "seq": 1024}


def rank0_slice_bytes(replicated_bytes: int, members: int) -> int:
    """What DP rank 0 stores of the replicated bytes (common/dp_slices.h's balanced ranges)."""
    if members == 1:
        return replicated_bytes
    return max(0, replicated_bytes // members // ALIGNMENT * ALIGNMENT)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in MODEL_DEFAULTS.items():  # the GPT of compare_gpu.py
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    p.add_argument("--dp", default="2,4,8", help="DP group sizes to compare with unsharded")
    p.add_argument("--intervals", default="1,5", help="snapshot every N steps")
    p.add_argument("--iters", type=int, default=30, help="measured iterations per row")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--budget-s", type=float, default=200.0,
                   help="rows not started by then are left out (and said so)")
    p.add_argument("--cpu", action="store_true",
                   help="run on the CPU: a smoke run of the script, not a measurement")
    p.add_argument("--tiny", action="store_true", help="a small model (with --cpu)")
    p.add_argument("--gpus", type=int, default=0,
                   help="N >= 2: one process per GPU, a real N-member group (see above)")
    # Set by --gpus for its member processes.
    p.add_argument("--member", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--socket", default="", help=argparse.SUPPRESS)
    p.add_argument("--init-method", default="", help=argparse.SUPPRESS)
    if "--tiny" in sys.argv[1:]:  # defaults only: flags given explicitly still win
        p.set_defaults(layers=2, width=64, heads=4, vocab=256, batch=4, seq=32, iters=10,
                       warmup=2)
    return p.parse_args()


def launch_members(args: argparse.Namespace) -> int:
    """--gpus N: a tesserad, then one member process per GPU; prints each member's table."""
    import subprocess
    import tempfile
    if not args.cpu and (not torch.cuda.is_available() or torch.cuda.device_count() < args.gpus):
        print(f"--gpus {args.gpus} needs {args.gpus} CUDA devices; this machine has "
              f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
        return 2
    binary = cg.find_tesserad()
    if binary is None:
        print("tesserad not found: set TESSERAD")
        return 2
    # Room for every member's two unsharded slots of the default model's ~9.9 GB (one group is
    # registered at a time).
    daemon = cg.Daemon(binary, args.gpus * 2 * (11 << 30) + (4 << 30))
    daemon.start()
    rendezvous = tempfile.mkdtemp(prefix="tessera-dp-gpus-")
    try:
        passed = list(sys.argv[1:])
        for i, a in reversed(list(enumerate(passed))):  # the members get --gpus anew
            if a == "--gpus":
                del passed[i:i + 2]
            elif a.startswith("--gpus="):
                del passed[i]
        argv = [sys.executable, "-u", str(Path(__file__).resolve())] + passed
        members = [subprocess.Popen(argv + ["--gpus", str(args.gpus), "--member", str(r),
                                            "--socket", daemon.socket, "--init-method",
                                            f"file://{rendezvous}/barrier"],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                   for r in range(args.gpus)]
        outputs = [m.communicate()[0] for m in members]
    finally:
        daemon.stop()
    rc = 0
    for r, (m, out) in enumerate(zip(members, outputs)):
        print(f"=== member {r} (GPU {r}), exit {m.returncode}")
        print(out.rstrip())
        rc = rc or m.returncode
    return rc


def main() -> int:
    args = parse_args()
    if args.gpus >= 2 and args.member < 0:
        return launch_members(args)
    member = max(args.member, 0)
    barrier = lambda: None  # noqa: E731  (one process: nothing to wait for)
    if args.member >= 0:  # one of --gpus N processes: a real group of N, member `member`
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method=args.init_method, rank=member,
                                world_size=args.gpus)
        barrier = dist.barrier
        args.dp = str(args.gpus)
    groups = [1] + [int(x) for x in args.dp.split(",") if x]
    intervals = [int(x) for x in args.intervals.split(",") if x]
    if any(n < 1 for n in groups) or any(e < 1 for e in intervals):
        print("--dp and --intervals take positive integers")
        return 2
    # SIGTERM (a timeout) unwinds through the finally blocks: the daemon is stopped, /dev/shm freed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.cpu:
        device = torch.device("cpu")
        gpu = "none (CPU smoke run: the numbers mean nothing)"
    elif not torch.cuda.is_available():
        print("dp_gpu.py needs a CUDA device (or --cpu --tiny for a smoke run of the script)")
        return 2
    else:
        device = torch.device("cuda", member)
        torch.cuda.set_device(device)
        gpu = torch.cuda.get_device_name(device)
    binary = cg.find_tesserad()
    if binary is None and not args.socket:
        print("tesserad not found: set TESSERAD")
        return 2
    cg.log(f"GPU {gpu}; torch {torch.__version__}; Python {platform.python_version()}")

    trainer = cg.Trainer(args, device)
    for _ in range(2):  # creates the AdamW state
        trainer.iteration()
    state = trainer.state_tensors()
    replicated_bytes = sum(t.numel() * t.element_size() for t in state.values())
    n_params = sum(p.numel() for p in trainer.model.parameters())
    cg.log(f"model {n_params / 1e6:.1f}M parameters; state {cg.gb(replicated_bytes)} in "
           f"{len(state)} tensors, all replicated under data parallelism (no buffers)")
    del state

    daemon = None if args.socket else cg.Daemon(binary, max(3 * replicated_bytes, 1 << 30))
    socket_path = args.socket or daemon.socket
    if daemon:
        daemon.start()
    # One process plays rank 0 of each group; with --gpus every member is its own process.
    rank = member
    world = lambda members: args.gpus if args.member >= 0 else members  # noqa: E731
    # (group size, interval) -> (baseline, Tessera row, bytes copied per sealed snapshot)
    rows: Dict[Tuple[int, int], Tuple[cg.Row, cg.Row, Optional[float]]] = {}
    rates: Dict[int, List[float]] = {}
    left_out: List[str] = []
    try:
        for members in groups:
            if cg.elapsed() > args.budget_s:
                left_out.append(f"DP {members}: over --budget-s {args.budget_s:.0f} s")
                continue
            snap = tessera.torch.Snapshotter(
                trainer.model, trainer.optimizer, job_id=f"dp-bench-{members}", rank=rank,
                world_size=world(members), socket_path=socket_path,
                dp_group=None if members == 1 else list(range(members)))
            try:
                for every in intervals:
                    if cg.elapsed() > args.budget_s:
                        left_out.append(f"DP {members} every {every}: over --budget-s")
                        continue
                    label = f"every {every}" if every > 1 else "every step"
                    base = cg.Row("baseline", label)
                    barrier()
                    measure(trainer, base, every, args.iters, args.warmup, None, lambda: None)
                    name = "unsharded" if members == 1 else f"DP {members}, rank {rank}"
                    row = cg.Row(name, label)
                    snap.every = every
                    before = snap.stats()
                    barrier()
                    measure(trainer, row, every, args.iters, args.warmup, snap.step, snap.wait)
                    after = snap.stats()
                    sealed = after.sealed - before.sealed
                    per_snapshot = ((after.bytes_copied - before.bytes_copied) / sealed
                                    if sealed else None)
                    if after.failed != before.failed:
                        row.notes.append(f"{after.failed - before.failed} FAILED")
                    snapshot_steps = cg.round_up(args.iters, every) // every
                    row.started = len(row.blocked_s)
                    row.skipped = snapshot_steps - row.started
                    if after.d2h_bytes_per_s:
                        rates.setdefault(members, []).append(after.d2h_bytes_per_s)
                    rows[(members, every)] = (base, row, per_snapshot)
                    cg.log(f"{name}, {label}: baseline {cg.fmt_ms(base.mean_s(), 1)} ms/it; "
                           f"{cg.overhead_pct(row, base):+.1f}%; "
                           f"{cg.gb(per_snapshot or 0)} copied per snapshot; "
                           f"{row.started} snapshots, {row.skipped} skipped")
            finally:
                barrier()  # every member is done with this group
                snap.close(drop=True)  # frees its slots before the next group registers
    finally:
        if daemon:
            daemon.stop()

    print()
    print(f"GPU: {gpu}; torch {torch.__version__}; model {n_params / 1e6:.1f}M parameters, "
          f"{cg.gb(replicated_bytes)} of parameters and AdamW state; {args.iters} measured "
          "iterations per row, each against a baseline measured just before it")
    if args.member >= 0:
        print(f"Member {rank} of a real group of {args.gpus}, one process per GPU, all "
              f"snapshotting at once (dp_group=list(range({args.gpus})), rank={rank}).")
    else:
        print("One GPU plays DP rank 0 of an N-member group (dp_group=list(range(N)), "
              "world_size=N, rank=0): what rank 0 copies on an N-GPU node.")
    print()
    print("| DP group | interval | baseline ms/it | ms/it | overhead | copied per snapshot "
          "(rank 0's slice) | vs unsharded | snapshots (skipped) | blocked ms median / max |")
    print("|---|---|---|---|---|---|---|---|---|")
    for every in intervals:
        unsharded = rows.get((1, every), (None, None, None))[2]
        for members in groups:
            if (members, every) not in rows:
                continue
            base, row, per_snapshot = rows[(members, every)]
            ratio = (f"{per_snapshot / unsharded:.3f} (1/{members} = {1 / members:.3f})"
                     if per_snapshot and unsharded else "-")
            blocked = (f"{cg.fmt_ms(statistics.median(row.blocked_s))} / "
                       f"{cg.fmt_ms(max(row.blocked_s))}" if row.blocked_s else "-")
            notes = f"; {'; '.join(row.notes)}" if row.notes else ""
            print(f"| {'unsharded' if members == 1 else members} | {every} | "
                  f"{cg.fmt_ms(base.mean_s(), 1)} | {cg.fmt_ms(row.mean_s(), 1)} | "
                  f"{cg.overhead_pct(row, base):+.1f}% | "
                  f"{cg.gb(per_snapshot) if per_snapshot else '-'} "
                  f"({cg.gb(rank0_slice_bytes(replicated_bytes, members))}) | {ratio} | "
                  f"{row.started} ({row.skipped}){notes} | {blocked} |")
    print()
    for members, measured in rates.items():
        print(f"{'unsharded' if members == 1 else f'DP {members}'}: device-to-host rate measured "
              f"by the copy engine {statistics.median(measured) / 1e9:.1f} GB/s")
    for note in left_out:
        print(f"left out: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
