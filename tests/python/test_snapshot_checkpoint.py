"""tessera.dcp.SnapshotCheckpoint: a Snapshotter's snapshot read as a DCP checkpoint.

Two kinds of test:

* against a real tesserad, a Snapshotter's snapshot on this machine's PyTorch (1.13: plain
  tensors, tied weights, AdamW) read back tensor by tensor, bit for bit, under the FQNs
  ``torch.distributed.checkpoint.state_dict`` gives them, with its param groups; and a step the
  trainer releases while it is read gives a clear error, never other bytes;
* unit tests of the class alone, with manifests and bytes injected (a source standing in for the
  daemon), for what PyTorch 1.13 cannot make: DTensor shards of several ranks, data-parallel
  slices, and damaged or hostile layouts and meta blobs.

tests/gpu/dcp_on_device.py loads a 4-rank DTensor Snapshotter snapshot through the real DCP into
2 and 3 ranks of other shardings, and whole. Seeds: TESSERA_TEST_SEED, else drawn and printed.
"""

from __future__ import annotations

import fractions
import io
import json
import os
import pickle
import random
import time
import types
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest
import torch

import tessera.dcp as tdcp
from tessera.client import EntryKind, EntrySlice
import tessera.torch as tt
from tessera.errors import (DataLossError, FailedPreconditionError, InvalidArgumentError,
                            NotFoundError, UnavailableError)
from conftest import Daemon, cluster_daemons


def _seed() -> int:
    seed = int(os.environ.get("TESSERA_TEST_SEED") or random.randrange(1, 1 << 31))
    print(f"seed {seed} (TESSERA_TEST_SEED={seed} repeats this run)")
    return seed


def _bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


# -- against a real daemon ------------------------------------------------------------------------


class TiedNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(40, 12)
        self.body = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.GELU(),
                                        torch.nn.Linear(24, 12))
        self.norm = torch.nn.BatchNorm1d(12)
        self.head = torch.nn.Linear(12, 40, bias=False)
        self.head.weight = self.emb.weight  # tied: one registered entry, two FQNs

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.body(self.emb(idx))))


