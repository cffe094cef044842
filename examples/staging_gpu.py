#!/usr/bin/env python3
"""GPU staging on one GPU: Tessera's lazy fence, full staging and adaptive plan against the same
two floors written in plain PyTorch, at a snapshot every 1, 2, 3, 5 and 10 steps. One table.

The model is examples/compare_gpu.py's GPT (default 24 blocks of width 2048, MLP 2x: 0.82B
parameters, ~9.9 GB of state with AdamW), trained on synthetic tokens under bf16 autocast. For
each interval, in this order and on the same model:

  * baseline: no snapshots (each interval gets its own baseline, measured just before its rows);
  * torch lazy fence: the state copied device-to-host (pinned memory) on a side stream, the next
    optimizer step waiting for that copy;
  * torch staged: the state copied device-to-device into a staging buffer on the side stream (the
    optimizer step waits only for that), then device-to-host from the buffer;
  * Tessera `Snapshotter` with staging "off" (the lazy fence), "full", and "adaptive" (the default:
    the fewest bytes staged that keep the fence from stalling, planned from the measured window
    between snapshot and fence and the measured copy rate).

Both floors skip a snapshot while the previous one is still copying, as Tessera's default
when_busy="skip" does (Tessera's snapshot is in flight until the daemon has sealed it, CRC
included). Iteration time is measured as in compare_gpu.py: wall time to the end of a
synchronize of the compute stream only, so that only what the snapshot costs the training stream
counts. Overhead is the mean against that interval's baseline. Blocked is the wall time of the
snapshot call on the training thread.

    source BUNDLE/env.sh
    TESSERAD=BUNDLE/bin/tesserad TESSERA_LIBRARY=BUNDLE/lib/libtessera.so \\
        python3 examples/staging_gpu.py
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "agent" / "python"))

import compare_gpu as cg  # noqa: E402  (the model, trainer, daemon and table helpers)
import tessera.torch  # noqa: E402


class TorchSnapshot:
    """The plain-PyTorch floor: the state's tensors copied to one pinned host buffer on a side
    stream, directly (lazy fence) or through a device staging buffer (staged)."""

    def __init__(self, tensors: List[torch.Tensor], staged: bool, device: torch.device) -> None:
        self.tensors = tensors
        self.staged = staged
        self.stream = torch.cuda.Stream(device)
        offsets, total = [], 0
        for t in tensors:
            offsets.append(total)
            total += -(-t.numel() * t.element_size() // 256) * 256
        self.host_flat = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        self.host = self._views(self.host_flat, offsets)
        self.stage_flat = torch.empty(total, dtype=torch.uint8, device=device) if staged else None
        self.stage = self._views(self.stage_flat, offsets) if staged else []
        self.fence_event: Optional[torch.cuda.Event] = None
        self.done: Optional[torch.cuda.Event] = None
        self.started = 0
        self.skipped = 0

    def _views(self, flat: torch.Tensor, offsets: List[int]) -> List[torch.Tensor]:
        return [flat[o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                for o, t in zip(offsets, self.tensors)]

    def snapshot(self) -> bool:
        if self.done is not None and not self.done.query():
            self.skipped += 1
            return False
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            if self.staged:
                if hasattr(torch, "_foreach_copy_"):
                    torch._foreach_copy_(self.stage, self.tensors, non_blocking=True)
                else:
                    for s, t in zip(self.stage, self.tensors):
                        s.copy_(t, non_blocking=True)
                self.fence_event = torch.cuda.Event()
                self.fence_event.record(self.stream)
                self.host_flat.copy_(self.stage_flat, non_blocking=True)
            else:
                for h, t in zip(self.host, self.tensors):
                    h.copy_(t, non_blocking=True)
                self.fence_event = torch.cuda.Event()
                self.fence_event.record(self.stream)
            self.done = torch.cuda.Event()
            self.done.record(self.stream)
        self.started += 1
        return True

    def fence(self) -> None:
        if self.fence_event is not None:
            torch.cuda.current_stream().wait_event(self.fence_event)
            self.fence_event = None

    def wait(self) -> None:
        if self.done is not None:
            self.done.synchronize()


def measure(trainer: cg.Trainer, row: cg.Row, every: int, iters: int, warmup: int,
            call, wait) -> None:
    """Warms up (at least one snapshot), aligns to a snapshot step, then measures `iters`
    iterations (rounded up to whole intervals) with `call(step)` after each optimizer step on the
    steps that are multiples of `every`."""

    def hook(step: int):
        if call is None or step % every != 0:
            return None
        start = time.perf_counter()
        started = call(step)
        return time.perf_counter() - start, started

    for _ in range(max(warmup, every + 1)):
        trainer.iteration(hook)
    wait()
    trainer.align(every, hook)
    for _ in range(cg.round_up(iters, every)):
        seconds, r = trainer.iteration(hook)
        row.iter_s.append(seconds)
        if r is not None and r[1]:
            row.blocked_s.append(r[0])
    wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--mlp-ratio", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--intervals", default="1,2,3,5,10")
    p.add_argument("--iters", type=int, default=40, help="measured iterations per row")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--profile", type=int, default=0,
                   help="after the table, profile this many Snapshotter.step calls (cProfile)")
    args = p.parse_args()
    intervals = [int(x) for x in args.intervals.split(",")]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not torch.cuda.is_available():
        print("staging_gpu.py needs a CUDA device")
        return 2
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    gpu = torch.cuda.get_device_name(device)
    cg.log(f"GPU {gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}); Python "
           f"{platform.python_version()}")
    trainer = cg.Trainer(args, device)
    for _ in range(2):
        trainer.iteration()
    state = trainer.state_tensors()
    tensors = list(state.values())
    state_bytes = sum(t.numel() * t.element_size() for t in tensors)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    cg.log(f"model {n_params / 1e6:.1f}M parameters; state {cg.gb(state_bytes)} in "
           f"{len(tensors)} tensors; GPU memory allocated "
           f"{cg.gb(torch.cuda.memory_allocated(device))}")

    binary = cg.find_tesserad()
    if binary is None:
        print("tesserad not found: set TESSERAD")
        return 2
    daemon = cg.Daemon(binary, max(3 * state_bytes, 1 << 30))
    daemon.start()
    lazy = TorchSnapshot(tensors, staged=False, device=device)
    staged = TorchSnapshot(tensors, staged=True, device=device)
    current: Dict[str, Optional[TorchSnapshot]] = {"floor": None}
    # The floors fence in an optimizer step pre-hook, as Tessera does.
    trainer.optimizer.register_step_pre_hook(
        lambda *_: current["floor"].fence() if current["floor"] is not None else None)
    snap = tessera.torch.Snapshotter(trainer.model, trainer.optimizer, job_id="staging-bench",
                                     rank=0, world_size=1, socket_path=daemon.socket)
    rows: Dict[int, Dict[str, cg.Row]] = {}
    plans: Dict[int, str] = {}
    try:
        for every in intervals:
            label = f"every {every}" if every > 1 else "every step"
            rows[every] = {}
            base = cg.Row("baseline", label)
            measure(trainer, base, every, args.iters, args.warmup, None, lambda: None)
            rows[every]["baseline"] = base
            cg.log(f"{label}: baseline {cg.fmt_ms(base.mean_s(), 1)} ms/iteration")
            for name, floor in (("torch lazy fence", lazy), ("torch staged", staged)):
                row = cg.Row(name, label)
                current["floor"] = floor
                s0, k0 = floor.started, floor.skipped
                measure(trainer, row, every, args.iters, args.warmup,
                        lambda step, f=floor: f.snapshot(), floor.wait)
                current["floor"] = None
                row.started, row.skipped = floor.started - s0, floor.skipped - k0
                rows[every][name] = row
                cg.log("row: " + cg.row_line(row, base))
            snap.every = every
            for mode in ("off", "full", "adaptive"):
                snap.set_staging(mode)
                row = cg.Row(f"Tessera staging={mode}", label)
                before = snap.stats()
                measure(trainer, row, every, args.iters, args.warmup, snap.step, snap.wait)
                after = snap.stats()
                row.started = after.started - before.started
                row.skipped = after.skipped - before.skipped
                if after.failed != before.failed:
                    row.notes.append(f"{after.failed - before.failed} FAILED")
                if mode != "off":
                    row.notes.append(f"staged {cg.gb(after.plan_staged_bytes)} of "
                                     f"{cg.gb(after.plan_device_to_host_bytes)}")
                if mode == "adaptive":
                    plans[every] = (
                        f"window {cg.fmt_ms(after.window_s, 1)} ms, to host "
                        f"{(after.d2h_bytes_per_s or 0) / 1e9:.1f} GB/s, staging "
                        f"{(after.d2d_bytes_per_s or 0) / 1e9:.0f} GB/s -> staged "
                        f"{cg.gb(after.plan_staged_bytes)}, expected stall "
                        f"{cg.fmt_ms(after.plan_expected_stall_s, 2)} ms")
                    row.notes.append(plans[every])
                rows[every][f"tessera {mode}"] = row
                cg.log("row: " + cg.row_line(row, base))
        if args.profile:
            import cProfile
            import pstats
            profile = cProfile.Profile()
            snap.every = 1
            for _ in range(args.profile):
                trainer.train_step()
                profile.enable()
                snap.step(trainer.step)
                profile.disable()
                trainer.step += 1
                snap.wait()
            pstats.Stats(profile).sort_stats("tottime").print_stats(15)
    finally:
        snap.close()
        daemon.stop()

    names = ["torch lazy fence", "torch staged", "tessera off", "tessera full", "tessera adaptive"]
    print()
    print(f"GPU: {gpu}; torch {torch.__version__}; model {n_params / 1e6:.1f}M parameters, "
          f"state {cg.gb(state_bytes)} in {len(tensors)} tensors; {args.iters} measured "
          "iterations per row")
    print()
    print("| interval | baseline ms/it | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for every, r in rows.items():
        base = r["baseline"]
        cells = []
        for name in names:
            row = r[name]
            ovh = cg.overhead_pct(row, base)
            skipped = f", {row.skipped} skipped" if row.skipped else ""
            cells.append(f"{ovh:+.1f}% ({row.started} snapshots{skipped})")
        print(f"| {every} | {cg.fmt_ms(base.mean_s(), 1)} | " + " | ".join(cells) + " |")
    print()
    print("| interval | blocked ms per snapshot, median / max: torch lazy | torch staged | "
          "Tessera off | full | adaptive |")
    print("|---|---|---|---|---|---|")
    for every, r in rows.items():
        cells = []
        for name in names:
            b = r[name].blocked_s
            cells.append(f"{cg.fmt_ms(statistics.median(b))} / {cg.fmt_ms(max(b))}" if b else "-")
        print(f"| {every} | " + " | ".join(cells) + " |")
    print()
    for every, plan in plans.items():
        print(f"adaptive plan at every {every}: {plan}")
    print()
    all_blocked = [b for r in rows.values() for n in names[2:] for b in r[n].blocked_s]
    for every in (5, 10):
        if every not in rows:
            continue
        r = rows[every]
        a = cg.overhead_pct(r["tessera adaptive"], r["baseline"])
        f = cg.overhead_pct(r["torch staged"], r["baseline"])
        off = cg.overhead_pct(r["tessera off"], r["baseline"])
        ratio = r["tessera adaptive"].mean_s() / r["torch staged"].mean_s()
        print(f"every {every}: adaptive {a:+.2f}% vs torch staged floor {f:+.2f}% (iteration time "
              f"ratio {ratio:.3f}; goal <= 1.1 x the floor) and vs lazy fence {off:+.2f}% "
              f"({'not worse' if a <= off else 'WORSE'})")
    if 10 in rows:
        a = cg.overhead_pct(rows[10]["tessera adaptive"], rows[10]["baseline"])
        print(f"every 10: adaptive overhead {a:+.2f}% (goal <= 3.5%: "
              f"{'met' if a <= 3.5 else 'NOT met'})")
    if all_blocked:
        median, worst = statistics.median(all_blocked), max(all_blocked)
        print(f"Tessera blocked per snapshot: median {cg.fmt_ms(median)} ms, max "
              f"{cg.fmt_ms(worst)} ms over {len(all_blocked)} snapshots (goal < 1 ms: median "
              f"{'met' if median < 1e-3 else 'NOT met'}, max {'met' if worst < 1e-3 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
