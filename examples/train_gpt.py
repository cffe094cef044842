#!/usr/bin/env python3
"""A small GPT trained on synthetic data, protected by Tessera.

Kill it at any moment and start it again: it resumes from the newest snapshot the local tesserad
holds, and the loss curve continues exactly as if nothing had happened (same seed, same batches,
the same losses to the last bit: each step prints its loss with float.hex()).

    # one process, on the CPU
    TESSERA_SOCKET=/run/tessera/agent.sock python3 examples/train_gpt.py --steps 200

    # two ranks with torchrun (gloo on the CPU, nccl on GPUs), killed at step 57, launched again:
    # the ranks resume from their snapshots (TESSERA_JOB_ID keeps the job id across launches)
    export TESSERA_JOB_ID=gpt-demo
    torchrun --standalone --nproc_per_node 2 examples/train_gpt.py --steps 200 --kill-at-step 57
    torchrun --standalone --nproc_per_node 2 examples/train_gpt.py --steps 200

--kill-at-step applies to a first attempt only, so torchrun's own --max_restarts can bring the
ranks back too (it did with PyTorch 1.13; PyTorch 2.11's in-place restart of a gloo group failed
to reconnect in our runs). PyTorch 1.13's torchrun on Python 3.11 needs --redirects 1 --tee 1:
it mis-parses its defaults there.

The data depend on every piece of state Tessera restores: the sequence pattern comes from Python's
`random`, the offsets from NumPy's RNG, the noise from torch's generator, a cursor from the user
dict, and dropout from torch's (or CUDA's) generator. Leave any of them out of a restore and the
curve diverges.

Needs the tessera package on PYTHONPATH (agent/python) and libtessera.so (TESSERA_LIBRARY, or a
Bazel build of this tree).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "agent" / "python"))
import tessera.torch  # noqa: E402


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and an MLP."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = self.drop(att.masked_fill(~causal, float("-inf")).softmax(dim=-1))
        y = (att @ v).transpose(1, 2).reshape(b, t, c)
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))


class GPT(nn.Module):
    """Token and position embeddings, blocks, and a head tied to the token embedding."""

    def __init__(self, vocab: int, seq_len: int, width: int, depth: int, heads: int,
                 dropout: float) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(depth))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tok.weight
        self.drop = nn.Dropout(dropout)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def make_batch(args: argparse.Namespace, user: Dict[str, Any],
               device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sequences x[t] = start + cursor + a*t (mod vocab) with 5% noise tokens."""
    a = random.randrange(1, args.vocab)
    starts = torch.from_numpy(np.random.randint(0, args.vocab, size=args.batch)).long()
    t = torch.arange(args.seq_len + 1)
    seq = (starts[:, None] + user["cursor"] + a * t[None, :]) % args.vocab
    noise = torch.randint(0, args.vocab, seq.shape)
    seq = torch.where(torch.rand(seq.shape) < 0.05, noise, seq)
    user["cursor"] = (user["cursor"] + args.batch) % args.vocab
    user["samples"] += args.batch
    return seq[:, :-1].to(device), seq[:, 1:].to(device)


def lr_at(args: argparse.Namespace, step: int) -> float:
    """Linear warmup, then cosine decay to 10%."""
    warmup = max(1, args.steps // 10)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def rng_states() -> Dict[str, Any]:
    states: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def dump(path: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         user: Dict[str, Any]) -> None:
    """Saves everything a snapshot holds, for tests that compare bit for bit."""
    torch.save({
        "step": step,
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "rng": rng_states(),
        "user": copy.deepcopy(user),
    }, path)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100, help="total optimizer steps")
    p.add_argument("--every", type=int, default=10, help="snapshot interval in steps")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=2, help="transformer blocks")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--batch", type=int, default=8, help="sequences per rank and step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    p.add_argument("--when-busy", choices=("skip", "wait"), default="skip")
    p.add_argument("--socket", default=None, help="tesserad's agent socket (TESSERA_SOCKET)")
    p.add_argument("--job-id", default=None, help="default: TESSERA_JOB_ID, else 'train_gpt'")
    p.add_argument("--kill-at-step", type=int, default=-1,
                   help="SIGKILL this process at the end of step K (after that step's snapshot "
                        "call, so a snapshot of K may be in flight); only in a first attempt "
                        "(TORCHELASTIC_RESTART_COUNT unset or 0)")
    p.add_argument("--kill-rank", type=int, default=-1, help="only this rank kills (-1: all)")
    p.add_argument("--dump-dir", default=None,
                   help="save the full state at each snapshot step and after a restore, and "
                        "append each step's loss to rankR_losses.txt (tests)")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device_kind = args.device
    if device_kind == "auto":
        device_kind = "cuda" if torch.cuda.is_available() else "cpu"
    if device_kind == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model: nn.Module = GPT(args.vocab, args.seq_len, args.width, args.depth, args.heads,
                           args.dropout).to(device)
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device_kind == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=0.1)
    # Each rank draws its own batches and dropout masks.
    data_seed = args.seed * 1000 + rank + 1
    random.seed(data_seed)
    np.random.seed(data_seed)
    torch.manual_seed(data_seed)
    user = {"cursor": 0, "samples": 0}

    # Not torchrun's run id: --standalone draws a new one per launch, and a relaunch would then
    # find nothing to resume.
    job_id = args.job_id or os.environ.get("TESSERA_JOB_ID") or "train_gpt"
    snapshotter = tessera.torch.Snapshotter(model, optimizer, job_id=job_id, every=args.every,
                                            socket_path=args.socket, user_state=user,
                                            when_busy=args.when_busy)
    restored = snapshotter.restore_latest()
    start = 0 if restored is None else restored + 1
    print(f"rank {rank}: " + ("fresh start" if restored is None else
                              f"resumed from step {restored}"), flush=True)
    dump_dir = Path(args.dump_dir) if args.dump_dir else None
    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
        if restored is not None:
            dump(dump_dir / f"rank{rank}_restored{restored}.pt", restored, model, optimizer, user)

    restart_count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    model.train()
    for step in range(start, args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(args, step)
        x, y = make_batch(args, user, device)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, args.vocab), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        line = f"step {step} rank {rank} loss {loss.item().hex()}"
        print(line, flush=True)
        if dump_dir is not None:
            # Whole lines in a file of the rank's own, for tests: torchrun's --tee interleaves the
            # ranks' output and may split a line.
            with open(dump_dir / f"rank{rank}_losses.txt", "a") as losses:
                losses.write(line + "\n")
        snapshotter.step(step)
        if dump_dir is not None and step % args.every == 0:
            dump(dump_dir / f"rank{rank}_step{step}.pt", step, model, optimizer, user)
        if (step == args.kill_at_step and restart_count == 0
                and args.kill_rank in (-1, rank)):
            os.kill(os.getpid(), signal.SIGKILL)

    snapshotter.wait()
    stats = snapshotter.stats()
    print(f"rank {rank}: done; snapshots started {stats.started}, sealed {stats.sealed}, "
          f"skipped {stats.skipped}", flush=True)
    if dump_dir is not None:
        dump(dump_dir / f"rank{rank}_final.pt", args.steps - 1, model, optimizer, user)
    snapshotter.close()
    if world_size > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
