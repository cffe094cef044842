#!/usr/bin/env python3
"""The Snapshotter over DTensor state on one GPU: FSDP2 (``fully_shard``), tensor parallelism
(``parallelize_module``) and both on a 2-D mesh, each in a world of one process. Needs PyTorch
>= 2.4 and a GPU; prints SKIP and exits 0 otherwise.

    TESSERAD=BUNDLE/bin/tesserad TESSERA_LIBRARY=BUNDLE/lib/libtessera.so \\
        python3 tests/gpu/dtensor_on_device.py [--seed N] [--snapshots N]

Per layout: a 4-block MLP (random weights from the seed), AdamW, 3 training steps; a snapshot
through `tessera.torch.Snapshotter`; the local shards (parameters and optimizer state) copied
aside; 2 more steps; then a new Snapshotter of the same job restores in place and every local
shard is compared bit for bit with the copy. The snapshot's meta blob must place every DTensor
(global shape, offsets, lengths, placements). Then N snapshots of the live loop (default 100),
blocked time per snapshot (median and max) next to the same model unsharded in the same run.
Prints one PASS or FAIL line per case, the table last; exits 1 when any case failed.
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "agent" / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from dcp_on_device import assert_bit_equal, start_daemon  # noqa: E402


def log(message: str) -> None:
    print(message, flush=True)


def build(seed: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(seed)
    blocks = []
    for _ in range(4):
        blocks.append(torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(),
                                          torch.nn.Linear(1024, 256)))
    return torch.nn.Sequential(*blocks).to(device)


def shard(model: torch.nn.Module, layout: str, device_type: str,
          world: int = 1) -> torch.nn.Module:
    """`model` (build's) sharded over `world` ranks: FSDP2 and TP over all of them, FSDP2+TP
    over a (world / 2) x 2 mesh (1 x 1 in a world of one)."""
    from torch.distributed.device_mesh import init_device_mesh
    if layout == "plain":
        return model
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard  # type: ignore
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)
    if layout == "fsdp2":
        mesh = init_device_mesh(device_type, (world,))
        for block in model:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif layout == "tp":
        mesh = init_device_mesh(device_type, (world,))
        for block in model:
            parallelize_module(block, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    elif layout == "fsdp2+tp":
        shape = (world // 2, 2) if world > 1 else (1, 1)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=("dp", "tp"))
        for block in model:
            parallelize_module(block, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    else:
        raise ValueError(layout)
    return model


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int,
          device: torch.device, after: Callable[[int], None] = lambda step: None) -> None:
    g = torch.Generator(device="cpu").manual_seed(seed)
    for step in range(steps):
        x = torch.randn(32, 256, generator=g).to(device)
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after(step)


def local_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    from tessera import _dtensor
    out: Dict[str, Any] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        out[f"model.{name}"] = _dtensor.local(t).detach().cpu().clone()
    for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]):
        for key, v in optimizer.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                out[f"optim.{i}.{key}"] = _dtensor.local(v).detach().cpu().clone()
    return out


def case(layout: str, seed: int, device: torch.device, snapshots: int,
         timings: Dict[str, Tuple[float, float, int]]) -> str:
    import tessera.torch as tt
    from tessera import _dtensor
    job = f"dt-{layout.replace('+', '-')}-{seed}"
    model = shard(build(seed, device), layout, device.type)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, optimizer, 3, seed, device)
    snap = tt.Snapshotter(model, optimizer, job_id=job, rank=0, world_size=1)
    assert snap.snapshot(3), "the first snapshot was skipped"
    snap.wait()
    expected = local_state(model, optimizer)
    placed = snap.dtensor_layout()
    dtensors = [n for n, t in model.state_dict(keep_vars=True).items() if _dtensor.is_dtensor(t)]
    if layout != "plain":
        assert dtensors, f"{layout}: no parameter is a DTensor"
        for name in dtensors:
            record = placed.get(f"model.{name}")
            assert record is not None, f"{layout}: {name} is not placed in the snapshot's meta"
            t = model.state_dict(keep_vars=True)[name]
            assert record["global_shape"] == list(t.shape), (name, record, tuple(t.shape))
            assert record["lengths"] == list(t._local_tensor.shape), (name, record)
    snap.close()

    train(model, optimizer, 2, seed + 1, device)
    changed = local_state(model, optimizer)
    assert any(not torch.equal(changed[k], expected[k]) for k in expected), "training changed nothing"
    again = tt.Snapshotter(model, optimizer, job_id=job, rank=0, world_size=1)
    restored = again.restore_latest()
    assert restored == 3, f"restored {restored}, expected 3"
    compared = assert_bit_equal(local_state(model, optimizer), expected)

    blocked: List[float] = []
    taken = 0

    def after(step: int) -> None:
        nonlocal taken
        start = time.perf_counter()
        if again.snapshot(100 + step):
            taken += 1
        blocked.append(time.perf_counter() - start)

    train(model, optimizer, snapshots, seed + 2, device, after)
    again.wait()
    again.close(drop=True)
    median = statistics.median(blocked) * 1e3
    timings[layout] = (median, max(blocked) * 1e3, taken)
    return (f"{len(expected)} local tensors restored bit-exact ({compared} compared), "
            f"{len(dtensors)} DTensor parameters placed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "little"))
    parser.add_argument("--snapshots", type=int, default=100)
    args = parser.parse_args()
    from tessera import _dtensor
    if not _dtensor.available() or not torch.cuda.is_available():
        log(f"SKIP: needs DTensor (torch >= 2.4, have {torch.__version__}) and a GPU")
        return 0
    log(f"seed {args.seed}, torch {torch.__version__}, {torch.cuda.get_device_name()}")
    import torch.distributed as dist
    workdir = Path(tempfile.mkdtemp(prefix="tessera-dtensor-"))
    daemon, _ = start_daemon(workdir)
    failed = 0
    timings: Dict[str, Tuple[float, float, int]] = {}
    try:
        dist.init_process_group("nccl", init_method=f"file://{workdir}/pg", rank=0, world_size=1)
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        for layout in ("plain", "fsdp2", "tp", "fsdp2+tp"):
            try:
                log(f"PASS {layout}: {case(layout, args.seed, device, args.snapshots, timings)}")
            except Exception:
                failed += 1
                log(f"FAIL {layout}:\n{traceback.format_exc()}")
        dist.destroy_process_group()
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
    log(f"\n{'layout':<10} {'snapshots':>9} {'blocked median ms':>18} {'blocked max ms':>15}")
    for layout, (median, worst, taken) in timings.items():
        log(f"{layout:<10} {taken:>9} {median:>18.3f} {worst:>15.3f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
