"""One member of a data-parallel group for test_dp.py, as its own process.

    dp_worker.py train  --rank R --world N --seed S [--device cpu|cuda|cuda:each] [--group list|dist]
    dp_worker.py verify --rank R --world N --seed S [--device cpu|cuda|cuda:each] [--group list|dist]

(cuda:each puts member R on GPU R: one GPU per member, as on a real node.)

(TESSERA_SOCKET and TESSERA_JOB_ID set; with --group dist also --init-method.)

Every member builds the same model and Adam optimizer from the same seed, and trains on the same
batches, so their parameters and optimizer state are replicated bit for bit, as under data
parallelism; a buffer (updated in the forward pass, as batch-norm statistics are), the RNG states
and the user dict differ per rank. `train` snapshots every step (Snapshotter with dp_group: each
member stores 1/N of the replicated bytes) until it is killed, printing

    layout {"replicated_bytes": ..., "whole_bytes": ..., ...}     once registered
    copied BYTES_COPIED SEALED                                   at rest, after step 2
    sealed STEP BYTES_COPIED SEALED                              as snapshots seal

`verify` builds everything from other seeds, calls restore_latest() (every member together),
then replays the training from the seed up to the restored step in this process and asserts
that parameters, optimizer state, the rank's buffer, RNG states and user dict are bit-exact,
and that one more step continues identically. It prints

    restored STEP
    stats {"dp_size": ..., "gathered_with_nccl": ..., "bytes_gathered": ..., ...}
    verified STEP

and exits 1 with the first difference otherwise.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import sys
import time
from dataclasses import asdict
from typing import Any, Dict, Tuple

import numpy as np
import torch
import torch.nn as nn

import tessera
import tessera.torch
from helpers import assert_bit_equal

BATCH = 16
# Odd sizes: the DP slices' boundaries fall inside tensors, not between them.
DIMS = (384, 800, 520, 96)
BUFFER_ELEMENTS = 1000


class Net(nn.Module):
    """An MLP with a per-rank buffer that the forward pass updates from the global RNG (it never
    feeds the output, so the gradients stay identical on every member)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(DIMS, DIMS[1:]))
        self.register_buffer("rank_state", torch.empty(BUFFER_ELEMENTS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            noise = torch.randn(BUFFER_ELEMENTS, device=self.rank_state.device)
            self.rank_state.mul_(0.5).add_(noise)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = torch.tanh(x)
        return x


def seed_rank(seed: int, rank: int) -> None:
    """The per-rank RNG streams: they make the buffer, the RNG states and the user dict differ."""
    torch.manual_seed(seed * 7919 + rank + 1)
    random.seed(seed * 104729 + rank)
    np.random.seed((seed * 31 + rank) % (1 << 32))


def build(seed: int, rank: int, device: torch.device) -> Tuple[Net, torch.optim.Optimizer]:
    """The replicated model (from `seed` alone) and its optimizer; then the rank's RNG streams,
    from which its buffer starts."""
    torch.manual_seed(seed)
    model = Net().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-7)
    seed_rank(seed, rank)
    with torch.no_grad():
        model.rank_state.copy_(torch.randn(BUFFER_ELEMENTS, device=device))
    return model, optimizer


def batch(seed: int, step: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The step's batch: the same on every member (its own generator, not the global RNG)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(BATCH, DIMS[0], generator=gen)
    y = torch.randn(BATCH, DIMS[-1], generator=gen)
    return x.to(device), y.to(device)


# Steps before this one skip optimizer.step(), as a GradScaler skips the steps whose gradients
# overflow (often the first ones): their snapshots hold no optimizer state (--first-optimizer-step).
FIRST_OPTIMIZER_STEP = 0


def train_step(model: Net, optimizer: torch.optim.Optimizer, seed: int, step: int,
               user: Dict[str, Any], device: torch.device) -> None:
    x, y = batch(seed, step, device)
    loss = (model(x) - y).square().mean()
    optimizer.zero_grad()
    loss.backward()
    if step >= FIRST_OPTIMIZER_STEP:
        optimizer.step()
    user["step"] = step
    user["token"] = bytes(random.getrandbits(8) for _ in range(24))
    user["noise"] = float(np.random.standard_normal())


def full_state(model: Net, optimizer: torch.optim.Optimizer, user: Dict[str, Any],
               device: torch.device) -> Dict[str, Any]:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": [torch.get_rng_state(), random.getstate(), np.random.get_state()],
        "user": dict(user),
    }
    if device.type == "cuda":
        state["rng"].append(torch.cuda.get_rng_state(device))
    return copy.deepcopy(state)


def get_rng(device: torch.device) -> Tuple[Any, ...]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), random.getstate(), np.random.get_state(), cuda


def set_rng(rng: Tuple[Any, ...], device: torch.device) -> None:
    torch.set_rng_state(rng[0])
    random.setstate(rng[1])
    np.random.set_state(rng[2])
    if device.type == "cuda":
        torch.cuda.set_rng_state(rng[3], device)


def layout(snapshotter: tessera.torch.Snapshotter) -> Dict[str, int]:
    """The registered bytes: replicated (parameters, optimizer state) and whole (buffer, blob
    capacities), from the registration itself."""
    registered = snapshotter._registered
    assert registered is not None
    parameters = {f"model.{k}" for k, _ in snapshotter.model.named_parameters()}
    replicated = whole = 0
    for entry in snapshotter._client.entries:
        if entry.name in parameters or entry.name.startswith("optim."):
            replicated += entry.nbytes
        else:
            whole += entry.nbytes
    return {"replicated_bytes": replicated, "whole_bytes": whole,
            "entries": len(snapshotter._client.entries)}


