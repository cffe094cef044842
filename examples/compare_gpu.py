#!/usr/bin/env python3
"""Tessera against torch.distributed.checkpoint.async_save on one GPU: one comparison table.

A GPT-style model (default 24 blocks of width 2048, MLP 2x width: 0.82B parameters, 9.9 GB of
fp32 weights plus AdamW moments) trains on synthetic tokens under bf16 autocast, as a plain
module or, with --fsdp2, under FSDP2 (`fully_shard`) in a world of one process. Measured, each
phase after warm-up iterations:

  1. iteration time without snapshots (the baseline);
  2. Tessera (`tessera.torch.Snapshotter`) at each interval of --intervals (default every 10
     steps and every step): the wall time of the snapshot call on the training thread, and
     iteration time against the baseline;
  3. `torch.distributed.checkpoint.async_save` to /dev/shm at the same intervals: the wall time
     of building the state dict plus the async_save() call, and iteration time;
  4. `Snapshotter.restore_latest()` of the full state (same layout: with --fsdp2 the local
     shards), after a bit-exact check of the restore.

It starts its own tesserad (store under /dev/shm, socket in a temporary directory) and stops it
before the DCP phases, so that the two never share /dev/shm or the PCIe link.

    # on the GPU machine, with a bundle of tesserad and libtessera.so (../shared/tools/gpu-bundle)
    source BUNDLE/env.sh
    TESSERAD=BUNDLE/bin/tesserad TESSERA_LIBRARY=BUNDLE/lib/libtessera.so \\
        python3 examples/compare_gpu.py
    # or: examples/compare_gpu.sh BUNDLE [args]
    # FSDP2, every 1, 5 and 10 steps against DCP with pinned staging (torch >= 2.4):
    #     examples/compare_gpu.sh BUNDLE --fsdp2 --intervals 1,5,10 --budget-s 300

    # a smoke run on the CPU (DCP phases report themselves unavailable on PyTorch 1.13)
    TESSERAD=$PWD/bazel-bin/daemon/tesserad TESSERA_LIBRARY=$PWD/bazel-bin/agent/libtessera.so \\
        python3 examples/compare_gpu.py --tiny

With --fsdp2 (PyTorch >= 2.4; it exits with status 2 at once on an older one): the default
process group of one process (backend "cpu:gloo,cuda:nccl" on a GPU, so that FSDP's collectives
run on NCCL and DCP's on gloo; "gloo" on the CPU) serves FSDP and DCP and is destroyed at the
end; a 1-D DeviceMesh of size 1; `fully_shard` on each block, then on the root (which holds the
embeddings, the tied head and the final norm: tied parameters must share one FSDP unit), before
AdamW is created over the parameters, which are then DTensors. The Snapshotter registers their
local shards; DCP saves get_state_dict()'s DTensors; the restore check compares local shards.

How things are measured:

* Iteration time is the wall time from the start of an iteration (forward, backward, optimizer
  step, then the snapshot or save call) to the end of a synchronize of the *compute stream*
  (`torch.cuda.current_stream().synchronize()`). Not `torch.cuda.synchronize()`: that waits for
  every stream of the device, Tessera's background copy stream included, and would charge the
  snapshot's whole device-to-host copy to the iteration that started it. What Tessera does cost
  the compute stream (the optimizer step waiting on the copy: the fence) is in the measured time.
* Overhead is mean iteration time against the baseline's mean, over windows of whole snapshot
  intervals whose first step snapshots (so every snapshot's after-effects fall in the window).
  The median is printed too; at every 10 steps it hides the snapshot steps.
* Blocked time is `time.perf_counter()` around the snapshot call, without any synchronize: for
  Tessera `Snapshotter.step()`; for DCP, building the state dict
  (`torch.distributed.checkpoint.state_dict.get_state_dict`, else `state_dict()`s) plus the
  `async_save()` call, which stages the whole state to CPU memory before it returns.
* DCP: each save must complete (`future.result()`) before the next one is issued. The wait, if
  the previous save is still writing, happens on the training thread just before the next save,
  and is counted in that iteration's time (and shown as "waited"). A window ends by waiting for
  its last save, as the next save would have; that drain is added to the window's total.
  A process group of world size 1 (file:// rendezvous) is initialised for DCP: gloo, or with
  --fsdp2 the one FSDP uses.
* DCP staging (--dcp-staging): "plain" is async_save's own copy to pageable CPU memory at every
  save; "pinned" is FileSystemWriter(cache_staged_state_dict=True), pinned CPU buffers allocated
  at the first save and reused (TorchTitan's async_with_pinned_mem). The chosen staging runs at
  every interval (default plain; pinned with --fsdp2); the other one runs as one extra row at
  the longest interval, only when 60 s of the budget are left and not with --no-dcp-extra.
  --no-dcp-cached means no pinned row at all (plain everywhere, no extra row).
* Tessera runs with its default when_busy="skip": a snapshot requested while the previous one is
  still being copied or sealed is skipped (counted in the table).

Phases run from the longest interval down (the every-10 rows, the goal's, first). The whole run
keeps to --budget-s (default 225 s): the DCP phases stop at a save boundary when the next save
cycle would not fit, and say so. Each phase is guarded: an error is printed and the next phase
runs. Progress lines carry timestamps, and each phase prints its row as it ends, so a run cut
short still tells what it measured. The run ends with the table of every row, then one line
per interval: Tessera against DCP, blocked and overhead, and the ratio of blocked times.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "agent" / "python"))
import tessera  # noqa: E402
import tessera.torch  # noqa: E402
# A DTensor's local shard, as the Snapshotter registers it (the tensor itself for a plain one).
from tessera import _dtensor  # noqa: E402
from tessera._dtensor import local as local_shard  # noqa: E402

GOAL_BLOCK_MS = 1.0
GOAL_OVERHEAD_PCT_AT_10 = 1.0
ISSUE_DCP_BLOCK_S = 14.8
ISSUE_DCP_SLOWDOWN_AT_10 = 12.0

T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:6.1f}s] {message}", flush=True)


def elapsed() -> float:
    return time.perf_counter() - T0


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


# -- model -----------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention (flash attention where PyTorch has
    scaled_dot_product_attention) and an MLP of `mlp_ratio` x width."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, device: torch.device) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width, device=device)
        self.qkv = nn.Linear(width, 3 * width, device=device)
        self.proj = nn.Linear(width, width, device=device)
        self.ln2 = nn.LayerNorm(width, device=device)
        self.fc = nn.Linear(width, mlp_ratio * width, device=device)
        self.out = nn.Linear(mlp_ratio * width, width, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        if hasattr(F, "scaled_dot_product_attention"):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # PyTorch < 2.0
            att = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            y = att.masked_fill(~causal, float("-inf")).softmax(dim=-1) @ v
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Token and position embeddings, blocks, and a head tied to the token embedding (as in
    examples/train_gpt.py, without dropout, built directly on the device)."""

    def __init__(self, vocab: int, seq: int, width: int, layers: int, heads: int, mlp_ratio: int,
                 device: torch.device) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width, device=device)
        self.pos = nn.Embedding(seq, width, device=device)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, device) for _ in range(layers))
        self.ln = nn.LayerNorm(width, device=device)
        self.head = nn.Linear(width, vocab, bias=False, device=device)
        self.head.weight = self.tok.weight
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    module.weight.normal_(0.0, 0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    module.bias.zero_()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


class Trainer:
    """The model, AdamW, a few pre-made synthetic batches, and a global step counter.

    `shard`, when given, wraps the model (FSDP2) before the optimizer is created, so that AdamW
    holds the wrapped parameters (DTensors) and its state is made of DTensors too."""

    def __init__(self, args: argparse.Namespace, device: torch.device,
                 shard: Optional[Callable[["GPT"], None]] = None) -> None:
        self.args = args
        self.device = device
        torch.manual_seed(args.seed)
        self.model = GPT(args.vocab, args.seq, args.width, args.layers, args.heads,
                         args.mlp_ratio, device)
        if shard is not None:
            shard(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                           weight_decay=0.1)
        gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
        self.batches = []
        for _ in range(4):
            seq = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
            self.batches.append((seq[:, :-1].to(device), seq[:, 1:].to(device)))
        self.step = 0  # the next step's number; snapshot steps must increase across phases
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()

    def train_step(self) -> None:
        x, y = self.batches[self.step % len(self.batches)]
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            logits = self.model(x)
        loss = F.cross_entropy(logits.float().view(-1, self.args.vocab), y.reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def iteration(self, after: Optional[Callable[[int], Any]] = None) -> Tuple[float, Any]:
        """One step; `after(step)` runs after the optimizer step (the snapshot call). Returns the
        iteration's wall time (to the end of a compute-stream synchronize) and after's result."""
        start = time.perf_counter()
        self.train_step()
        result = after(self.step) if after is not None else None
        self.sync()
        seconds = time.perf_counter() - start
        self.step += 1
        return seconds, result

    def align(self, every: int, after: Optional[Callable[[int], Any]] = None) -> None:
        """Runs unmeasured iterations until the next step is a multiple of `every` (`after` never
        snapshots on them: their steps are not multiples)."""
        while self.step % every != 0:
            self.iteration(after)

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        """Every model and optimizer tensor, by name (the tied head weight once), as this rank
        holds it: a DTensor's local shard (FSDP2), the memory the Snapshotter registers. A
        DTensor has no storage of its own, so sizes, data_ptr and torch.equal go to the shard."""
        named: Dict[str, torch.Tensor] = {}
        seen = set()
        for k, t in self.model.state_dict().items():
            t = local_shard(t)
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            named[f"model.{k}"] = t
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            for k, v in self.optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    named[f"optim.{i}.{k}"] = local_shard(v)
        return named


# -- tesserad --------------------------------------------------------------------------------------


class Daemon:
    """Our own tesserad: store in /dev/shm/<tmp>, socket in a temporary directory."""

    def __init__(self, binary: str, capacity_bytes: int) -> None:
        self.binary = binary
        self.store = tempfile.mkdtemp(prefix="tessera-cmp-", dir="/dev/shm")
        self.socket_dir = tempfile.mkdtemp(prefix="tsr")  # socket paths are limited to 107 bytes
        self.socket = os.path.join(self.socket_dir, "agent.sock")
        self.log_path = os.path.join(self.socket_dir, "tesserad.log")
        self.capacity_bytes = capacity_bytes
        self.process: Optional[subprocess.Popen] = None

    def start(self, timeout_s: float = 30.0) -> None:
        log_file = open(self.log_path, "ab")
        try:  # loaded here: the child, forked from a threaded process, only makes the call
            libc: Any = ctypes.CDLL("libc.so.6", use_errno=True)
        except OSError:
            libc = None

        def die_with_parent() -> None:  # SIGTERM the daemon if this script dies first
            if libc is not None:
                libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG

        self.process = subprocess.Popen(
            [self.binary, "--set", "node.id=cmp", "--set", f"store.directory={self.store}",
             "--set", f"agent.socket_path={self.socket}",
             "--set", f"store.capacity_bytes={self.capacity_bytes}"],
            stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        log_file.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tesserad exited with {self.process.returncode} at start:\n"
                                   + self.log_tail())
            if os.path.exists(self.socket) and b" ready" in Path(self.log_path).read_bytes():
                return
            time.sleep(0.02)
        raise RuntimeError(f"tesserad not ready in {timeout_s} s:\n" + self.log_tail())

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> Optional[int]:
        code = None
        if self.process is not None:
            process, self.process = self.process, None
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            code = process.returncode
        shutil.rmtree(self.store, ignore_errors=True)
        shutil.rmtree(self.socket_dir, ignore_errors=True)
        return code


def find_tesserad() -> Optional[str]:
    for candidate in (os.environ.get("TESSERAD"), shutil.which("tesserad"),
                      str(REPO / "bazel-bin" / "daemon" / "tesserad")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


# -- results ---------------------------------------------------------------------------------------


@dataclass
class Row:
    method: str
    interval: str
    iter_s: List[float] = field(default_factory=list)
    blocked_s: List[float] = field(default_factory=list)
    extra_s: float = 0.0  # time added to the window's total (DCP: the final drain)
    started: Optional[int] = None
    skipped: Optional[int] = None
    snaps_label: Optional[str] = None  # overrides the "snapshots in window" cell
    notes: List[str] = field(default_factory=list)
    error: Optional[str] = None

    def mean_s(self) -> Optional[float]:
        if not self.iter_s:
            return None
        return (sum(self.iter_s) + self.extra_s) / len(self.iter_s)

    def median_s(self) -> Optional[float]:
        return statistics.median(self.iter_s) if self.iter_s else None


def fmt_ms(seconds: Optional[float], digits: int = 3) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    if ms >= 1000:
        return f"{ms:,.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.{digits}f}"


def overhead_pct(row: Row, baseline: Optional[Row]) -> Optional[float]:
    if baseline is None or baseline.mean_s() is None or row.mean_s() is None:
        return None
    return (row.mean_s() / baseline.mean_s() - 1.0) * 100.0


def row_line(row: Row, baseline: Optional[Row]) -> str:
    if row.error is not None and not row.iter_s:
        return f"| {row.method} | {row.interval} | - | - | - | - | - | - | error: {row.error} |"
    blocked_med = statistics.median(row.blocked_s) if row.blocked_s else None
    blocked_max = max(row.blocked_s) if row.blocked_s else None
    ovh = overhead_pct(row, baseline)
    if row.snaps_label is not None:
        snaps = row.snaps_label
    elif row.started is not None:
        snaps = f"{row.started}" + (f" (+{row.skipped} skipped)" if row.skipped else "")
    else:
        snaps = str(len(row.blocked_s)) if row.blocked_s else "0"
    notes = "; ".join(row.notes + ([f"error: {row.error}"] if row.error else []))
    return (f"| {row.method} | {row.interval} | {snaps} | {fmt_ms(blocked_med)} | "
            f"{fmt_ms(blocked_max)} | "
            f"{f'{fmt_ms(row.median_s(), 1)} ({len(row.iter_s)} it)' if row.iter_s else '-'} | "
            f"{fmt_ms(row.mean_s(), 1)} | {'-' if ovh is None else f'{ovh:+.1f}%'} | {notes} |")


TESSERA = "Tessera Snapshotter"
DCP_PLAIN = "DCP async_save -> /dev/shm"
DCP_PINNED = "DCP async_save, cache_staged_state_dict=True (pinned, reused)"

TABLE_HEADER = ("| method | interval | snapshots in window | blocked ms/snapshot (median) | "
                "blocked ms (max) | iteration ms (median) | iteration ms (mean) | "
                "overhead vs baseline (mean) | notes |\n"
                "|---|---|---|---|---|---|---|---|---|")


DCP_STAGING = {DCP_PLAIN: "plain staging", DCP_PINNED: "pinned staging"}


def find_row(rows: List[Row], method: str, interval: str) -> Optional[Row]:
    """The row of `method` at `interval`: a measured one before one that only failed."""
    matches = [r for r in rows if r.method == method and r.interval == interval]
    return next((r for r in matches if r.iter_s), matches[0] if matches else None)


def blocked_ratio(dcp: Optional[Row], tessera: Optional[Row]) -> Optional[float]:
    """DCP's median blocked time over Tessera's."""
    if dcp is None or tessera is None or not dcp.blocked_s or not tessera.blocked_s:
        return None
    tessera_s = statistics.median(tessera.blocked_s)
    return statistics.median(dcp.blocked_s) / tessera_s if tessera_s > 0 else None


def fmt_ratio(ratio: Optional[float]) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:,.1f}x" if ratio < 10 else f"{ratio:,.0f}x"


def is_partial(row: Row) -> bool:
    return any(note.startswith("PARTIAL") for note in row.notes)


COMPARISON_HEADER = ("| interval | Tessera blocked ms/snapshot (median / max) | Tessera overhead | "
                     "DCP async_save | DCP blocked ms/save (median / max) | DCP overhead | "
                     "blocked, DCP / Tessera (medians) |\n"
                     "|---|---|---|---|---|---|---|")


def comparison_lines(rows: List[Row], baseline: Optional[Row], intervals: List[int],
                     dcp_methods: List[str]) -> List[str]:
    """One line per interval and DCP row: Tessera against DCP, blocked and overhead."""

    def blocked(row: Optional[Row]) -> str:
        if row is None:
            return "not run"
        if not row.blocked_s:
            return "error" if row.error else "-"
        return f"{fmt_ms(statistics.median(row.blocked_s))} / {fmt_ms(max(row.blocked_s))}"

    def overhead(row: Optional[Row]) -> str:
        ovh = overhead_pct(row, baseline) if row is not None else None
        return "-" if ovh is None else f"{ovh:+.1f}%"

    lines = [COMPARISON_HEADER]
    for every in intervals:
        interval = interval_label(every)
        tessera = find_row(rows, TESSERA, interval)
        dcps = [r for r in (find_row(rows, m, interval) for m in dcp_methods) if r is not None]
        for dcp in dcps or [None]:
            which = "not run" if dcp is None else DCP_STAGING.get(dcp.method, dcp.method)
            if dcp is not None and is_partial(dcp):
                which += " (partial window)"
            lines.append(f"| {interval} | {blocked(tessera)} | {overhead(tessera)} | {which} | "
                         f"{blocked(dcp)} | {overhead(dcp)} | "
                         f"{fmt_ratio(blocked_ratio(dcp, tessera))} |")
    return lines


def verdict_lines(rows: List[Row], baseline: Optional[Row], intervals: List[int],
                  dcp_methods: List[str]) -> List[str]:
    """Whether Tessera blocked at least 100x less than DCP and cost less overhead at every 10
    steps, against each DCP row measured there."""
    claim = "at least 100x less blocking and lower overhead at every 10 steps"
    if 10 not in intervals:
        return [f"- {claim}: not measured (10 is not in --intervals)"]
    tessera = find_row(rows, TESSERA, "every 10")
    tessera_ovh = overhead_pct(tessera, baseline) if tessera is not None else None
    lines = []
    for method in dcp_methods:
        dcp = find_row(rows, method, "every 10")
        if dcp is None:
            continue
        against = f"against DCP with {DCP_STAGING.get(method, method)}"
        ratio = blocked_ratio(dcp, tessera)
        dcp_ovh = overhead_pct(dcp, baseline)
        if tessera is None or ratio is None or tessera_ovh is None or dcp_ovh is None:
            lines.append(f"- {claim}, {against}: not measured (a row is missing or failed)")
            continue
        held = ratio >= 100 and tessera_ovh < dcp_ovh
        worst = statistics.median(dcp.blocked_s) / max(tessera.blocked_s)
        lines.append(
            f"- {claim}, {against}: {'HELD' if held else 'NOT HELD'} in this run: blocked "
            f"{fmt_ms(statistics.median(tessera.blocked_s))} ms vs "
            f"{fmt_ms(statistics.median(dcp.blocked_s))} ms (medians), {fmt_ratio(ratio)} "
            f"(DCP's median over Tessera's max: {fmt_ratio(worst)}); overhead "
            f"{tessera_ovh:+.1f}% vs {dcp_ovh:+.1f}%"
            + ("; DCP's window was cut short by the budget" if is_partial(dcp) else ""))
    return lines or [f"- {claim}: not measured (no DCP row at every 10)"]


# -- phases ----------------------------------------------------------------------------------------


def phase_baseline(trainer: Trainer, iters: int, warmup: int) -> Row:
    row = Row("baseline (no snapshots)", "-")
    for _ in range(warmup):
        trainer.iteration()
    for _ in range(iters):
        row.iter_s.append(trainer.iteration()[0])
    return row


def round_up(n: int, every: int) -> int:
    return max(every, -(-n // every) * every)


def interval_label(every: int) -> str:
    return "every step" if every == 1 else f"every {every}"


def phase_tessera(trainer: Trainer, snap: "tessera.torch.Snapshotter", every: int, iters: int,
                  warmup: int) -> Row:
    row = Row(TESSERA, interval_label(every))
    snap.every = every

    def hook(step: int) -> Optional[Tuple[float, bool]]:
        if step % every != 0:
            return None
        start = time.perf_counter()
        started = snap.step(step)
        return time.perf_counter() - start, started

    # Warm up with at least one snapshot, let it seal, then start the window on a snapshot step.
    snapshots_in_warmup = 0
    limit = warmup + 3 * every + 3
    while snapshots_in_warmup == 0 or warmup > 0:
        _, r = trainer.iteration(hook)
        snapshots_in_warmup += 1 if r is not None and r[1] else 0
        warmup -= 1
        limit -= 1
        if limit == 0:
            raise RuntimeError(f"no snapshot started in the warm-up: stats {snap.stats()}")
    if every > 1:
        snap.wait()
        trainer.align(every, hook)
    before = snap.stats()
    iters = round_up(iters, every)
    for _ in range(iters):
        seconds, r = trainer.iteration(hook)
        row.iter_s.append(seconds)
        if r is not None and r[1]:
            row.blocked_s.append(r[0])
    after = snap.stats()
    row.started = after.started - before.started
    row.skipped = after.skipped - before.skipped
    if after.failed != before.failed:
        row.notes.append(f"{after.failed - before.failed} snapshots FAILED")
    if after.busy_waits != before.busy_waits:
        row.notes.append(f"busy waits {after.busy_waits - before.busy_waits}")
    t = time.perf_counter()
    snap.wait()
    row.notes.append(f"last snapshot sealed {fmt_ms(time.perf_counter() - t, 1)} ms after the "
                     "window")
    return row


def pick_reference(trainer: Trainer, all_tensors: bool) -> Dict[str, torch.Tensor]:
    named = trainer.state_tensors()
    if all_tensors:
        return named
    keys = list(named)
    model_keys = [k for k in keys if k.startswith("model.")]
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    mid = len(params) // 2
    picks = [model_keys[0], model_keys[len(model_keys) // 2], model_keys[-1]]
    picks += [k for k in keys if k.startswith(f"optim.{mid}.")]
    picks += [k for k in keys if k.startswith(f"optim.{len(params) - 1}.")]
    return {k: named[k] for k in picks}


def phase_restore(trainer: Trainer, snap: "tessera.torch.Snapshotter", repeats: int,
                  verify_all: bool, what: str = "full state") -> Tuple[Row, str]:
    """Snapshot one step S, copy the reference state, train on, restore_latest(), compare; then
    time further restores."""
    row = Row("Tessera restore_latest()", what)
    snap.wait()
    trainer.iteration()
    step = trainer.step - 1
    t = time.perf_counter()
    started = snap.snapshot(step)
    blocked = time.perf_counter() - t
    if not started:
        raise RuntimeError(f"the snapshot of step {step} was skipped")
    reference = {k: v.detach().clone() for k, v in pick_reference(trainer, verify_all).items()}
    rng_cpu = torch.get_rng_state()
    rng_cuda = torch.cuda.get_rng_state(trainer.device) if trainer.cuda else None
    trainer.sync()
    snap.wait()
    sealed = time.perf_counter() - t
    row.notes.append(f"snapshot alone (no training): call {fmt_ms(blocked)} ms, sealed after "
                     f"{fmt_ms(sealed, 1)} ms")
    for _ in range(2):
        trainer.iteration()
    live = trainer.state_tensors()
    changed = sum(1 for k, v in reference.items() if not torch.equal(v, live[k]))
    torch.manual_seed(12345)  # move the RNGs away from the snapshot's state too

    restore_s = []
    verdict = "not checked"
    for i in range(max(1, repeats)):
        t = time.perf_counter()
        restored = snap.restore_latest()
        trainer.sync()
        restore_s.append(time.perf_counter() - t)
        if i == 0:
            live = trainer.state_tensors()
            mismatched = [k for k, v in reference.items() if not torch.equal(v, live[k])]
            rng_ok = torch.equal(torch.get_rng_state(), rng_cpu) and (
                rng_cuda is None or torch.equal(torch.cuda.get_rng_state(trainer.device), rng_cuda))
            ok = restored == step and not mismatched and rng_ok
            verdict = (
                f"{'PASS' if ok else 'FAIL'}: restore_latest() returned step {restored} "
                f"(snapshot step {step}); {len(reference) - len(mismatched)}/{len(reference)} "
                f"tensors bit-exact (torch.equal){' (every model and optimizer tensor)' if verify_all else ''}"
                f", {changed} of them had changed in the 2 steps trained after the snapshot; "
                f"RNG states {'restored' if rng_ok else 'NOT restored'}"
                + (f"; mismatched: {', '.join(mismatched[:5])}" if mismatched else ""))
            log("restore check: " + verdict)
    del reference
    row.blocked_s = restore_s  # shown in the blocked columns: restore is a blocking call
    row.snaps_label = f"{len(restore_s)} restores of {gb(sum(t.numel() * t.element_size() for t in live.values()))}"
    row.notes.append(f"restore ms: {', '.join(fmt_ms(s, 1) for s in restore_s)}")
    # the model trains on from the restored step; later snapshot steps must increase
    trainer.step = max(trainer.step, step + 1)
    return row, verdict


def phase_reshard_load(trainer: Trainer, socket_path: str, job_id: str) -> Tuple[Row, str]:
    """The newest snapshot (the FSDP2 state as phase_restore left it) loaded through
    `tessera.dcp.SnapshotReader` into the same GPT unsharded (plain tensors on the GPU, DCP's
    no_dist load): a restore into another layout, timed and compared tensor by tensor with the
    FSDP2 model's state (at world 1 its local shards are whole)."""
    import types

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import tessera.dcp

    row = Row("tessera.dcp.SnapshotReader, dcp.load", "into the unsharded GPT (resharded)")
    a = trainer.args
    torch.manual_seed(a.seed + 99)
    plain = GPT(a.vocab, a.seq, a.width, a.layers, a.heads, a.mlp_ratio, trainer.device)
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                  weight_decay=0.1)
    model_sd, optim_sd = get_state_dict(plain, optimizer)  # creates AdamW's state to load into
    sd = {"model": model_sd, "optim": optim_sd}
    t = time.perf_counter()
    dcp.load(sd, storage_reader=tessera.dcp.SnapshotReader(job_id, socket_path=socket_path),
             no_dist=True)
    set_state_dict(plain, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    trainer.sync()
    seconds = time.perf_counter() - t
    want = trainer.state_tensors()
    got = Trainer.state_tensors(types.SimpleNamespace(model=plain, optimizer=optimizer))  # type: ignore[arg-type]
    mismatched = [k for k, v in want.items() if k not in got or not torch.equal(v, got[k])]
    verdict = (f"{'PASS' if not mismatched and len(got) == len(want) else 'FAIL'}: "
               f"{len(want) - len(mismatched)}/{len(want)} tensors of the unsharded model and "
               "its AdamW bit-exact with the FSDP2 state"
               + (f"; mismatched: {', '.join(mismatched[:5])}" if mismatched else ""))
    log("resharded load check: " + verdict)
    row.blocked_s = [seconds]
    row.snaps_label = f"1 load of {gb(sum(v.numel() * v.element_size() for v in got.values()))}"
    row.notes.append(f"read through the ranged reader while the trainer stays registered; {verdict}")
    del plain, optimizer, sd, model_sd, optim_sd, got
    if trainer.cuda:
        torch.cuda.empty_cache()
    return row, verdict


class DcpSaver:
    """async_save with one save in flight at most: the next save first waits for the previous."""

    def __init__(self, dcp: Any, trainer: Trainer, path: str, cached: bool) -> None:
        self.dcp = dcp
        self.trainer = trainer
        self.path = path
        self.pending: Optional[Future] = None
        self.issued_at = 0.0
        self.done_at: Optional[float] = None
        self.last_write_s: Optional[float] = None  # issue to completion of the last save
        self.first_cycle_s = 0.0  # the warm-up save, issue to completion
        self.writer = None
        if cached:
            self.writer = dcp.FileSystemWriter(path, cache_staged_state_dict=True)
        self.get_state_dict: Optional[Callable[..., Any]] = None
        try:
            from torch.distributed.checkpoint.state_dict import get_state_dict
            self.get_state_dict = get_state_dict
        except ImportError:
            pass
        self.warmed_up = False

    def state_dict(self) -> Dict[str, Any]:
        """What a DCP user saves: torch.distributed.checkpoint.state_dict.get_state_dict (FQN-keyed
        optimizer state), else plain state_dict()s."""
        model, optimizer = self.trainer.model, self.trainer.optimizer
        if self.get_state_dict is not None:
            try:
                model_sd, optim_sd = self.get_state_dict(model, optimizer)
                return {"model": model_sd, "optim": optim_sd}
            except Exception as e:
                log(f"get_state_dict failed ({e!r}); using model/optimizer.state_dict() instead")
                self.get_state_dict = None
        return {"model": model.state_dict(), "optim": optimizer.state_dict()}

    def wait_previous(self) -> float:
        if self.pending is None:
            return 0.0
        t = time.perf_counter()
        self.pending.result()
        self.pending = None
        return time.perf_counter() - t

    def save(self) -> Tuple[float, float, float]:
        """Returns (waited for the previous save, state dict, async_save call) in seconds."""
        waited = self.wait_previous()
        t1 = time.perf_counter()
        sd = self.state_dict()
        t2 = time.perf_counter()
        kwargs: Dict[str, Any] = {"checkpoint_id": self.path}
        if self.writer is not None:
            kwargs["storage_writer"] = self.writer
        ret = self.dcp.async_save(sd, **kwargs)
        if hasattr(ret, "upload_completion"):  # AsyncSaveResponse (PyTorch >= 2.9, async stager)
            ret.staging_completion.result()  # training must not run on before staging is done
            ret = ret.upload_completion
        t3 = time.perf_counter()
        self.issued_at = t3
        self.done_at = None

        def done(_: Future) -> None:
            self.done_at = time.perf_counter()
            self.last_write_s = self.done_at - self.issued_at

        ret.add_done_callback(done)
        self.pending = ret
        return waited, t2 - t1, t3 - t2


def phase_dcp(trainer: Trainer, saver: DcpSaver, every: int, iters: int, label: str,
              budget_end: float) -> Row:
    row = Row(label, interval_label(every))
    waits: List[float] = []
    sd_s: List[float] = []
    call_s: List[float] = []

    def hook(step: int) -> Optional[Tuple[float, float, float]]:
        return saver.save() if step % every == 0 else None

    # Warm-up: a few iterations and, once per saver, one save (first-time costs: thread pool,
    # planner, writer; pinned buffers when cached), completed before the window.
    for _ in range(2):
        trainer.iteration()
    if not saver.warmed_up:
        t = time.perf_counter()
        w, s, c = saver.save()
        first_block = s + c
        saver.wait_previous()
        saver.first_cycle_s = time.perf_counter() - t
        saver.warmed_up = True
        row.notes.append(f"warm-up save: blocked {fmt_ms(first_block, 1)} ms, complete after "
                         f"{fmt_ms(saver.first_cycle_s, 1)} ms")
        log(f"{label} {row.interval}: warm-up save blocked {first_block:.2f} s, done after "
            f"{saver.first_cycle_s:.2f} s")
    trainer.align(every)
    iters = round_up(iters, every)
    cycle_estimate = saver.first_cycle_s + every * 0.2
    last_iter = 0.2
    for i in range(iters):
        if trainer.step % every == 0 and i > 0:
            remaining = budget_end - time.perf_counter()
            if remaining < cycle_estimate + 5.0:
                row.notes.append(f"PARTIAL: stopped after {i} of {iters} iterations (budget: "
                                 f"{remaining:.0f} s left, a save cycle takes ~{cycle_estimate:.0f} s)")
                log(f"{label} {row.interval}: stopping early for the time budget")
                break
        seconds, r = trainer.iteration(hook)
        row.iter_s.append(seconds)
        if r is not None:
            w, s, c = r
            waits.append(w)
            sd_s.append(s)
            call_s.append(c)
            row.blocked_s.append(s + c)
            cycle_estimate = s + c + max(w, saver.last_write_s or 0.0) + every * last_iter
            log(f"{label} {row.interval}: save at step {trainer.step - 1}: waited {w:.2f} s for "
                f"the previous, state dict {s * 1e3:.1f} ms, async_save() {c:.2f} s")
        else:
            last_iter = seconds
    t = time.perf_counter()
    saver.wait_previous()
    row.extra_s = time.perf_counter() - t
    if sd_s:
        row.notes.append(f"blocked = state dict {fmt_ms(statistics.median(sd_s), 1)} ms + "
                         f"async_save() {fmt_ms(statistics.median(call_s), 1)} ms (medians)")
        row.notes.append(f"waited for previous save: median {fmt_ms(statistics.median(waits), 1)}"
                         f" ms, max {fmt_ms(max(waits), 1)} ms; final drain "
                         f"{fmt_ms(row.extra_s, 1)} ms (in the mean)")
    if saver.last_write_s is not None:
        row.notes.append(f"a save completes {fmt_ms(saver.last_write_s, 1)} ms after async_save() "
                         "returns")
    return row


# -- FSDP2 and the process group -----------------------------------------------------------------


def fsdp2_api() -> Tuple[Callable[..., Any], Callable[..., Any]]:
    """This torch's (fully_shard, init_device_mesh); RuntimeError saying what is missing."""
    need = (f"--fsdp2 needs PyTorch >= 2.4 (fully_shard, DeviceMesh, DTensor); this is torch "
            f"{torch.__version__}")
    version = re.match(r"(\d+)\.(\d+)", torch.__version__)
    if version is None or (int(version.group(1)), int(version.group(2))) < (2, 4):
        raise RuntimeError(need)
    import torch.distributed as dist
    if not dist.is_available():
        raise RuntimeError(f"{need}, built without torch.distributed")
    try:
        from torch.distributed.device_mesh import init_device_mesh
        try:
            from torch.distributed.fsdp import fully_shard  # torch >= 2.6
        except ImportError:
            from torch.distributed._composable.fsdp import fully_shard  # torch 2.4, 2.5
    except ImportError as e:
        raise RuntimeError(f"{need}: {e}") from e
    if not _dtensor.available():
        raise RuntimeError(f"{need}: tessera finds no DTensor in it")
    return fully_shard, init_device_mesh


class WorldOfOne:
    """The default process group of this one process (rank 0, world 1), file:// rendezvous in a
    temporary directory. `close` destroys it, unless it was there before."""

    def __init__(self, backend: str) -> None:
        import torch.distributed as dist
        self.created = False
        self.rendezvous_dir: Optional[str] = None
        if dist.is_initialized():
            try:
                self.backend = str(dist.get_backend())
            except Exception:
                self.backend = "(initialised before this script)"
            return
        self.backend = backend
        self.rendezvous_dir = tempfile.mkdtemp(prefix="tsr-pg-")
        try:
            dist.init_process_group(backend, init_method=f"file://{self.rendezvous_dir}/rendezvous",
                                    rank=0, world_size=1)
        except BaseException:
            shutil.rmtree(self.rendezvous_dir, ignore_errors=True)
            raise
        self.created = True

    def close(self) -> None:
        import torch.distributed as dist
        if self.created:
            self.created = False
            try:
                dist.destroy_process_group()
            except Exception as e:
                log(f"destroy_process_group failed: {e!r}")
        if self.rendezvous_dir is not None:
            shutil.rmtree(self.rendezvous_dir, ignore_errors=True)
            self.rendezvous_dir = None


class Fsdp2:
    """FSDP2 over a 1-D mesh of one device: `fully_shard` on each block, then on the root, whose
    unit holds the rest (embeddings, the tied head, the final norm: tied parameters must be in
    one unit)."""

    def __init__(self, device: torch.device) -> None:
        self.fully_shard, init_device_mesh = fsdp2_api()
        self.mesh = init_device_mesh(device.type, (1,))
        self.tied: Optional[bool] = None
        self.dtensors = ""

    def shard(self, model: GPT) -> None:
        for block in model.blocks:
            self.fully_shard(block, mesh=self.mesh)
        self.fully_shard(model, mesh=self.mesh)
        params = list(model.parameters())
        self.dtensors = f"{sum(map(_dtensor.is_dtensor, params))} of {len(params)}"
        self.tied = model.head.weight is model.tok.weight
        if not self.tied:
            log("WARNING: after fully_shard the head weight is no longer the token embedding's")


# -- main ------------------------------------------------------------------------------------------


def parse_intervals(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"expected snapshot intervals in steps, comma-separated (e.g. 1,5,10), got {text!r}")
    return list(dict.fromkeys(values))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--mlp-ratio", type=int, default=2,
                   help="MLP hidden = ratio x width. 2 gives the issue's ~0.8B parameters and "
                        "~9.7 GB of state at 24x2048; 4 (GPT-2's) gives 1.23B and 14.7 GB")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--fsdp2", action="store_true",
                   help="train the model under FSDP2 (fully_shard per block, then the root) in a "
                        "world of one process; needs PyTorch >= 2.4")
    p.add_argument("--intervals", type=parse_intervals, default=[10, 1],
                   help="snapshot intervals in steps, comma-separated, for Tessera and DCP alike "
                        "(default 10,1); run from the longest down")
    p.add_argument("--iters", type=int, default=40,
                   help="measured iterations: baseline, and Tessera at each interval above 1, "
                        "rounded up to whole intervals (every step: half)")
    p.add_argument("--dcp-iters", type=int, default=20,
                   help="measured iterations, DCP at each interval above 1 (rounded up to whole "
                        "intervals)")
    p.add_argument("--dcp-step-iters", type=int, default=5,
                   help="measured iterations, DCP every step (each save blocks for seconds)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up iterations per phase")
    p.add_argument("--restores", type=int, default=3, help="timed restore_latest() calls")
    p.add_argument("--budget-s", type=float, default=225.0,
                   help="wall-clock budget of the whole run; DCP phases stop early to keep it")
    p.add_argument("--capacity", default=None,
                   help="tesserad store.capacity_bytes (default: 3x the state, at least 1GiB)")
    p.add_argument("--dcp-staging", choices=("plain", "pinned"), default=None,
                   help="DCP's staging at every interval: plain (async_save's own copy to "
                        "pageable memory) or pinned (FileSystemWriter(cache_staged_state_dict="
                        "True): pinned buffers, reused; TorchTitan's). Default plain, pinned "
                        "with --fsdp2. The other one runs as an extra row at the longest interval "
                        "when 60 s of the budget are left")
    p.add_argument("--no-dcp-extra", action="store_true",
                   help="skip the extra DCP row of the other staging")
    p.add_argument("--no-dcp-cached", action="store_true",
                   help="no DCP row with cache_staged_state_dict=True at all: plain staging at "
                        "every interval and no extra row")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tiny", action="store_true", help="a small model for a CPU smoke run")
    if "--tiny" in sys.argv[1:]:  # defaults only: flags given explicitly still win
        p.set_defaults(layers=2, width=64, heads=4, vocab=256, batch=4, seq=32, iters=20,
                       dcp_iters=20, dcp_step_iters=4)
    args = p.parse_args()
    if args.no_dcp_cached:
        if args.dcp_staging == "pinned":
            p.error("--no-dcp-cached contradicts --dcp-staging pinned")
        args.dcp_staging = "plain"
        args.no_dcp_extra = True
    if args.dcp_staging is None:
        args.dcp_staging = "pinned" if args.fsdp2 else "plain"
    return args


def main() -> int:
    args = parse_args()
    # SIGTERM (a timeout) unwinds through the finally blocks: the daemon is stopped, /dev/shm freed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    gpu = torch.cuda.get_device_name(device) if cuda else "none (CPU run)"
    log(f"start: GPU {gpu}; torch {torch.__version__}"
        f"{f' (CUDA {torch.version.cuda})' if cuda else ''}; Python {platform.python_version()}; "
        f"host {platform.node()}")
    if not args.fsdp2:
        return compare(args, device, gpu, None, None)

    # FSDP2: one process group for FSDP and DCP, made before the model, destroyed at the end.
    try:
        fsdp2_api()
    except RuntimeError as e:
        log(f"ERROR: {e}")
        return 2
    world: Optional[WorldOfOne] = None
    try:
        try:
            world = WorldOfOne("cpu:gloo,cuda:nccl" if cuda else "gloo")
            fsdp = Fsdp2(device)
        except Exception as e:
            traceback.print_exc()
            log(f"ERROR: FSDP2 setup (process group, DeviceMesh) failed: {e!r}")
            return 1
        log(f"FSDP2: process group {world.backend}, world 1; DeviceMesh {device.type} (1,)")
        return compare(args, device, gpu, fsdp, world)
    finally:
        if world is not None:
            world.close()


def compare(args: argparse.Namespace, device: torch.device, gpu: str, fsdp: Optional[Fsdp2],
            world: Optional[WorldOfOne]) -> int:
    """Every phase, then the table. With `fsdp`, the model is sharded and `world` (its process
    group) serves DCP too."""
    budget_end = T0 + args.budget_s
    cuda = device.type == "cuda"
    intervals: List[int] = args.intervals
    order = sorted(intervals, reverse=True)  # the longest interval first: the goal's rows
    layout = ("FSDP2 (fully_shard), world 1: each block, then the root (embeddings, tied head, "
              f"final norm); process group {world.backend if world else '-'}, DeviceMesh "
              f"{device.type} (1,); parameters and AdamW state are DTensors, compared and "
              "measured by their local shards" if fsdp is not None else
              "plain module, one process (no FSDP)")

    try:
        trainer = Trainer(args, device, fsdp.shard if fsdp is not None else None)
    except Exception as e:
        if fsdp is not None:  # nothing to compare without the model: say why, then fail
            log(f"ERROR: the model could not be built under FSDP2 (fully_shard): {e!r}")
        raise
    n_params = sum(p.numel() for p in trainer.model.parameters())
    log(f"model: {args.layers} blocks x width {args.width}, {args.heads} heads, MLP {args.mlp_ratio}x, "
        f"vocab {args.vocab} (tied head), seq {args.seq}, batch {args.batch} "
        f"({args.batch * args.seq} tokens/step); {n_params / 1e6:.1f}M parameters; AdamW, bf16 "
        f"autocast, {'flash/SDPA' if hasattr(F, 'scaled_dot_product_attention') else 'manual'} "
        "attention")
    if fsdp is not None:
        log(f"layout: {layout}; parameters that are DTensors: {fsdp.dtensors}; head tied to the "
            f"token embedding after fully_shard: {fsdp.tied}")
    for _ in range(2):  # creates the AdamW state
        trainer.iteration()
    state = trainer.state_tensors()
    state_bytes = sum(t.numel() * t.element_size() for t in state.values())
    n_state = len(state)
    param_bytes = sum(local_shard(p).numel() * p.element_size()
                      for p in trainer.model.parameters())
    log(f"state: {gb(state_bytes)} in {len(state)} tensors (params fp32 "
        f"{gb(param_bytes)} + AdamW moments and steps)"
        + (f"; GPU memory allocated {gb(torch.cuda.memory_allocated(device))}" if cuda else ""))
    try:
        shm = shutil.disk_usage("/dev/shm")
        log(f"/dev/shm: {gb(shm.free)} free of {gb(shm.total)} (Tessera needs ~2x the state, DCP "
            "~1x; they run one after the other)")
        if shm.free < 2.1 * state_bytes:
            log("WARNING: /dev/shm may be too small for Tessera's two slots")
    except OSError:
        pass
    del state

    rows: List[Row] = []
    header: List[str] = [
        f"GPU: {gpu}; torch {torch.__version__}; Python {platform.python_version()}",
        f"model: {args.layers} blocks x {args.width}, MLP {args.mlp_ratio}x, {args.heads} heads, "
        f"vocab {args.vocab}, batch {args.batch} x {args.seq} tokens, bf16 autocast, AdamW: "
        f"{n_params / 1e6:.1f}M parameters, state {gb(state_bytes)} ({state_bytes:,} bytes) in "
        f"{n_state} tensors",
        f"layout: {layout}",
        f"intervals: {', '.join(interval_label(e) for e in intervals)}, for Tessera and DCP alike",
    ]
    baseline: Optional[Row] = None
    verdict = "not run"

    def finish(row: Row) -> None:
        rows.append(row)
        log("row: " + row_line(row, baseline))

    # 1. baseline
    log("phase: baseline")
    try:
        baseline = phase_baseline(trainer, args.iters, args.warmup)
        finish(baseline)
    except Exception as e:
        traceback.print_exc()
        log(f"baseline FAILED: {e!r}")

    # 2. Tessera
    daemon: Optional[Daemon] = None
    snap = None
    try:
        binary = find_tesserad()
        if binary is None:
            raise RuntimeError("tesserad not found: set TESSERAD (or put it on PATH)")
        capacity = args.capacity or str(max(1 << 30, 3 * state_bytes))
        daemon = Daemon(binary, capacity)
        atexit.register(daemon.stop)
        daemon.start()
        log(f"tesserad {binary} ready (store {daemon.store}, capacity {capacity} bytes)")
        t = time.perf_counter()
        snap = tessera.torch.Snapshotter(trainer.model, trainer.optimizer, job_id="compare_gpu",
                                         rank=0, world_size=1, every=order[0],
                                         socket_path=daemon.socket)
        register_s = time.perf_counter() - t
        stats = snap.stats()
        log(f"Snapshotter registered in {register_s:.2f} s (two slots of the state, pre-faulted"
            f"{' and pinned' if stats.has_gpu else ''}); library {tessera.library_path()}, "
            f"GPU copy engine: {stats.has_gpu}")
        header.append(f"Tessera: library {tessera.library_version()}, GPU copy engine "
                      f"{stats.has_gpu}, registration {register_s:.2f} s")
        if fsdp is not None:
            placed = len(snap.dtensor_layout())
            log(f"Snapshotter: {placed} DTensors registered by their local shards")
            header[-1] += f", {placed} DTensors registered by their local shards"
    except Exception as e:
        traceback.print_exc()
        log(f"Tessera setup FAILED: {e!r}")
        if daemon is not None:
            log("tesserad log:\n" + daemon.log_tail())
        rows.append(Row(TESSERA, "-", error=repr(e)))

    if snap is not None:
        for every in order:
            iters = args.iters if every > 1 else max(4, args.iters // 2)
            log(f"phase: Tessera {interval_label(every)}")
            try:
                finish(phase_tessera(trainer, snap, every, iters, args.warmup))
            except Exception as e:
                traceback.print_exc()
                log(f"Tessera every {every} FAILED: {e!r}\n" + (daemon.log_tail() if daemon else ""))
                rows.append(Row(TESSERA, interval_label(every), error=repr(e)))
        log("phase: restore and bit-exact check")
        what = "full state" if fsdp is None else "full state, same layout (FSDP2 local shards)"
        try:
            verify_all = True
            if cuda:
                free, _ = torch.cuda.mem_get_info(device)
                verify_all = free > 1.3 * state_bytes
            row, verdict = phase_restore(trainer, snap, args.restores, verify_all, what)
            finish(row)
        except Exception as e:
            traceback.print_exc()
            verdict = f"FAIL: {e!r}"
            log(f"restore FAILED: {e!r}")
            rows.append(Row("Tessera restore_latest()", what, error=repr(e)))
        if fsdp is not None and daemon is not None:
            log("phase: the FSDP2 snapshot loaded unsharded through tessera.dcp.SnapshotReader")
            try:
                row, reshard_verdict = phase_reshard_load(trainer, str(daemon.socket),
                                                          "compare_gpu")
                finish(row)
                header.append(f"resharded load check: {reshard_verdict}")
            except Exception as e:
                traceback.print_exc()
                log(f"resharded load FAILED: {e!r}")
                rows.append(Row("tessera.dcp.SnapshotReader, dcp.load",
                                "into the unsharded GPT (resharded)", error=repr(e)))
        try:
            snap.close(drop=True)
        except Exception as e:
            log(f"Snapshotter.close failed: {e!r}")
    if daemon is not None:
        code = daemon.stop()
        log(f"tesserad stopped (exit {code}); its /dev/shm store removed")
    snap = None

    # Drift check: the baseline again, shortly.
    try:
        again = phase_baseline(trainer, max(5, args.iters // 4), 1)
        header.append(f"baseline re-measured after the Tessera phases: mean "
                      f"{fmt_ms(again.mean_s(), 1)} ms, median {fmt_ms(again.median_s(), 1)} ms "
                      f"({len(again.iter_s)} it; drift check)")
        log(header[-1])
    except Exception as e:
        log(f"baseline re-measure failed: {e!r}")

    # 3. DCP async_save: the chosen staging at every interval, the other as an extra row at the
    # longest interval when the budget leaves time.
    pinned = args.dcp_staging == "pinned"
    plans = [(every, args.dcp_step_iters if every == 1 else args.dcp_iters, pinned, False)
             for every in order]
    if not args.no_dcp_extra:
        plans.append((order[0], args.dcp_step_iters if order[0] == 1 else args.dcp_iters,
                      not pinned, True))
    dcp_methods = [DCP_PINNED if pinned else DCP_PLAIN]
    if not args.no_dcp_extra:
        dcp_methods.append(DCP_PLAIN if pinned else DCP_PINNED)
    header.append(f"DCP staging: {DCP_STAGING[dcp_methods[0]]} at every interval"
                  + (f", {DCP_STAGING[dcp_methods[1]]} as an extra row at "
                     f"{interval_label(order[0])} when the budget leaves 60 s"
                     if len(dcp_methods) > 1 else "")
                  + "; pinned = FileSystemWriter(cache_staged_state_dict=True), TorchTitan's "
                  "async_with_pinned_mem")
    dcp = None
    dcp_missing = None
    try:
        import torch.distributed.checkpoint as dcp  # noqa: F811
        if not hasattr(dcp, "async_save"):
            dcp_missing = (f"not available in this PyTorch ({torch.__version__} has "
                           "torch.distributed.checkpoint but no async_save)")
            dcp = None
    except ImportError:
        dcp_missing = (f"not available in this PyTorch ({torch.__version__} has no "
                       "torch.distributed.checkpoint)")
    if dcp is None:
        log(f"DCP async_save: {dcp_missing}")
        for every in order:
            rows.append(Row(dcp_methods[0], interval_label(every), error=dcp_missing))
    else:
        dcp_root = tempfile.mkdtemp(prefix="dcp-cmp-", dir="/dev/shm")
        atexit.register(shutil.rmtree, dcp_root, True)
        own_world: Optional[WorldOfOne] = None
        try:
            dcp_world = world
            if dcp_world is None:
                dcp_world = own_world = WorldOfOne("gloo")
            log(f"DCP: process group {dcp_world.backend}, world 1; checkpoints in {dcp_root}")
            savers: Dict[bool, DcpSaver] = {}
            for every, iters, cached, extra in plans:
                label = DCP_PINNED if cached else DCP_PLAIN
                interval = interval_label(every)
                if extra and budget_end - time.perf_counter() < 60:
                    log(f"skipping {label}: {budget_end - time.perf_counter():.0f} s of budget left")
                    continue
                if budget_end - time.perf_counter() < 20:
                    log(f"skipping {label} {interval}: the time budget is spent")
                    rows.append(Row(label, interval, error="skipped: time budget spent"))
                    continue
                log(f"phase: {label} {interval}")
                saver = savers.get(cached)
                try:
                    if saver is None:
                        saver = DcpSaver(dcp, trainer, os.path.join(dcp_root, "ckpt"), cached)
                        savers[cached] = saver
                    finish(phase_dcp(trainer, saver, every, iters, label, budget_end))
                except Exception as e:
                    traceback.print_exc()
                    log(f"{label} {interval} FAILED: {e!r}")
                    rows.append(Row(label, interval, error=repr(e)))
                    if saver is not None:
                        try:
                            saver.wait_previous()
                        except Exception:
                            pass
        except Exception as e:
            traceback.print_exc()
            log(f"DCP setup FAILED: {e!r}")
            rows.append(Row(dcp_methods[0], "-", error=repr(e)))
        finally:
            if own_world is not None:
                own_world.close()
            shutil.rmtree(dcp_root, ignore_errors=True)

    # 4. The table.
    print(flush=True)
    print("## Tessera vs torch.distributed.checkpoint.async_save"
          + (", FSDP2 (fully_shard), world 1" if fsdp is not None else "")
          + f", torch {torch.__version__}", flush=True)
    print(flush=True)
    for line in header:
        print(f"- {line}", flush=True)
    tess10 = next((r for r in rows if r.method == TESSERA
                   and r.interval == "every 10" and r.iter_s), None)
    tess_all_blocked = [s for r in rows if r.method == TESSERA for s in r.blocked_s]
    if tess_all_blocked:
        med, mx = statistics.median(tess_all_blocked), max(tess_all_blocked)
        print(f"- goal: blocking < {GOAL_BLOCK_MS:g} ms per snapshot -> measured median "
              f"{fmt_ms(med)} ms, max {fmt_ms(mx)} ms over {len(tess_all_blocked)} snapshots: "
              f"{'MET' if mx < GOAL_BLOCK_MS / 1e3 else ('MET at the median, not at the max' if med < GOAL_BLOCK_MS / 1e3 else 'NOT MET')}",
              flush=True)
    else:
        print(f"- goal: blocking < {GOAL_BLOCK_MS:g} ms per snapshot -> not measured", flush=True)
    ovh = overhead_pct(tess10, baseline) if tess10 else None
    print(f"- goal: overhead <= {GOAL_OVERHEAD_PCT_AT_10:g}% at every 10 steps -> measured "
          + ("not measured" if ovh is None else
             f"{ovh:+.1f}%: {'MET' if ovh <= GOAL_OVERHEAD_PCT_AT_10 else 'NOT MET'}"), flush=True)
    dcp10 = next((r for r in rows if r.method == DCP_PLAIN
                  and r.interval == "every 10" and r.iter_s), None)
    if dcp10 is not None and dcp10.blocked_s and baseline is not None and baseline.mean_s():
        print(f"- issue's DCP figures: {ISSUE_DCP_BLOCK_S} s blocked per save, "
              f"{ISSUE_DCP_SLOWDOWN_AT_10:g}x slower iterations at every 10 -> measured "
              f"{statistics.median(dcp10.blocked_s):.2f} s blocked (median), "
              f"{dcp10.mean_s() / baseline.mean_s():.2f}x", flush=True)
    print(f"- restore check: {verdict}", flush=True)
    print("- iteration time: wall time to the end of a compute-stream synchronize; overhead from "
          "the mean over whole intervals (DCP: plus the final wait for its last save); blocked: "
          "perf_counter around the snapshot call (DCP: state dict + async_save())", flush=True)
    print(flush=True)
    print(TABLE_HEADER, flush=True)
    for row in rows:
        print(row_line(row, baseline), flush=True)
    print(flush=True)
    print("### Per interval: Tessera against DCP async_save", flush=True)
    print(flush=True)
    for line in comparison_lines(rows, baseline, intervals, dcp_methods):
        print(line, flush=True)
    print(flush=True)
    for line in verdict_lines(rows, baseline, intervals, dcp_methods):
        print(line, flush=True)
    print(flush=True)
    log(f"done in {elapsed():.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
