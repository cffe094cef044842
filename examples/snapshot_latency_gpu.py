"""How long `Snapshotter.snapshot()` holds the training thread, over many snapshots, with another
Python thread busy beside the loop (as a DataLoader's pin-memory thread or a logger is).

The training loop is compare_gpu.py's GPT (a smaller one by default, so that many steps fit),
snapshotting at every step with when_busy="skip". Each snapshot() call is timed with
time.perf_counter(); the table gives the count, median, p99 and maximum, for:

  * "GIL kept": the library's non-blocking calls made through a ctypes.PyDLL handle, which keeps
    the GIL (what the package does);
  * "GIL released": the same calls through the ctypes.CDLL handle, which releases the GIL and must
    take it back from the busy thread (what the package did before) - the cause measured.

Run on the GPU machine from the repository root, with a bundle made here:
    TESSERAD=BUNDLE/bin/tesserad TESSERA_LIBRARY=BUNDLE/lib/libtessera.so \\
        python3 examples/snapshot_latency_gpu.py [--snapshots 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import List

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))
import compare_gpu as cg  # noqa: E402
import tessera.torch  # noqa: E402

GOAL_MS = 1.0


def busy(stop: threading.Event) -> None:
    """Pure-Python work that wants the GIL all the time, as a pin-memory or tokenizer thread."""
    x = 0
    while not stop.is_set():
        for i in range(1000):
            x = (x * 31 + i) % 1000003


def run(trainer: cg.Trainer, snap: tessera.torch.Snapshotter, count: int) -> List[float]:
    blocked: List[float] = []
    while len(blocked) < count:
        def after(step: int) -> None:
            t = time.perf_counter()
            snap.snapshot(step)
            blocked.append(time.perf_counter() - t)
        trainer.iteration(after)
    return blocked


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--snapshots", type=int, default=200, help="timed snapshot() calls per row")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=2048)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (this benchmark needs the GPU machine)")
        return 0
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    model_args = argparse.Namespace(layers=args.layers, width=args.width, heads=16, mlp_ratio=2,
                                    vocab=8192, batch=8, seq=1024, seed=1234)
    trainer = cg.Trainer(model_args, device)
    for _ in range(2):
        trainer.iteration()
    state_bytes = sum(t.numel() * t.element_size() for t in trainer.state_tensors().values())
    binary = cg.find_tesserad()
    if binary is None:
        print("tesserad not found: set TESSERAD")
        return 2
    daemon = cg.Daemon(binary, max(3 * state_bytes, 1 << 30))
    daemon.start()
    stop = threading.Event()
    thread = threading.Thread(target=busy, args=(stop,), daemon=True)
    rows = []
    try:
        snap = tessera.torch.Snapshotter(trainer.model, trainer.optimizer, job_id="latency",
                                         rank=0, world_size=1, socket_path=daemon.socket)
        cg.log(f"GPU {torch.cuda.get_device_name(device)}; state {cg.gb(state_bytes)}; "
               f"{args.snapshots} snapshot() calls per row, one every step, a busy Python thread "
               f"beside the loop (switch interval {sys.getswitchinterval() * 1e3:.0f} ms)")
        thread.start()
        run(trainer, snap, 10)  # warm-up
        client = snap._client
        fast = client._fast
        for name, handle in (("GIL kept (PyDLL, the package)", fast),
                             ("GIL released (CDLL, before)", client._lib)):
            client._fast = handle
            before = snap.stats()
            blocked = run(trainer, snap, args.snapshots)
            after = snap.stats()
            rows.append((name, blocked, after.started - before.started,
                         after.skipped - before.skipped))
        client._fast = fast
    finally:
        stop.set()
        daemon.stop()
    print(f"\n| snapshot() calls | count | started | skipped | median ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|---|")
    for name, blocked, started, skipped in rows:
        ordered = sorted(blocked)
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        print(f"| {name} | {len(blocked)} | {started} | {skipped} | "
              f"{statistics.median(blocked) * 1e3:.3f} | {p99 * 1e3:.3f} | "
              f"{max(blocked) * 1e3:.3f} |")
    worst = max(rows[0][1]) * 1e3
    print(f"\ngoal: every snapshot() under {GOAL_MS} ms over at least 100: "
          f"{'met' if worst < GOAL_MS and len(rows[0][1]) >= 100 else 'NOT met'} "
          f"(max {worst:.3f} ms over {len(rows[0][1])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