def _train(model: TiedNet, optimizer: Any, steps: int, gen: torch.Generator) -> None:
    for _ in range(steps):
        idx = torch.randint(0, 40, (16,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(idx), idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _expected(model: TiedNet, optimizer: Any) -> Dict[str, torch.Tensor]:
    """The state under the FQNs get_state_dict gives it, copied."""
    out = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state[p].items():
                out[f"optim.state.{names[id(p)]}.{key}"] = value.detach().clone()
    return out


def test_a_snapshotter_snapshot_reads_back_under_dcp_names(daemon: Daemon) -> None:
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TiedNet()
    optimizer = torch.optim.AdamW([{"params": list(model.body.parameters()), "lr": 3e-3},
                                   {"params": [model.emb.weight, *model.norm.parameters()],
                                    "lr": 1e-3, "betas": (0.8, 0.95)}], weight_decay=0.05)
    _train(model, optimizer, 2, gen)
    snap = tt.Snapshotter(model, optimizer, job_id="snapck", rank=0, world_size=1,
                          socket_path=str(daemon.socket))
    try:
        assert snap.snapshot(2)
        snap.wait()
        want = _expected(model, optimizer)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        _train(model, optimizer, 1, gen)  # the live state moves on; the snapshot must not

        checkpoint = tdcp.SnapshotCheckpoint("snapck", socket_path=str(daemon.socket))
        index = checkpoint.index
        assert index.step == 2
        assert set(index.tensors) == set(want), set(index.tensors) ^ set(want)
        assert "model.head.weight" in index.tensors  # the tied name, from the layout's aliases
        for fqn, tensor in want.items():
            info = index.tensors[fqn]
            assert (info.size, info.dtype) == (tuple(tensor.shape),
                                               str(tensor.dtype).replace("torch.", ""))
            assert bytes(checkpoint.read_tensor(fqn)) == _bytes(tensor), fqn
        loaded = torch.load(io.BytesIO(checkpoint.read_bytes("optim.param_groups")))
        assert [g["params"] for g in loaded] == [
            ["body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"],
            ["emb.weight", "norm.weight", "norm.bias"]]
        assert [{k: v for k, v in g.items() if k != "params"} for g in loaded] == groups

        # The trainer snapshots on; once two newer steps are sealed, step 2 is released and a
        # read of it fails plainly.
        for step in (3, 4):
            assert snap.snapshot(step)
            snap.wait()
        with pytest.raises(NotFoundError, match="step 2"):
            tdcp.SnapshotCheckpoint("snapck", 2, socket_path=str(daemon.socket)).read_tensor(
                "model.emb.weight")
        again = tdcp.SnapshotCheckpoint("snapck", socket_path=str(daemon.socket))
        assert again.index.step == 4
        assert bytes(again.read_tensor("model.emb.weight")) == _bytes(model.emb.weight)
        checkpoint.close()
        again.close()
    finally:
        snap.close(drop=True)


def test_a_snapshot_from_before_the_layout_blob_restores_and_the_next_carries_it(
        daemon: Daemon) -> None:
    """A Snapshotter of an earlier version registered no layout blob: a trainer upgraded
    mid-job restores its snapshot (registering as it did), and snapshots with the blob after."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TiedNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train(model, optimizer, 2, gen)
    old = tt.Snapshotter(model, optimizer, job_id="upgrade", rank=0, world_size=1,
                         socket_path=str(daemon.socket))
    old._with_layout = False  # as the earlier version registered
    old._registered = None
    assert old.snapshot(2)
    old.wait()
    want = _expected(model, optimizer)
    old.close()
    reader = tdcp.DaemonSnapshotSource(str(daemon.socket))
    assert "blob.layout" not in [e.name for e in reader.manifest("upgrade", 0, 2).entries]

    _train(model, optimizer, 1, gen)
    new = tt.Snapshotter(model, optimizer, job_id="upgrade", rank=0, world_size=1,
                         socket_path=str(daemon.socket))
    try:
        assert new.restore_latest() == 2
        assert {k: _bytes(v) for k, v in _expected(model, optimizer).items()} == \
            {k: _bytes(v) for k, v in want.items()}
        assert new.snapshot(3)
        new.wait()
        assert "blob.layout" in [e.name for e in reader.manifest("upgrade", 0, 3).entries]
        index = tdcp.SnapshotCheckpoint("upgrade", 3, socket_path=str(daemon.socket)).index
        assert "model.head.weight" in index.tensors
    finally:
        reader.close()
        new.close(drop=True)


def test_a_checkpoint_a_writer_stored_is_not_taken_for_a_snapshot(daemon: Daemon) -> None:
    data = torch.arange(12, dtype=torch.float32) + 0.5
    tdcp.save_rank("dcpjob", 1, 0, 1,
                   [tdcp.TensorToSave("w", (0,), (12,), (12,), "float32", 4, data.data_ptr())],
                   [], socket_path=str(daemon.socket))
    tdcp.release()
    with pytest.raises(DataLossError, match="blob.layout.*tessera.dcp.Reader"):
        tdcp.SnapshotCheckpoint("dcpjob", 1, socket_path=str(daemon.socket)).index


class WithExtraState(torch.nn.Module):
    """A layer whose state_dict holds a non-tensor value (``get_extra_state``)."""

    def __init__(self, extra: Any) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.extra = extra

    def get_extra_state(self) -> Any:
        return self.extra

    def set_extra_state(self, state: Any) -> None:
        self.extra = state


def test_the_models_extra_state_is_served_and_one_naming_a_class_only_when_allowed(
        daemon: Daemon) -> None:
    """A model with two layers' extra state, one of plain values and one an object of a class
    (fractions.Fraction): both are listed under DCP's names; the plain one reads back as
    DCP loads bytes (torch.load); the other's read is refused, saying why and what to do, unless
    allow_pickle=True."""
    seed = _seed()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    plain = {"scale": rng.random(), "history": [rng.randrange(1 << 40) for _ in range(5)],
             "name": "fp8", "raw": rng.randbytes(16), "nothing": None}
    model = torch.nn.ModuleDict({"plain": WithExtraState(plain),
                                 "obj": WithExtraState(fractions.Fraction(rng.randrange(1, 99), 7))})
    snap = tt.Snapshotter(model, None, job_id="extra", rank=0, world_size=1,
                          socket_path=str(daemon.socket))
    try:
        assert snap.snapshot(1)
        snap.wait()
        checkpoint = tdcp.SnapshotCheckpoint("extra", socket_path=str(daemon.socket))
        assert {"model.plain._extra_state", "model.obj._extra_state"} <= set(
            checkpoint.index.byte_items)
        got = torch.load(io.BytesIO(checkpoint.read_bytes("model.plain._extra_state")))
        assert got == plain and pickle.dumps(got) == pickle.dumps(plain), seed
        with pytest.raises(FailedPreconditionError,
                           match=r"'model.obj._extra_state' is the model's extra state .* in the "
                                 r"snapshot of job 'extra' rank 0 step 1, and it names "
                                 r"fractions.Fraction: .*Pass allow_pickle=True to SnapshotReader"):
            checkpoint.read_bytes("model.obj._extra_state")
        assert bytes(checkpoint.read_tensor("model.obj.lin.weight")) == _bytes(
            model["obj"].lin.weight)
        trusted = tdcp.SnapshotCheckpoint("extra", socket_path=str(daemon.socket),
                                          allow_pickle=True)
        # A class in the bytes: torch >= 2.6 loads it only when told the bytes are trusted (as
        # DCP's planner does for its byte items).
        value = torch.load(io.BytesIO(trusted.read_bytes("model.obj._extra_state")),
                           weights_only=False)
        assert value == model["obj"].extra and type(value) is fractions.Fraction
        reader = tdcp.SnapshotReader("extra", socket_path=str(daemon.socket), allow_pickle=True)
        assert reader._open().allow_pickle
        checkpoint.close()
        trusted.close()
    finally:
        snap.close(drop=True)


def _wait_read(checkpoint_of: Any, fqns: Sequence[str], timeout_s: float = 30.0) -> Dict[str, bytes]:
    """Each tensor read through a fresh reader, retried while the cluster is still protecting
    and committing the step (NotFound) or has not yet noticed a lost member (Unavailable)."""
    deadline = time.monotonic() + timeout_s
    while True:
        checkpoint = checkpoint_of()
        try:
            return {fqn: bytes(checkpoint.read_tensor(fqn)) for fqn in fqns}
        except (NotFoundError, UnavailableError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
        finally:
            checkpoint.close()


def test_a_node_holding_no_rank_reads_the_snapshot_of_a_lost_one(tmp_path: Path) -> None:
    """Three daemons, RS(2, 1); ranks 0 and 1 of a job snapshot on nodes 0 and 1; node 0 is
    killed; node 2, which holds neither rank's shard, reads both ranks' tensors bit-exact (rank
    0's rebuilt from fragments, rank 1's copied from node 1)."""
    seed = _seed()
    torch.manual_seed(seed)
    daemons = cluster_daemons(tmp_path, 3, "reader-test-token", 2, 1,
                              ["--set", "liveness.transport=grpc", "--set", "peer.data_path=grpc"])
    snaps = []
    try:
        for d in daemons:
            d.start()
        time.sleep(0.6)  # every daemon hears every other before the first snapshot
        want: Dict[str, bytes] = {}
        for rank in range(2):
            stage = torch.nn.Linear(16 + rank, 24)
            model = torch.nn.ModuleDict({f"stage{rank}": stage})
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            for _ in range(2):
                stage(torch.randn(8, 16 + rank)).square().mean().backward()
                optimizer.step()
                optimizer.zero_grad()
            snap = tt.Snapshotter(model, optimizer, job_id="nodes", rank=rank, world_size=2,
                                  socket_path=str(daemons[rank].socket))
            snaps.append(snap)
            want.update({f"model.stage{rank}.{k}": _bytes(v)
                         for k, v in stage.state_dict().items()})
            want[f"optim.state.stage{rank}.weight.exp_avg"] = _bytes(
                optimizer.state[stage.weight]["exp_avg"])
        for snap in snaps:
            assert snap.snapshot(2)
        for snap in snaps:
            snap.wait()
        # Node 0 goes once the step is committed (every rank's fragments placed) and every
        # member heard of it.
        deadline = time.monotonic() + 30
        while not any("job 'nodes' committed step 2" in d.log() for d in daemons):
            assert time.monotonic() < deadline, daemons[0].log()[-3000:]
            time.sleep(0.1)
        time.sleep(1.0)
        daemons[0].kill()
        got = _wait_read(
            lambda: tdcp.SnapshotCheckpoint("nodes", 2, socket_path=str(daemons[2].socket)),
            list(want))
        assert got == want
        assert "rebuil" in daemons[2].log().lower(), daemons[2].log()[-3000:]
    finally:
        for snap in snaps:
            try:
                snap.close()
            except Exception:
                pass
        for d in daemons:
            d.stop()
            d.cleanup()


# -- the class alone, with injected manifests ----------------------------------------------------


def _entry(name: str, dtype: str, shape: Sequence[int], length: int, kind: str = "tensor",
           slice_: Optional[Tuple[int, int]] = None) -> Any:
    return types.SimpleNamespace(
        name=name, dtype=dtype, shape=tuple(shape),
        kind=EntryKind.TENSOR if kind == "tensor" else EntryKind.BLOB, nbytes=length,
        length=length, slice=None if slice_ is None else EntrySlice(*slice_))


class _Source:
    """Manifests and entry bytes of a made-up job, as the daemon would serve them."""

    def __init__(self, world: int, step: int = 5) -> None:
        self.world = world
        self.step = step
        self.entries: Dict[int, List[Any]] = {r: [] for r in range(world)}
        self.data: Dict[Tuple[int, str], bytes] = {}
        self.dp: Dict[int, Any] = {}
        self.reads: List[Tuple[int, str]] = []

    def add(self, rank: int, name: str, data: bytes, dtype: str = "bytes",
            shape: Sequence[int] = (), kind: str = "tensor",
            slice_: Optional[Tuple[int, int]] = None) -> None:
        self.entries[rank].append(_entry(name, dtype, shape, len(data), kind, slice_))
        self.data[(rank, name)] = data

    def blobs(self, rank: int, layout: Dict[str, Any], meta: Any) -> None:
        full = {"format": "tessera.snapshot-layout/1", "fqns": {}, "param_fqns": [],
                "group_sizes": [], "aliases": {}, "dtensors": {}}
        full.update(layout)
        self.add(rank, "blob.layout", json.dumps(full).encode(), kind="blob")
        self.add(rank, "blob.meta", meta if isinstance(meta, bytes) else pickle.dumps(meta),
                 kind="blob")

    def manifest(self, job_id: str, rank: int, step: int) -> Any:
        if step != self.step or rank not in self.entries:
            raise NotFoundError(f"no step {step} of rank {rank}")
        return types.SimpleNamespace(world_size=self.world, step=self.step,
                                     entries=self.entries[rank], data_parallel=self.dp.get(rank))

    def read(self, job_id: str, rank: int, step: int, entry: str, offset: int, length: int,
             out: memoryview) -> None:
        self.reads.append((rank, entry))
        out[:] = self.data[(rank, entry)][offset:offset + length]

    def versions(self, job_id: str) -> List[Any]:
        return [types.SimpleNamespace(rank=r, step=self.step, sealed=True)
                for r in range(self.world)]


def _placed(shape: Sequence[int], offsets: Sequence[int], lengths: Sequence[int],
            dtype: str = "float32") -> Dict[str, Any]:
    return {"global_shape": list(shape), "offsets": list(offsets), "lengths": list(lengths),
            "dtype": dtype, "mesh_shape": [2], "mesh_dim_names": [],
            "placements": ["Shard(dim=0)"]}


def _meta(groups: Optional[List[Dict[str, Any]]] = None, state: Any = None) -> Dict[str, Any]:
    return {"format": 2, "optimizer_state": state or {}, "param_groups": groups or [],
            "model_other": b""}


def _sharded_job(seed: int) -> Tuple[_Source, Dict[str, torch.Tensor]]:
    """Two ranks: a (5, 3) weight sharded by rows (3 + 2) with its AdamW moment, a bias each rank
    holds whole (rank 1's copy differs, so a read shows which one was taken), a scalar step, a
    tied name, and the param groups."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 3, generator=gen)
    m = torch.randn(5, 3, generator=gen)
    b = torch.randn(4, generator=gen).to(torch.bfloat16)
    step = torch.tensor(7.0)
    src = _Source(2)
    for rank, (lo, n) in enumerate(((0, 3), (3, 2))):
        src.add(rank, "model.w", _bytes(w[lo:lo + n]), "float32", (n, 3))
        src.add(rank, "optim.0.exp_avg", _bytes(m[lo:lo + n]), "float32", (n, 3))
        src.add(rank, "optim.0.step", _bytes(step), "float32", ())
        src.add(rank, "model.b", _bytes(b if rank == 0 else b + 1), "bfloat16", (4,))
        src.blobs(rank, {
            "fqns": {"model.w": "w", "model.b": "b", "model.head": "head"},
            "param_fqns": ["w", "b"], "group_sizes": [2], "aliases": {"model.head": "model.w"},
            "dtensors": {"model.w": _placed((5, 3), (lo, 0), (n, 3)),
                         "optim.0.exp_avg": _placed((5, 3), (lo, 0), (n, 3))}},
            _meta([{"lr": 0.1, "betas": (0.9, 0.99)}], {(1, "count"): 3}))
    return src, {"model.w": w, "model.head": w, "optim.state.w.exp_avg": m,
                 "optim.state.w.step": step, "model.b": b}


def test_dtensor_shards_of_two_ranks_form_whole_tensors() -> None:
    src, want = _sharded_job(_seed())
    checkpoint = tdcp.SnapshotCheckpoint("job", source=src)
    index = checkpoint.index
    assert set(index.tensors) == set(want)
    assert [c.offsets for c in index.tensors["model.w"].chunks] == [(0, 0), (3, 0)]
    for fqn, tensor in want.items():
        assert bytes(checkpoint.read_tensor(fqn)) == _bytes(tensor), fqn
    # A region across both ranks' chunks (a resharded read: columns 1..2 of every row).
    region = checkpoint.read_region("model.w", (0, 1), (5, 2))
    assert bytes(region) == _bytes(want["model.w"][:, 1:3])
    groups = torch.load(io.BytesIO(checkpoint.read_bytes("optim.param_groups")))
    assert groups == [{"lr": 0.1, "betas": (0.9, 0.99), "params": ["w", "b"]}]
    assert torch.load(io.BytesIO(checkpoint.read_bytes("optim.state.b.count"))) == 3


def test_prefixes_name_another_state_dict_shape() -> None:
    src, _ = _sharded_job(_seed())
    checkpoint = tdcp.SnapshotCheckpoint("job", source=src, model_prefix="",
                                         optim_prefix="optimizer.")
    assert {"w", "b", "head", "optimizer.state.w.exp_avg",
            "optimizer.param_groups"} <= set(checkpoint.index.tensors) | set(
                checkpoint.index.byte_items)


def test_data_parallel_slices_are_read_from_every_member() -> None:
    gen = torch.Generator().manual_seed(_seed())
    p = torch.randn(7, generator=gen)  # 28 bytes: 12 on DP rank 0, 16 on DP rank 1
    src = _Source(2)
    for rank, (at, n) in enumerate(((0, 12), (12, 16))):
        src.dp[rank] = types.SimpleNamespace(dp_rank=rank, dp_size=2, members_fingerprint=99)
        src.add(rank, "model.p", _bytes(p)[at:at + n], "float32", (7,), slice_=(at, n))
        src.blobs(rank, {"fqns": {"model.p": "p"}}, _meta())
    checkpoint = tdcp.SnapshotCheckpoint("job", source=src)
    assert bytes(checkpoint.read_tensor("model.p")) == _bytes(p)
    assert sorted(r for r in src.reads if r[1] == "model.p") == [(0, "model.p"), (1, "model.p")]


def test_missing_or_overlapping_bytes_are_refused() -> None:
    p = torch.arange(7, dtype=torch.float32)
    src = _Source(2)
    for rank, (at, n) in enumerate(((0, 12), (16, 12))):  # bytes 12..16 held by no one
        src.dp[rank] = types.SimpleNamespace(dp_rank=rank, dp_size=2, members_fingerprint=5)
        src.add(rank, "model.p", _bytes(p)[at:at + n], "float32", (7,), slice_=(at, n))
        src.blobs(rank, {"fqns": {"model.p": "p"}}, _meta())
    with pytest.raises(DataLossError, match="not all held"):
        tdcp.SnapshotCheckpoint("job", source=src).index

    # Two ranks placing chunks that overlap (rows 0..2 and 2..4 of 5).
    src = _Source(2)
    for rank, (lo, n) in enumerate(((0, 3), (2, 3))):
        src.add(rank, "model.w", bytes(12 * n), "float32", (n, 3))
        src.blobs(rank, {"fqns": {"model.w": "w"},
                         "dtensors": {"model.w": _placed((5, 3), (lo, 0), (n, 3))}}, _meta())
    with pytest.raises(DataLossError, match="overlap|stored twice"):
        tdcp.SnapshotCheckpoint("job", source=src).index


class _Marks:
    """Unpickling it runs os.mkdir(path): a pickle that must not be opened."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (os.mkdir, (self.path,))


def test_extra_state_is_named_as_dcp_names_it_and_never_run_without_allow_pickle(
        tmp_path: Path) -> None:
    """Extra state under DDP and torch.compile wrappers is named without them, as the tensors'
    FQNs are; a value whose unpickling would run a function is listed and refused, and nothing
    runs until allow_pickle=True; a nested pickle that does not parse is named."""
    ran = tmp_path / "ran"
    src = _Source(1)
    w = torch.arange(6, dtype=torch.float32) + 0.5
    src.add(0, "model.module._orig_mod.norm.weight", _bytes(w), "float32", (6,))
    extra = {"module._orig_mod.norm._extra_state": {"steps": 3},
             "module._orig_mod.head._extra_state": _Marks(str(ran))}
    src.blobs(0, {"fqns": {"model.module._orig_mod.norm.weight": "norm.weight"}},
              dict(_meta(), model_other=pickle.dumps(extra)))
    checkpoint = tdcp.SnapshotCheckpoint("job", source=src)
    assert set(checkpoint.index.byte_items) == {"model.norm._extra_state",
                                                "model.head._extra_state"}
    assert set(checkpoint.index.tensors) == {"model.norm.weight"}
    assert torch.load(io.BytesIO(checkpoint.read_bytes("model.norm._extra_state"))) == {
        "steps": 3}
    with pytest.raises(FailedPreconditionError, match="and it names posix.mkdir"):
        checkpoint.read_bytes("model.head._extra_state")
    with pytest.raises(FailedPreconditionError, match="names posix.mkdir"):  # checked first
        checkpoint.serve([tdcp.ChunkRead("model.norm.weight", (0,), (0,), (6,)),
                          tdcp.ChunkRead("model.head._extra_state")],
                         lambda *a: pytest.fail("delivered before all were checked"))
    assert not ran.exists()
    trusted = tdcp.SnapshotCheckpoint("job", source=src, allow_pickle=True)
    trusted.index
    assert ran.is_dir()  # allow_pickle runs what the pickle names, as documented

    src.data[(0, "blob.meta")] = pickle.dumps(dict(_meta(), model_other=b"\x80\x04not a pickle"))
    src.entries[0][2].length = len(src.data[(0, "blob.meta")])
    with pytest.raises(DataLossError, match="the model's extra state .* does not unpickle, even "
                       "with stand-ins for the classes it names"):
        tdcp.SnapshotCheckpoint("job", source=src).index


@pytest.mark.parametrize("damage, message", [
    ("meta names a class", "only plain values"),
    ("layout is not JSON", "not JSON"),
    ("chunk outside its tensor", "is not inside"),
    ("shard shape differs from its placement", "placed as"),
    ("optimizer entry names no parameter", "names no parameter"),
    ("group sizes do not add up", "do not add up"),
    ("tied name points nowhere", "does not hold"),
])
def test_damaged_layouts_and_meta_are_named(damage: str, message: str) -> None:
    src = _Source(1)
    src.add(0, "model.w", bytes(24), "float32", (2, 3))
    src.add(0, "optim.0.exp_avg", bytes(24), "float32", (2, 3))
    layout: Dict[str, Any] = {"fqns": {"model.w": "w"}, "param_fqns": ["w"], "group_sizes": [1],
                              "dtensors": {"model.w": _placed((2, 3), (0, 0), (2, 3))}}
    meta: Any = _meta([{"lr": 1.0}])
    if damage == "meta names a class":
        meta = pickle.dumps({"format": 2, "param_groups": [os.getcwd]})
    elif damage == "chunk outside its tensor":
        layout["dtensors"]["model.w"] = _placed((2, 3), (1, 0), (2, 3))
    elif damage == "shard shape differs from its placement":
        layout["dtensors"]["model.w"] = _placed((4, 3), (0, 0), (3, 3))
    elif damage == "optimizer entry names no parameter":
        layout["param_fqns"], layout["group_sizes"] = [], []
    elif damage == "group sizes do not add up":
        layout["group_sizes"] = [2]
    elif damage == "tied name points nowhere":
        layout["aliases"] = {"model.t": "model.gone"}
    src.blobs(0, layout, meta)
    if damage == "layout is not JSON":
        src.data[(0, "blob.layout")] = b"{not json" + bytes(10)
        src.entries[0][2].length = len(src.data[(0, "blob.layout")])
    with pytest.raises(DataLossError, match=message):
        tdcp.SnapshotCheckpoint("job", source=src).index


@pytest.mark.parametrize("kwargs, message", [
    ({"read_threads": 0}, "read_threads must be an integer in \\[1, 256\\]"),
    ({"read_threads": True}, "read_threads"),
    ({"model_prefix": 3}, "model_prefix must be a string"),
    ({"step": -2}, "step"),
])
def test_bad_arguments_are_named(kwargs: Dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        tdcp.SnapshotCheckpoint("job", source=_Source(1), **kwargs)


def test_reads_on_several_threads_deliver_every_read_bit_exact() -> None:
    src, want = _sharded_job(_seed())
    checkpoint = tdcp.SnapshotCheckpoint("job", source=src, read_threads=3)
    reads = [tdcp.ChunkRead(fqn, c.offsets, (0,) * len(c.sizes), c.sizes, token=i)
             for i, (fqn, c) in enumerate((f, c) for f, t in checkpoint.index.tensors.items()
                                          for c in t.chunks)]
    seen: List[Any] = []

    def deliver(read: Any, chunk: Any, part: tdcp.ReadPart) -> None:
        seen.append(read.token)
        whole = want[read.fqn]
        lo = chunk.offsets[0] if chunk.offsets else 0
        expected = whole[lo:lo + chunk.sizes[0]] if chunk.sizes else whole
        assert part.at == (0,) * len(chunk.sizes) and part.lengths == chunk.sizes
        assert _bytes(tdcp.part_tensor(read, chunk, part)) == _bytes(expected), (
            read.fqn, chunk.offsets)

    checkpoint.serve(reads, deliver)
    assert sorted(seen) == list(range(len(reads)))
