#!/usr/bin/env python3
"""Tessera against torch.distributed.checkpoint.async_save on one GPU: one comparison table.

A GPT-style model (default 24 blocks of width 2048, MLP 2x width: 0.82B parameters, 9.9 GB of
fp32 weights plus AdamW moments) trains on synthetic tokens under bf16 autocast. Measured, each
phase after warm-up iterations:

  1. iteration time without snapshots (the baseline);
  2. Tessera (`tessera.torch.Snapshotter`) every 10 steps and every step: the wall time of the
     snapshot call on the training thread, and iteration time against the baseline;
  3. `torch.distributed.checkpoint.async_save` to /dev/shm every 10 steps and every step: the wall
     time of building the state dict plus the async_save() call, and iteration time;
  4. `Snapshotter.restore_latest()` of the full state, after a bit-exact check of the restore.

It starts its own tesserad (store under /dev/shm, socket in a temporary directory) and stops it
before the DCP phases, so that the two never share /dev/shm or the PCIe link.

    # on the GPU machine, with a bundle of tesserad and libtessera.so (../shared/tools/gpu-bundle)
    source BUNDLE/env.sh
    TESSERAD=BUNDLE/bin/tesserad TESSERA_LIBRARY=BUNDLE/lib/libtessera.so \\
        python3 examples/compare_gpu.py
    # or: examples/compare_gpu.sh BUNDLE [args]

    # a smoke run on the CPU (DCP phases report themselves unavailable on PyTorch 1.13)
    TESSERAD=$PWD/bazel-bin/daemon/tesserad TESSERA_LIBRARY=$PWD/bazel-bin/agent/libtessera.so \\
        python3 examples/compare_gpu.py --tiny

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
  A process group of world size 1 (gloo, file:// rendezvous) is initialised for DCP.
* Tessera runs with its default when_busy="skip": a snapshot requested while the previous one is
  still being copied or sealed is skipped (counted in the table).

The whole run keeps to --budget-s (default 225 s): the DCP phases stop at a save boundary when
the next save cycle would not fit, and say so. Each phase is guarded: an error is printed and the
next phase runs. Progress lines carry timestamps, and each phase prints its row as it ends, so a
run cut short still tells what it measured.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import math
import os
import platform
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
    """The model, AdamW, a few pre-made synthetic batches, and a global step counter."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args = args
        self.device = device
        torch.manual_seed(args.seed)
        self.model = GPT(args.vocab, args.seq, args.width, args.layers, args.heads,
                         args.mlp_ratio, device)
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
        """Every model and optimizer tensor, by name (the tied head weight once)."""
        named: Dict[str, torch.Tensor] = {}
        seen = set()
        for k, t in self.model.state_dict().items():
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            named[f"model.{k}"] = t
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            for k, v in self.optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    named[f"optim.{i}.{k}"] = v
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


TABLE_HEADER = ("| method | interval | snapshots in window | blocked ms/snapshot (median) | "
                "blocked ms (max) | iteration ms (median) | iteration ms (mean) | "
                "overhead vs baseline (mean) | notes |\n"
                "|---|---|---|---|---|---|---|---|---|")


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


def phase_tessera(trainer: Trainer, snap: "tessera.torch.Snapshotter", every: int, iters: int,
                  warmup: int) -> Row:
    row = Row("Tessera Snapshotter", f"every {every}" if every > 1 else "every step")
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
                  verify_all: bool) -> Tuple[Row, str]:
    """Snapshot one step S, copy the reference state, train on, restore_latest(), compare; then
    time further restores."""
    row = Row("Tessera restore_latest()", "full state")
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
    row = Row(label, f"every {every}" if every > 1 else "every step")
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


# -- main ------------------------------------------------------------------------------------------


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
    p.add_argument("--iters", type=int, default=40,
                   help="measured iterations: baseline and Tessera every 10 (every step: half)")
    p.add_argument("--dcp-iters", type=int, default=20, help="measured iterations, DCP every 10")
    p.add_argument("--dcp-step-iters", type=int, default=5,
                   help="measured iterations, DCP every step (each save blocks for seconds)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up iterations per phase")
    p.add_argument("--restores", type=int, default=3, help="timed restore_latest() calls")
    p.add_argument("--budget-s", type=float, default=225.0,
                   help="wall-clock budget of the whole run; DCP phases stop early to keep it")
    p.add_argument("--capacity", default=None,
                   help="tesserad store.capacity_bytes (default: 3x the state, at least 1GiB)")
    p.add_argument("--no-dcp-cached", action="store_true",
                   help="skip the extra DCP row with cache_staged_state_dict=True (pinned, "
                        "reused staging buffers; run only when the budget leaves time)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tiny", action="store_true", help="a small model for a CPU smoke run")
    if "--tiny" in sys.argv[1:]:  # defaults only: flags given explicitly still win
        p.set_defaults(layers=2, width=64, heads=4, vocab=256, batch=4, seq=32, iters=20,
                       dcp_iters=20, dcp_step_iters=4)
    return p.parse_args()