def dp_group(args: argparse.Namespace) -> Any:
    if args.group == "list":
        return list(range(args.world))
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=args.init_method, rank=args.rank,
                            world_size=args.world)
    return dist.new_group(list(range(args.world)))


def train(args: argparse.Namespace, device: torch.device) -> int:
    group = dp_group(args)
    model, optimizer = build(args.seed, args.rank, device)
    user: Dict[str, Any] = {"rank": args.rank, "step": -1, "token": b"", "noise": 0.0}
    snapshotter = tessera.torch.Snapshotter(
        model, optimizer, rank=args.rank, world_size=args.world, every=1, user_state=user,
        when_busy="wait", dp_group=group)
    if snapshotter.restore_latest() is not None:
        print("error: a fresh job restored a snapshot", flush=True)
        return 1
    sealed = -1
    for step in range(args.steps):
        train_step(model, optimizer, args.seed, step, user, device)
        snapshotter.step(step)
        if step == 0:
            print("layout " + json.dumps(layout(snapshotter)), flush=True)
        if step == 2:
            # Counters read while a snapshot seals may count its bytes but not yet its seal: read
            # them once at rest.
            snapshotter.wait()
            stats = snapshotter.stats()
            print(f"copied {stats.bytes_copied} {stats.sealed}", flush=True)
        stats = snapshotter.stats()
        if stats.failed:
            print(f"error: a snapshot failed: {stats}", flush=True)
            return 1
        if stats.last_sealed_step is not None and stats.last_sealed_step > sealed:
            sealed = stats.last_sealed_step
            print(f"sealed {sealed} {stats.bytes_copied} {stats.sealed}", flush=True)
        time.sleep(args.step_sleep_ms / 1000)
    print(f"error: trained all {args.steps} steps without being killed", flush=True)
    return 1


def verify(args: argparse.Namespace, device: torch.device) -> int:
    group = dp_group(args)
    # Everything from other seeds, and an optimizer state of its own (never zeros; none with
    # --first-optimizer-step, as in a relaunch before that step): the restore must overwrite
    # every byte.
    model, optimizer = build(args.seed + 12345, args.rank + 100, device)
    user: Dict[str, Any] = {"rank": -1, "step": -1, "token": b"unrestored", "noise": 1.5}
    train_step(model, optimizer, args.seed + 12345, 0, user, device)
    snapshotter = tessera.torch.Snapshotter(
        model, optimizer, rank=args.rank, world_size=args.world, every=1, user_state=user,
        when_busy="wait", dp_group=group)
    step = snapshotter.restore_latest()
    print(f"restored {step}", flush=True)
    stats = snapshotter.stats()
    print("stats " + json.dumps(asdict(stats)), flush=True)
    if step is None:
        return 1
    restored = full_state(model, optimizer, user, device)

    # The reference: the same training replayed from the seed, in this process.
    ref_model, ref_optimizer = build(args.seed, args.rank, device)
    ref_user: Dict[str, Any] = {"rank": args.rank, "step": -1, "token": b"", "noise": 0.0}
    for s in range(step + 1):
        train_step(ref_model, ref_optimizer, args.seed, s, ref_user, device)
    expected = full_state(ref_model, ref_optimizer, ref_user, device)
    assert_bit_equal(expected, restored, f"rank {args.rank} step {step}")

    # Training goes on identically (hyperparameters and Adam's step count came back too), each
    # from the RNG states as restored (the replay left them there; they were just compared).
    rng = get_rng(device)
    train_step(model, optimizer, args.seed, step + 1, user, device)
    set_rng(rng, device)
    train_step(ref_model, ref_optimizer, args.seed, step + 1, ref_user, device)
    assert_bit_equal(full_state(ref_model, ref_optimizer, ref_user, device),
                     full_state(model, optimizer, user, device),
                     f"rank {args.rank} step {step + 1} after the restore")
    # And the restored members snapshot again, all together, as a resumed job does.
    snapshotter.snapshot(step + 1)
    snapshotter.wait()
    stats = snapshotter.stats()
    if (stats.sealed, stats.failed, stats.last_sealed_step) != (1, 0, step + 1):
        print(f"error: the snapshot after the restore did not seal: {stats}", flush=True)
        return 1
    snapshotter.close()
    print(f"verified {step}", flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("train", "verify"))
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--group", choices=("list", "dist"), default="list")
    p.add_argument("--init-method", default="")
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--step-sleep-ms", type=float, default=20)
    p.add_argument("--first-optimizer-step", type=int, default=0)
    args = p.parse_args()
    global FIRST_OPTIMIZER_STEP
    FIRST_OPTIMIZER_STEP = args.first_optimizer_step
    # The library's Python log lines (why nothing was restored, for one) go to stderr.
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname).1s [%(name)s] %(message)s")
    device = torch.device("cuda", args.rank) if args.device == "cuda:each" else torch.device(args.device)
    if device.type == "cuda":
        # Bit-exact replay of GPU training: deterministic cuBLAS and kernels.
        torch.use_deterministic_algorithms(True)
        torch.cuda.set_device(device)
    return train(args, device) if args.mode == "train" else verify(args, device)


if __name__ == "__main__":
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    sys.exit(main())