def main() -> int:
    args = parse_args()
    budget_end = T0 + args.budget_s
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

    trainer = Trainer(args, device)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    log(f"model: {args.layers} blocks x width {args.width}, {args.heads} heads, MLP {args.mlp_ratio}x, "
        f"vocab {args.vocab} (tied head), seq {args.seq}, batch {args.batch} "
        f"({args.batch * args.seq} tokens/step); {n_params / 1e6:.1f}M parameters; AdamW, bf16 "
        f"autocast, {'flash/SDPA' if hasattr(F, 'scaled_dot_product_attention') else 'manual'} "
        "attention")
    for _ in range(2):  # creates the AdamW state
        trainer.iteration()
    state = trainer.state_tensors()
    state_bytes = sum(t.numel() * t.element_size() for t in state.values())
    n_state = len(state)
    log(f"state: {gb(state_bytes)} in {len(state)} tensors (params fp32 "
        f"{gb(sum(p.numel() * p.element_size() for p in trainer.model.parameters()))} + AdamW "
        "moments and steps)"
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
                                         rank=0, world_size=1, every=10,
                                         socket_path=daemon.socket)
        register_s = time.perf_counter() - t
        stats = snap.stats()
        log(f"Snapshotter registered in {register_s:.2f} s (two slots of the state, pre-faulted"
            f"{' and pinned' if stats.has_gpu else ''}); library {tessera.library_path()}, "
            f"GPU copy engine: {stats.has_gpu}")
        header.append(f"Tessera: library {tessera.library_version()}, GPU copy engine "
                      f"{stats.has_gpu}, registration {register_s:.2f} s")
    except Exception as e:
        traceback.print_exc()
        log(f"Tessera setup FAILED: {e!r}")
        if daemon is not None:
            log("tesserad log:\n" + daemon.log_tail())
        rows.append(Row("Tessera Snapshotter", "-", error=repr(e)))

    if snap is not None:
        for every, iters in ((10, args.iters), (1, max(4, args.iters // 2))):
            log(f"phase: Tessera {'every 10' if every > 1 else 'every step'}")
            try:
                finish(phase_tessera(trainer, snap, every, iters, args.warmup))
            except Exception as e:
                traceback.print_exc()
                log(f"Tessera every {every} FAILED: {e!r}\n" + (daemon.log_tail() if daemon else ""))
                rows.append(Row("Tessera Snapshotter", f"every {every}", error=repr(e)))
        log("phase: restore and bit-exact check")
        try:
            verify_all = True
            if cuda:
                free, _ = torch.cuda.mem_get_info(device)
                verify_all = free > 1.3 * state_bytes
            row, verdict = phase_restore(trainer, snap, args.restores, verify_all)
            finish(row)
        except Exception as e:
            traceback.print_exc()
            verdict = f"FAIL: {e!r}"
            log(f"restore FAILED: {e!r}")
            rows.append(Row("Tessera restore_latest()", "full state", error=repr(e)))
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

    # 3. DCP async_save
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
        for interval in ("every 10", "every step"):
            rows.append(Row("DCP async_save -> /dev/shm", interval, error=dcp_missing))
    else:
        import torch.distributed as dist
        dcp_root = tempfile.mkdtemp(prefix="dcp-cmp-", dir="/dev/shm")
        atexit.register(shutil.rmtree, dcp_root, True)
        initialized_here = False
        try:
            if not dist.is_initialized():
                dist.init_process_group("gloo", init_method=f"file://{dcp_root}/pg-rendezvous",
                                        rank=0, world_size=1)
                initialized_here = True
            log(f"DCP: process group gloo, world 1; checkpoints in {dcp_root}")
            plans = [(10, args.dcp_iters, False), (1, args.dcp_step_iters, False)]
            if not args.no_dcp_cached:
                plans.append((10, args.dcp_iters, True))
            savers: Dict[bool, DcpSaver] = {}
            for every, iters, cached in plans:
                label = ("DCP async_save -> /dev/shm" if not cached else
                         "DCP async_save, cache_staged_state_dict=True (pinned, reused)")
                interval = "every 10" if every > 1 else "every step"
                if cached and budget_end - time.perf_counter() < 60:
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
            rows.append(Row("DCP async_save -> /dev/shm", "-", error=repr(e)))
        finally:
            if initialized_here:
                try:
                    dist.destroy_process_group()
                except Exception:
                    pass
            shutil.rmtree(dcp_root, ignore_errors=True)

    # 4. The table.
    print(flush=True)
    print("## Tessera vs torch.distributed.checkpoint.async_save", flush=True)
    print(flush=True)
    for line in header:
        print(f"- {line}", flush=True)
    tess10 = next((r for r in rows if r.method == "Tessera Snapshotter"
                   and r.interval == "every 10" and r.iter_s), None)
    tess_all_blocked = [s for r in rows if r.method == "Tessera Snapshotter" for s in r.blocked_s]
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
    dcp10 = next((r for r in rows if r.method == "DCP async_save -> /dev/shm"
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
    log(f"done in {elapsed():.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
