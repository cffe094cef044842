"""tessera.dcp against real tesserads: DCP checkpoints stored as Tessera shards and read back, bit
for bit, in the layout they were saved in and in others (a resharded read), and clear errors on
bad reads and damaged indexes.

PyTorch 1.13 (this machine's) has no torch.distributed.checkpoint: the Tessera side is tested
directly (tessera.dcp.save_rank, CheckpointReader), and the DCP adapters (Writer, Reader) through
stand-ins of DCP's plan and metadata classes; the test with the real DCP skips, saying so, where
DCP does not import. tests/gpu/dcp_on_device.py is the test with the real DCP, resharding
included, for a machine with PyTorch 2.x.

Seeds: TESSERA_TEST_SEED, else drawn and printed.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import io
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch

import tessera
import tessera.dcp as tdcp
from conftest import Daemon


@pytest.fixture(autouse=True)
def _release_saved_ranks(request: pytest.FixtureRequest) -> Any:
    """Saves keep their ranks registered in this process: released after each test, before its
    daemon stops (which is set up first, so torn down after)."""
    if "daemon" in request.fixturenames:
        request.getfixturevalue("daemon")
    yield
    tdcp.release()


def _seed() -> int:
    seed = int(os.environ.get("TESSERA_TEST_SEED") or random.randrange(1, 1 << 31))
    print(f"seed {seed} (TESSERA_TEST_SEED={seed} repeats this run)")
    return seed


def _random_tensor(gen: torch.Generator, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """Random values, never all zeros (zeros would hide bytes never written)."""
    if dtype == torch.bool:
        return torch.randint(0, 2, tuple(shape), generator=gen).bool()
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(tuple(shape), generator=gen, dtype=torch.float64).to(dtype) + 0.5
    return torch.randint(1, 1 << 30, tuple(shape), generator=gen, dtype=torch.int64).to(dtype)


def _bytes_of(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _save(daemon: Daemon, job: str, step: int, world: int,
          chunks: Dict[int, List[Tuple[str, torch.Tensor, Tuple[int, ...], Tuple[int, ...]]]],
          byte_items: Optional[Dict[int, List[Tuple[str, bytes]]]] = None,
          ranks: Optional[Sequence[int]] = None, **kwargs: Any) -> None:
    """Saves rank r's chunks (fqn, the whole tensor, chunk offsets, chunk sizes) and items, for
    each rank of `ranks` (default all of `world`)."""
    for rank in (range(world) if ranks is None else ranks):
        keep = []
        tensors = []
        for fqn, full, offsets, sizes in chunks.get(rank, []):
            part = full
            for d, (o, n) in enumerate(zip(offsets, sizes)):
                part = part.narrow(d, o, n)
            part = part.contiguous()
            keep.append(part)
            tensors.append(tdcp.TensorToSave(fqn, offsets, sizes, tuple(full.shape),
                                             _dtype_name(full.dtype), full.element_size(),
                                             part.data_ptr()))
        items = [tdcp.BytesToSave(fqn, data) for fqn, data in (byte_items or {}).get(rank, [])]
        tdcp.save_rank(job, step, rank, world, tensors, items, socket_path=str(daemon.socket),
                       **kwargs)


def _row_chunks(fqn: str, full: torch.Tensor, bounds: Sequence[int]):
    """One chunk per rank: rows [bounds[r], bounds[r + 1])."""
    cols = tuple(full.shape[1:])
    return {r: [(fqn, full, (bounds[r],) + (0,) * len(cols),
                 (bounds[r + 1] - bounds[r],) + cols)] for r in range(len(bounds) - 1)}


def _serve_boxes(reader: tdcp.CheckpointReader,
                 reads: Sequence[tdcp.ChunkRead]) -> List[bytearray]:
    """Each read's box, row-major, assembled from the parts `serve` delivers (each element of
    each box delivered exactly once)."""
    boxes: List[Optional[bytearray]] = [None] * len(reads)
    counts = [0] * len(reads)
    position = {id(read): i for i, read in enumerate(reads)}

    def deliver(read: tdcp.ChunkRead, where: Any, part: tdcp.ReadPart) -> None:
        i = position[id(read)]
        if isinstance(where, tdcp.BytesItem):
            assert boxes[i] is None, "an item delivered twice"
            boxes[i] = bytearray(part.data)
            counts[i] = 1
            return
        if boxes[i] is None:
            boxes[i] = bytearray(int(np.prod(read.lengths)) * where.itemsize)
        tdcp.copy_box(part.data, where.sizes,
                      [o + a for o, a in zip(read.box_offsets, part.at)], memoryview(boxes[i]),
                      read.lengths, part.at, part.lengths, where.itemsize, src_start=part.start)
        counts[i] += int(np.prod(part.lengths))

    reader.serve(reads, deliver)
    for i, read in enumerate(reads):
        want = 1 if read.chunk_offsets is None else int(np.prod(read.lengths))
        assert counts[i] == want and (want == 0 or boxes[i] is not None), (
            f"read {read}: {counts[i]} of its {want} elements delivered")
    return [b if b is not None else bytearray() for b in boxes]


def _region(reader: tdcp.CheckpointReader, fqn: str, offsets, lengths,
            dtype: torch.dtype) -> torch.Tensor:
    raw = reader.read_region(fqn, offsets, lengths)
    if not raw:
        return torch.empty(tuple(lengths), dtype=dtype)
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(tuple(lengths))


# -- box arithmetic, against NumPy ---------------------------------------------------------------


def test_box_runs_and_copy_box_match_numpy_slicing() -> None:
    seed = _seed()
    rng = np.random.default_rng(seed)
    for trial in range(300):
        ndim = int(rng.integers(0, 5))
        shape = tuple(int(rng.integers(1, 7)) for _ in range(ndim))
        itemsize = int(rng.choice([1, 2, 4, 8, 16]))
        data = rng.integers(1, 256, size=int(np.prod(shape)) * itemsize, dtype=np.uint8)
        array = data.view(f"V{itemsize}").reshape(shape)
        offsets = tuple(int(rng.integers(0, s + 1)) for s in shape)
        lengths = tuple(int(rng.integers(0, s - o + 1)) for o, s in zip(offsets, shape))
        box = tuple(slice(o, o + n) for o, n in zip(offsets, lengths))
        want = array[box].tobytes()
        raw = data.tobytes()
        got = b"".join(raw[o:o + n] for o, n in tdcp.box_runs(shape, itemsize, offsets, lengths))
        assert got == want, (seed, trial, shape, itemsize, offsets, lengths)
        # The same box into another, larger buffer at another place.
        dst_shape = tuple(n + int(rng.integers(0, 3)) for n in lengths)
        dst_offsets = tuple(int(rng.integers(0, d - n + 1)) for d, n in zip(dst_shape, lengths))
        dst = bytearray(int(np.prod(dst_shape)) * itemsize)
        tdcp.copy_box(memoryview(raw), shape, offsets, memoryview(dst), dst_shape, dst_offsets,
                      lengths, itemsize)
        dst_array = np.frombuffer(bytes(dst), dtype=f"V{itemsize}").reshape(dst_shape)
        dst_box = tuple(slice(o, o + n) for o, n in zip(dst_offsets, lengths))
        assert dst_array[dst_box].tobytes() == want, (seed, trial, shape, dst_shape)
        untouched = bytearray(dst)
        mask = np.ones(dst_shape, dtype=bool)
        mask[dst_box] = False
        assert not np.frombuffer(bytes(untouched), dtype=f"V{itemsize}").reshape(
            dst_shape)[mask].tobytes().strip(b"\0"), (seed, trial, "wrote outside the box")


def test_trailing_whole_dimensions_merge_into_one_run() -> None:
    assert list(tdcp.box_runs((4, 5, 6), 4, (1, 0, 0), (2, 5, 6))) == [(120, 240)]
    assert list(tdcp.box_runs((4, 5, 6), 4, (1, 2, 0), (2, 2, 6))) == [(168, 48), (288, 48)]
    assert list(tdcp.box_runs((), 8, (), ())) == [(0, 8)]
    assert list(tdcp.box_runs((3, 0), 4, (0, 0), (3, 0))) == []


@pytest.mark.parametrize("offsets,lengths,message", [
    ((0, -1), (1, 1), r"dimension 1: \[-1, 0\) is outside \[0, 5\)"),
    ((3, 0), (2, 5), r"dimension 0: \[3, 5\) is outside \[0, 4\)"),
    ((0,), (1,), "one value per dimension"),
    ((0, 0), (1, 6), r"dimension 1: \[0, 6\) is outside \[0, 5\)"),
])
def test_a_box_outside_its_shape_is_refused(offsets, lengths, message) -> None:
    with pytest.raises(tessera.InvalidArgumentError, match=message):
        tdcp.box_runs((4, 5), 4, offsets, lengths)
    with pytest.raises(TypeError, match="must be ints"):
        tdcp.box_runs((4, 5), 4, (0, True), (1, 1))


# -- chunks stored by real daemons, read back ----------------------------------------------------


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
           torch.int8, torch.uint8, torch.bool, torch.complex64]


@pytest.mark.parametrize("max_shard_bytes", [None, 64])
def test_every_chunk_box_reads_back_bit_exact(daemon: Daemon,
                                             max_shard_bytes: Optional[int]) -> None:
    """Random boxes of every chunk of 10 dtypes, read whole and, with max_shard_bytes=64, in
    parts of at most 64 bytes each."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    world = 3
    tensors: Dict[str, torch.Tensor] = {}
    chunks: Dict[int, list] = {r: [] for r in range(world)}
    for i, dtype in enumerate(_DTYPES):
        shape = tuple(rng.randint(1, 9) for _ in range(rng.randint(1, 3)))
        full = _random_tensor(gen, shape, dtype)
        fqn = f"model.layer{i}.{_dtype_name(dtype)}"
        tensors[fqn] = full
        # Split dimension 0 over up to `world` ranks, unevenly, some ranks holding none.
        cuts = sorted(rng.sample(range(1, shape[0]), min(world - 1, shape[0] - 1)))
        bounds = [0] + cuts + [shape[0]]
        for r in range(len(bounds) - 1):
            owner = (r + i) % world
            chunks[owner].append((fqn, full, (bounds[r],) + (0,) * (len(shape) - 1),
                                  (bounds[r + 1] - bounds[r],) + shape[1:]))
    tensors["optim.step"] = torch.tensor(12345, dtype=torch.int64)  # a 0-d tensor
    chunks[1].append(("optim.step", tensors["optim.step"], (), ()))
    tensors["empty"] = torch.empty(0, 5)
    chunks[2].append(("empty", tensors["empty"], (0, 0), (0, 5)))
    items = {0: [("extra.loader", bytes(rng.randrange(256) for _ in range(60)))],
             2: [("extra.empty", b"")]}
    _save(daemon, "dcp-chunks", 7, world, chunks, items)

    reader = tdcp.CheckpointReader("dcp-chunks", 7, socket_path=str(daemon.socket),
                                   max_shard_bytes=max_shard_bytes)
    index = reader.index
    assert (index.world_size, index.step) == (world, 7)
    assert set(index.tensors) == set(tensors)
    reads = []
    for fqn, info in index.tensors.items():
        assert info.size == tuple(tensors[fqn].shape), fqn
        assert info.dtype == _dtype_name(tensors[fqn].dtype), fqn
        for c in info.chunks:
            for _ in range(4):
                box_offsets = tuple(rng.randint(0, s) for s in c.sizes)
                lengths = tuple(rng.randint(0, s - o) for o, s in zip(box_offsets, c.sizes))
                reads.append(tdcp.ChunkRead(fqn, c.offsets, box_offsets, lengths))
    rng.shuffle(reads)
    before = dataclasses.replace(reader.stats)
    for read, got in zip(reads, _serve_boxes(reader, reads)):
        chunk = index.chunk(read.fqn, read.chunk_offsets)
        want = tdcp.narrow(tensors[read.fqn],
                           tuple(a + b for a, b in zip(chunk.offsets, read.box_offsets)),
                           read.lengths)
        assert bytes(got) == _bytes_of(want), (seed, read)
    if max_shard_bytes is not None:
        assert 0 < reader.stats.largest_read_bytes <= max_shard_bytes
    assert reader.stats.manifests_read - before.manifests_read == world  # each shard's, once

    # The parts, as tensors (what the DCP adapter copies from), box by box.
    def deliver(read: tdcp.ChunkRead, chunk: tdcp.TensorChunk, part: tdcp.ReadPart) -> None:
        got = tdcp.part_tensor(read, chunk, part)
        at = [c + b + a for c, b, a in zip(chunk.offsets, read.box_offsets, part.at)]
        want = tdcp.narrow(tensors[read.fqn], at, part.lengths)
        assert got.dtype == want.dtype and got.shape == want.shape, (seed, read, part.at)
        assert _bytes_of(got) == _bytes_of(want), (seed, read, part.at)

    reader.serve(reads, deliver)
    for fqn, full in tensors.items():
        whole = _region(reader, fqn, (0,) * full.dim(), tuple(full.shape), full.dtype)
        assert _bytes_of(whole) == _bytes_of(full), (seed, fqn)
    assert reader.read_bytes("extra.loader") == items[0][0][1]
    assert reader.read_bytes("extra.empty") == b""
    if max_shard_bytes is not None:
        with pytest.raises(tessera.InvalidArgumentError, match=r"non-tensor item 'extra.loader' "
                           r"\(job 'dcp-chunks' rank 0 step 7 entry 'b0'\) needs 60 bytes in one "
                           r"read, over max_shard_bytes=59"):
            tdcp.CheckpointReader("dcp-chunks", 7, socket_path=str(daemon.socket),
                                  max_shard_bytes=59).read_bytes("extra.loader")


def test_four_row_chunks_read_as_two_ranks_columns_and_whole(daemon: Daemon) -> None:
    """The resharded read: 4 ranks snapshotted one row chunk each (FSDP-like); read back as 2
    ranks' row halves, as 2 ranks' column halves (TP-like), as random boxes and whole, bit-exact
    against the source tensors."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    w = _random_tensor(gen, (37, 23), torch.float32)
    e = _random_tensor(gen, (50, 3, 4), torch.bfloat16)
    chunks = _row_chunks("w", w, [0, 10, 19, 30, 37])
    for r, part in _row_chunks("e", e, [0, 13, 25, 38, 50]).items():
        chunks[r] += part
    _save(daemon, "dcp-reshard", 3, 4, chunks)
    reader = tdcp.CheckpointReader("dcp-reshard", 3, socket_path=str(daemon.socket))
    assert len(reader.index.tensors["w"].chunks) == 4

    for full, fqn in ((w, "w"), (e, "e")):
        rows, rest = full.shape[0], tuple(full.shape[1:])
        half = rows // 2
        for offsets, lengths in (((0,) + (0,) * len(rest), (half,) + rest),          # 2 ranks
                                 ((half,) + (0,) * len(rest), (rows - half,) + rest),
                                 ((0,) * full.dim(), tuple(full.shape))):            # whole
            got = _region(reader, fqn, offsets, lengths, full.dtype)
            assert _bytes_of(got) == _bytes_of(tdcp.narrow(full, offsets, lengths)), (
                seed, fqn, offsets, lengths)
        cols = full.shape[1]
        for lo, hi in ((0, cols // 2), (cols // 2, cols)):                          # TP halves
            offsets = (0, lo) + (0,) * (full.dim() - 2)
            lengths = (rows, hi - lo) + tuple(full.shape[2:])
            got = _region(reader, fqn, offsets, lengths, full.dtype)
            assert _bytes_of(got) == _bytes_of(tdcp.narrow(full, offsets, lengths)), (
                seed, fqn, lo, hi)
        for _ in range(20):
            offsets = tuple(rng.randint(0, s - 1) for s in full.shape)
            lengths = tuple(rng.randint(1, s - o) for o, s in zip(offsets, full.shape))
            got = _region(reader, fqn, offsets, lengths, full.dtype)
            assert _bytes_of(got) == _bytes_of(tdcp.narrow(full, offsets, lengths)), (
                seed, fqn, offsets, lengths)


def test_a_2x2_grid_of_chunks_reads_as_rows(daemon: Daemon) -> None:
    """Chunks of a 2-D mesh (TP x FSDP) read back as a 1-D row sharding over 3 ranks."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    full = _random_tensor(gen, (30, 17), torch.float32)
    grid = {0: ((0, 0), (14, 9)), 1: ((0, 9), (14, 8)), 2: ((14, 0), (16, 9)),
            3: ((14, 9), (16, 8))}
    chunks = {r: [("m.w", full, off, size)] for r, (off, size) in grid.items()}
    _save(daemon, "dcp-grid", 1, 4, chunks)
    reader = tdcp.CheckpointReader("dcp-grid", 1, socket_path=str(daemon.socket))
    for lo, hi in ((0, 10), (10, 20), (20, 30)):
        got = _region(reader, "m.w", (lo, 0), (hi - lo, 17), torch.float32)
        assert _bytes_of(got) == _bytes_of(full[lo:hi]), (seed, lo, hi)


# -- what a read reads ---------------------------------------------------------------------------


def test_a_read_reads_only_the_manifests_and_ranges_its_boxes_need(daemon: Daemon) -> None:
    """Rows of one tensor of one rank's shard read that shard's manifest and those rows' bytes,
    in one range; touching boxes merge into one range; a column box reads the span of its rows,
    once. Counted by the reader's stats."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    a = _random_tensor(gen, (400, 300), torch.float32)
    b = _random_tensor(gen, (1000,), torch.int64)
    extra = rng.randbytes(5000)
    chunks = {0: [("a", a, (0, 0), (200, 300)), ("b", b, (0,), (1000,))],
              1: [("a", a, (200, 0), (200, 300))]}
    _save(daemon, "dcp-ranged", 3, 2, chunks, {0: [("extra", extra)]})
    shard_bytes = 200 * 300 * 4 + 1000 * 8 + len(extra)
    reader = tdcp.CheckpointReader("dcp-ranged", 3, socket_path=str(daemon.socket))
    assert reader.index.world_size == 2
    assert reader.stats.manifests_read == 2 and reader.stats.ranges_read == 2  # the indexes

    def read(what: Any) -> tdcp.ReadStats:
        before = dataclasses.replace(reader.stats)
        what()
        after = reader.stats
        return tdcp.ReadStats(after.manifests_read - before.manifests_read,
                              after.ranges_read - before.ranges_read,
                              after.bytes_read - before.bytes_read, after.largest_read_bytes)

    rows: List[bytearray] = []
    cost = read(lambda: rows.append(reader.read_region("a", (10, 0), (20, 300))))
    assert rows[0] == bytearray(_bytes_of(a[10:30])), seed
    assert (cost.manifests_read, cost.ranges_read, cost.bytes_read) == (1, 1, 20 * 300 * 4)
    assert cost.bytes_read * 10 < shard_bytes
    touching = [tdcp.ChunkRead("a", (0, 0), (40, 0), (5, 300)),
                tdcp.ChunkRead("a", (0, 0), (45, 0), (5, 300)),
                tdcp.ChunkRead("a", (0, 0), (42, 0), (4, 300))]  # inside the two others
    boxes: List[List[bytearray]] = []
    cost = read(lambda: boxes.append(_serve_boxes(reader, touching)))
    assert [bytes(x) for x in boxes[0]] == [_bytes_of(a[40:45]), _bytes_of(a[45:50]),
                                          _bytes_of(a[42:46])], seed
    assert (cost.manifests_read, cost.ranges_read, cost.bytes_read) == (0, 1, 10 * 300 * 4)
    columns = [tdcp.ChunkRead("a", (200, 0), (0, 100), (200, 10))]
    cost = read(lambda: boxes.append(_serve_boxes(reader, columns)))
    assert bytes(boxes[1][0]) == _bytes_of(a[200:, 100:110]), seed
    assert (cost.manifests_read, cost.ranges_read, cost.bytes_read) == (1, 1, 199 * 1200 + 40)
    assert read(lambda: reader.read_bytes("extra")).bytes_read == len(extra)


def test_max_shard_bytes_bounds_each_read_and_refuses_what_cannot_be_cut(daemon: Daemon) -> None:
    """With max_shard_bytes, a tensor is read in pieces no larger, rows and columns alike,
    bit-exact; a non-tensor item or an element larger is refused before a byte is read, the
    error naming the bound and the size."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    w = _random_tensor(gen, (64, 256), torch.float32)  # 64 KiB
    c = _random_tensor(gen, (3,), torch.complex128)
    extra = random.Random(seed).randbytes(10000)
    _save(daemon, "dcp-limit", 1, 1, {0: [("w", w, (0, 0), (64, 256)), ("c", c, (0,), (3,))]},
          {0: [("extra", extra)]})
    reader = tdcp.CheckpointReader("dcp-limit", 1, socket_path=str(daemon.socket),
                                   max_shard_bytes=4096)
    assert reader.read_tensor("w") == bytearray(_bytes_of(w)), seed
    assert reader.stats.ranges_read >= 1 + 16  # the index, then 64 KiB in pieces of 4 KiB
    assert reader.read_region("w", (3, 10), (61, 100)) == bytearray(_bytes_of(w[3:, 10:110]))
    assert reader.stats.largest_read_bytes <= 4096
    before = reader.stats.ranges_read
    with pytest.raises(tessera.InvalidArgumentError,
                       match=r"non-tensor item 'extra' \(job 'dcp-limit' rank 0 step 1 entry "
                             r"'b0'\) needs 10000 bytes in one read, over max_shard_bytes=4096: "
                             r"nothing was read; pass a larger max_shard_bytes"):
        reader.serve([tdcp.ChunkRead("w", (0, 0), (0, 0), (1, 1)), tdcp.ChunkRead("extra")],
                     lambda *a: pytest.fail("delivered before all were checked"))
    small = tdcp.CheckpointReader("dcp-limit", 1, socket_path=str(daemon.socket),
                                  max_shard_bytes=8)
    with pytest.raises(tessera.InvalidArgumentError, match=r"an element of tensor 'c' "
                       r"\(complex128\) needs 16 bytes in one read, over max_shard_bytes=8"):
        small.read_tensor("c")
    assert reader.stats.ranges_read == before and small.stats.ranges_read == 1  # its index
    assert tdcp.CheckpointReader("dcp-limit", 1, socket_path=str(daemon.socket),
                                 max_shard_bytes=10000).read_bytes("extra") == extra
    for bad in (0, -1, True, 2.5):
        with pytest.raises(tessera.InvalidArgumentError, match="max_shard_bytes must be None or "
                           "an int >= 1"):
            tdcp.Reader("dcp-limit", 1, max_shard_bytes=bad)


def test_a_damaged_range_is_data_loss_and_spares_the_other_ranges(daemon: Daemon) -> None:
    """A byte flipped in the daemon's slot, in the second of a chunk's three checksum blocks: a
    read over that block fails with DataLossError naming job, rank, step, entry and block; the
    rows in the other blocks still read bit-exact."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    block = 8 << 20
    w = _random_tensor(gen, (3, block // 4), torch.float32)  # row r is block r of its entry
    _save(daemon, "dcp-damaged-range", 1, 1, {0: [("w", w, (0, 0), (3, block // 4))]})
    raw = _bytes_of(w)
    bad = block + random.Random(seed).randrange(block - 64)
    path, at = daemon.slot_holding(raw[bad:bad + 64])
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(bytes([raw[bad] ^ 0x10]))
    reader = tdcp.CheckpointReader("dcp-damaged-range", 1, socket_path=str(daemon.socket))
    for row in (0, 2):
        got = reader.read_region("w", (row, 0), (1, block // 4))
        assert got == bytearray(raw[row * block:(row + 1) * block]), (seed, row)
    for offsets, lengths in (((1, 0), (1, block // 4)), ((0, 5), (3, 2))):
        with pytest.raises(tessera.DataLossError,
                           match=rf"job 'dcp-damaged-range' rank 0 step 1 entry 't0': block 1 "
                                 rf"\(bytes \[{block}, {2 * block}\) of the entry\)"):
            reader.read_region("w", offsets, lengths)


# -- readers beside the processes that save -----------------------------------------------------


_READ_IN_CHILD = """
import hashlib, sys
import tessera
import tessera.dcp as tdcp
reader = tdcp.CheckpointReader(sys.argv[1], int(sys.argv[2]))
try:
    print(hashlib.sha256(reader.read_tensor("w")).hexdigest(), flush=True)
except tessera.TesseraError as e:
    print(e, flush=True)
"""


def test_processes_read_at_once_ranks_their_saver_keeps_registered(daemon: Daemon) -> None:
    """The saving process keeps its 4 ranks registered for its next save; 3 reader processes
    read all four shards at the same time, claiming nothing, and all get every byte."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    w = _random_tensor(gen, (400, 300), torch.float32)
    _save(daemon, "dcp-contend", 11, 4, _row_chunks("w", w, [0, 100, 200, 300, 400]))
    import hashlib

    want = hashlib.sha256(_bytes_of(w)).hexdigest()
    kept = {k[1:3]: held.client for k, held in tdcp._held.items()}
    assert len(kept) == 8  # 4 ranks, each a data and an index shard
    children = [subprocess.Popen([sys.executable, "-c", _READ_IN_CHILD, "dcp-contend", "11"],
                                 env=daemon.env("unused"), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
                for _ in range(3)]
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err.decode(errors="replace")
        assert out.decode().split() == [want], (seed, out, err.decode(errors="replace")[-2000:])
    # The registrations were never taken over: the next save goes through them.
    assert {k[1:3]: held.client for k, held in tdcp._held.items()} == kept
    _save(daemon, "dcp-contend", 12, 4, _row_chunks("w", w + 1, [0, 100, 200, 300, 400]))
    assert {k[1:3]: held.client for k, held in tdcp._held.items()} == kept


_TRAINER = """
import sys, time, torch
import tessera.dcp as tdcp
job, socket, seed, last = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def save(step):
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(seed + step)) + 0.5
    for rank, lo in enumerate((0, 24)):
        part = w[lo:lo + (24 if rank == 0 else 40)].contiguous()
        tdcp.save_rank(job, step, rank, 2, [tdcp.TensorToSave(
            "w", (lo, 0), tuple(part.shape), (64, 512), "float32", 4, part.data_ptr())], [],
            socket_path=socket)

save(1)
print("ready", flush=True)
sys.stdin.readline()
for step in range(2, last + 1):
    time.sleep(0.03)  # a training step
    save(step)
print("done", flush=True)
sys.stdin.readline()  # its ranks stay registered until told to go
"""


def test_a_reader_loads_while_a_trainer_of_the_same_job_saves_on(daemon: Daemon,
                                                                 tmp_path: Path) -> None:
    """A trainer process saves the job's checkpoint step after step, keeping its two ranks
    registered throughout; a reader loads the newest complete one again and again meanwhile.
    Each load gets its step's bytes exactly, or is told the step was released under it; the
    trainer is never held up; and once it stops, still registered, the last step loads."""
    seed = _seed()
    socket = str(daemon.socket)
    last = 60

    def expected(step: int) -> bytes:
        gen = torch.Generator().manual_seed(seed + step)
        return _bytes_of(torch.randn(64, 512, generator=gen) + 0.5)

    log = tmp_path / "trainer.log"
    with open(log, "wb") as stderr:
        trainer = subprocess.Popen([sys.executable, "-c", _TRAINER, "dcp-live", socket,
                                    str(seed), str(last)], env=daemon.env("dcp-live"),
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
    outcomes: Dict[str, int] = {}
    try:
        assert trainer.stdout.readline() == b"ready\n", log.read_text()
        reader = tdcp.CheckpointReader("dcp-live", socket_path=socket)
        assert reader.read_tensor("w") == bytearray(expected(1)), seed
        trainer.stdin.write(b"go\n")
        trainer.stdin.flush()
        done = []

        def wait_done() -> None:
            done.append(trainer.stdout.readline())

        waiter = threading.Thread(target=wait_done)
        waiter.start()
        while not done:
            reader = tdcp.CheckpointReader("dcp-live", socket_path=socket)
            try:
                got = reader.read_tensor("w")
            except (tessera.NotFoundError, tessera.DataLossError) as e:
                outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
                continue
            finally:
                reader.close()
            assert got == bytearray(expected(reader.step)), (seed, reader.step)
            outcomes["exact"] = outcomes.get("exact", 0) + 1
        waiter.join()
        assert done == [b"done\n"], log.read_text()
        final = tdcp.CheckpointReader("dcp-live", socket_path=socket)
        assert final.index.step == last
        assert final.read_tensor("w") == bytearray(expected(last)), seed
        trainer.stdin.write(b"quit\n")
        trainer.stdin.flush()
        assert trainer.wait(timeout=60) == 0, log.read_text()
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
    print(f"loads while the trainer saved {last - 1} steps: {outcomes}")
    assert outcomes.get("exact", 0) > 0, outcomes


# -- which checkpoint ----------------------------------------------------------------------------


def test_the_newest_complete_step_is_read_when_none_is_named(daemon: Daemon) -> None:
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    versions = {step: _random_tensor(gen, (8, 4), torch.float32) for step in (5, 9, 12)}
    for step in (5, 9):
        _save(daemon, "dcp-latest", step, 2, _row_chunks("w", versions[step], [0, 3, 8]))
    _save(daemon, "dcp-latest", 12, 2, _row_chunks("w", versions[12], [0, 3, 8]), ranks=[0])
    reader = tdcp.CheckpointReader("dcp-latest", socket_path=str(daemon.socket))
    assert reader.index.step == 9  # step 12 lacks rank 1
    assert reader.read_tensor("w") == bytearray(_bytes_of(versions[9]))
    with pytest.raises(tessera.NotFoundError, match=r"no index for rank 1 \(job "
                       r"'dcp-latest.dcp-index'\): that rank's save did not finish"):
        tdcp.CheckpointReader("dcp-latest", 12, socket_path=str(daemon.socket)).index
    with pytest.raises(tessera.NotFoundError, match="no complete DCP checkpoint of job 'nothing'"):
        tdcp.CheckpointReader("nothing", socket_path=str(daemon.socket)).index


def test_saving_a_step_again_says_steps_must_increase(daemon: Daemon) -> None:
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4) + 1
    _save(daemon, "dcp-again", 4, 1, _row_chunks("w", w, [0, 3]))
    with pytest.raises(tessera.FailedPreconditionError,
                       match=r"saving job 'dcp-again' rank 0 step 4 .*steps must increase.*"
                             r"save under a later step or another job id"):
        _save(daemon, "dcp-again", 4, 1, _row_chunks("w", w, [0, 3]))


def test_an_index_over_its_capacity_is_refused_before_anything_is_stored(daemon: Daemon) -> None:
    w = torch.ones(1, 4)
    many = {0: [(f"layer.{i}." + "x" * 200, w, (0, 0), (1, 4)) for i in range(40)]}
    with pytest.raises(tessera.InvalidArgumentError,
                       match=r"index of rank 0 is \d+ bytes \(40 chunks, 0 other items\), over "
                             r"index_capacity=4096: pass a larger index_capacity"):
        _save(daemon, "dcp-big-index", 1, 1, many, index_capacity=4096)
    with tessera.Client(str(daemon.socket)) as client:
        assert client.list_versions("dcp-big-index") == []
        assert client.list_versions("dcp-big-index.dcp-index") == []


def test_a_reader_reads_any_index_capacity_and_deprecated_options_warn_once(
        daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """The index's length comes from its shard's manifest: a reader needs no index_capacity,
    and index_capacity and claim_timeout_s, which no longer mean anything to a reader, are
    accepted with a DeprecationWarning, once per process each."""
    monkeypatch.setattr(tdcp, "_warned_options", set())
    w = torch.arange(4, dtype=torch.float32).reshape(2, 2) + 1
    _save(daemon, "dcp-capacity", 1, 1, _row_chunks("w", w, [0, 2]), index_capacity=8192)
    socket = str(daemon.socket)
    assert tdcp.CheckpointReader("dcp-capacity", 1, socket_path=socket).read_tensor("w") == \
        bytearray(_bytes_of(w))
    with pytest.warns(DeprecationWarning, match=r"CheckpointReader: index_capacity is "
                      r"deprecated and will be removed: a reader reads each index's length from "
                      r"its shard's manifest"):
        reader = tdcp.CheckpointReader("dcp-capacity", 1, socket_path=socket,
                                       index_capacity=tdcp.INDEX_CAPACITY)
    assert reader.read_tensor("w") == bytearray(_bytes_of(w))
    with pytest.warns(DeprecationWarning, match="Reader: claim_timeout_s is deprecated and will "
                      "be removed: a reader claims no rank, so it never waits for one"):
        tdcp.Reader("dcp-capacity", 1, claim_timeout_s=5.0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        tdcp.Reader("dcp-capacity", 1, index_capacity=8192, claim_timeout_s=1.0)
        tdcp.CheckpointReader("dcp-capacity", 1, socket_path=socket, index_capacity=4096)
    with pytest.raises(tessera.InvalidArgumentError, match="index_capacity must be an int"):
        tdcp.Reader("dcp-capacity", 1, index_capacity=12)


# -- bad reads -----------------------------------------------------------------------------------


class _CountingSource(tdcp.DaemonSource):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads: List[Tuple[str, int, str]] = []

    def read(self, job_id, rank, step, entry, offset, length, out):
        self.reads.append((job_id, rank, entry))
        return super().read(job_id, rank, step, entry, offset, length, out)


def test_bad_reads_get_clear_errors_and_read_nothing(daemon: Daemon) -> None:
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    w = _random_tensor(gen, (10, 6), torch.float32)
    chunks = _row_chunks("model.w", w, [0, 4, 10])
    _save(daemon, "dcp-bad", 2, 2, chunks, {1: [("model.extra", b"x")]})
    source = _CountingSource(str(daemon.socket))
    reader = tdcp.CheckpointReader("dcp-bad", 2, source=source)
    _ = reader.index
    source.reads.clear()
    good = tdcp.ChunkRead("model.w", (0, 0), (0, 0), (4, 6))
    cases = [
        (tdcp.ChunkRead("model.v", (0, 0), (0, 0), (1, 1)), tessera.NotFoundError,
         r"'model.v' is not in the DCP checkpoint of job 'dcp-bad' step 2 \(1 tensors, 1 other "
         r"items; e.g. 'model.extra', 'model.w'\)"),
        (tdcp.ChunkRead("model.w", (3, 0), (0, 0), (1, 1)), tessera.NotFoundError,
         r"tensor 'model.w' .* has no chunk starting at \[3, 0\]; its 2 chunks start at "
         r"\[\[0, 0\], \[4, 0\]\]"),
        (tdcp.ChunkRead("model.w", (4, 0), (0, 0), (7, 6)), tessera.InvalidArgumentError,
         r"chunk at \[4, 0\] of \[6, 6\]: dimension 0: \[0, 7\) is outside \[0, 6\)"),
        (tdcp.ChunkRead("model.w", (4, 0), (0, 5), (1, 2)), tessera.InvalidArgumentError,
         r"dimension 1: \[5, 7\) is outside \[0, 6\)"),
        (tdcp.ChunkRead("model.w", (4, 0), (-1, 0), (1, 1)), tessera.InvalidArgumentError,
         r"dimension 0: \[-1, 0\) is outside"),
        (tdcp.ChunkRead("model.w", (4, 0), (0,), (1,)), tessera.InvalidArgumentError,
         "one value per dimension"),
        (tdcp.ChunkRead("model.nothing"), tessera.NotFoundError, "'model.nothing' is not in"),
    ]
    for bad, error, message in cases:
        with pytest.raises(error, match=message):
            reader.serve([good, bad], lambda *a: pytest.fail("delivered before all were checked"))
    assert source.reads == []  # every read was checked before a byte was read
    with pytest.raises(tessera.InvalidArgumentError, match=r"region of tensor 'model.w': "
                       r"dimension 1: \[2, 8\) is outside \[0, 6\)"):
        reader.read_region("model.w", (0, 2), (1, 6))
    with pytest.raises(tessera.InvalidArgumentError, match="job_id 'bad/job'"):
        tdcp.CheckpointReader("bad/job", 1)


# -- damaged indexes -----------------------------------------------------------------------------


def _index(**changes: Any) -> Dict[str, Any]:
    good = tdcp.RankIndex(
        "dcp-x", 3, 0, 2,
        (tessera.Entry("t0", 0, 48, "float32", (3, 4), tessera.EntryKind.TENSOR),
         tessera.Entry("b0", 0, 8, "bytes", (8,), tessera.EntryKind.BLOB)),
        (tdcp.TensorChunk("w", (0, 0), (3, 4), (6, 4), "float32", 4, 0, "t0"),),
        (tdcp.BytesItem("extra", 0, "b0", 5),), {"w": ("w",), "extra": ("extra",)})
    raw = json.loads(good.to_json())
    for key, value in changes.items():
        target = raw
        *path, last = key.split("/")
        for p in path:
            target = target[int(p)] if p.isdigit() else target[p]
        target[int(last) if last.isdigit() else last] = value
    return raw


@pytest.mark.parametrize("changes,message", [
    ({"format": "tessera.dcp/0"}, "is of format 'tessera.dcp/0', not 'tessera.dcp/1'"),
    ({"step": 4}, "says it is job 'dcp-x' rank 0 step 4"),
    ({"world_size": 0}, r"'world_size' must be an integer in \[1, 4294967296\], got 0"),
    ({"tensors/0/offsets": [4, 0]}, r"the chunk lies outside its tensor: .*dimension 0: "
                                    r"\[4, 7\) is outside \[0, 6\)"),
    ({"tensors/0/offsets": [-1, 0]}, r"'offsets' must be a list of at most 64 integers"),
    ({"tensors/0/sizes": [3, 4, 1]}, "offsets, sizes and size differ in dimensions"),
    ({"tensors/0/entry": "t9"}, "entry 't9' is not in the layout"),
    ({"tensors/0/entry": "b0"}, "entry 'b0' is a blob"),
    ({"tensors/0/dtype": "float64", "tensors/0/itemsize": 8},
     r"entry 't0' is float32\[3, 4\] \(48 bytes\), not float64\[3, 4\] \(96 bytes\)"),
    ({"tensors/0/itemsize": 2}, "float32 is 4 bytes an element, not 2"),
    ({"entries/0/nbytes": 1 << 40}, r"float32\[3, 4\] is not 1099511627776 bytes"),
    ({"entries/0/dtype": "quaternion"}, "'quaternion' is not a tensor dtype of Tessera"),
    ({"entries/1/name": "t0"}, "the name 't0' is used twice"),
    ({"bytes/0/length": 9}, "length 9 exceeds the capacity 8 of entry 'b0'"),
    ({"bytes/0/entry": "t0"}, "entry 't0' is a tensor"),
    ({"planner_data": {"w": [{"x": 1}]}}, r"planner_data\['w'\] must be a list"),
    ({"tensors/0/sizes": [3, True]}, "'sizes' must be a list"),
])
def test_a_damaged_index_is_named(changes: Dict[str, Any], message: str) -> None:
    data = json.dumps(_index(**changes)).encode()
    with pytest.raises(tessera.DataLossError, match=message):
        tdcp.RankIndex.from_json(data, job_id="dcp-x", step=3, rank=0)
    assert tdcp.RankIndex.from_json(json.dumps(_index()).encode(), job_id="dcp-x", step=3,
                                    rank=0).chunks[0].fqn == "w"


@pytest.mark.parametrize("data,message", [
    (b"\xff\xfe", "does not parse as JSON"),
    (b"[" * 100000 + b"]" * 100000, "does not parse as JSON"),
    (b'{"format": "tessera.dcp/1", "step": 1' + b"9" * 5000 + b"}", "does not parse as JSON"),
    (b"[]", "expected a JSON object, got list"),
    (b'{"format": "tessera.dcp/1"}', "missing 'job_id'"),
], ids=["bad-utf8", "nested-too-deep", "integer-too-long", "a-list", "no-job-id"])
def test_an_index_that_is_not_json_is_named(data: bytes, message: str) -> None:
    with pytest.raises(tessera.DataLossError, match=message):
        tdcp.RankIndex.from_json(data, job_id="dcp-x", step=3, rank=0)


def _rank(rank: int, chunks: Sequence[Tuple[Tuple[int, ...], Tuple[int, ...]]],
          size=(6, 4)) -> tdcp.RankIndex:
    entries = tuple(tessera.Entry(f"t{i}", 0, 4 * int(np.prod(s)), "float32", s,
                                  tessera.EntryKind.TENSOR) for i, (_, s) in enumerate(chunks))
    return tdcp.RankIndex("dcp-x", 3, rank, 2, entries, tuple(
        tdcp.TensorChunk("w", o, s, size, "float32", 4, rank, f"t{i}")
        for i, (o, s) in enumerate(chunks)), ())


def test_chunks_that_overlap_or_leave_a_gap_are_refused() -> None:
    tdcp.CheckpointIndex([_rank(0, [((0, 0), (3, 4))]), _rank(1, [((3, 0), (3, 4))])])
    with pytest.raises(tessera.DataLossError, match=r"chunks of tensor 'w' overlap: at \[0, 0\] "
                       r"of \[4, 4\] \(rank 0\) and at \[3, 0\] of \[2, 4\] \(rank 1\)"):
        # 16 + 8 elements: the count adds up to the tensor's 24, yet rows 3 and 5 are wrong.
        tdcp.CheckpointIndex([_rank(0, [((0, 0), (4, 4))]),
                              _rank(1, [((3, 0), (2, 4)), ((0, 0), (0, 4))])])
    with pytest.raises(tessera.DataLossError, match="chunks of tensor 'w' overlap"):
        # Volumes add up, yet two chunks overlap and a part is missing.
        tdcp.CheckpointIndex([_rank(0, [((0, 0), (3, 2)), ((0, 1), (3, 2))]),
                              _rank(1, [((3, 0), (3, 4))])])
    with pytest.raises(tessera.DataLossError, match=r"the 1 chunks of tensor 'w' hold 12 "
                       r"elements of its 24 \(\[6, 4\]\): a part is missing or stored twice"):
        tdcp.CheckpointIndex([_rank(0, [((0, 0), (3, 4))]), _rank(1, [])])
    with pytest.raises(tessera.DataLossError, match=r"'w' is float32\[6, 4\] at rank 0 but "
                       r"float32\[7, 4\] at rank 1"):
        tdcp.CheckpointIndex([_rank(0, [((0, 0), (3, 4))]),
                              _rank(1, [((3, 0), (3, 4))], size=(7, 4))])
    with pytest.raises(tessera.DataLossError, match=r"indexes of ranks \[0\] for a world of 2"):
        tdcp.CheckpointIndex([_rank(0, [((0, 0), (6, 4))])])


def test_a_damaged_index_in_the_daemon_is_named_by_the_reader(daemon: Daemon) -> None:
    """An index shard whose JSON is not an index (as a stray write could leave it): the Reader
    says which rank's index and what is wrong, and reads no shard."""
    w = torch.ones(4, 4)
    _save(daemon, "dcp-damaged", 2, 2, _row_chunks("w", w, [0, 2, 4]), ranks=[0])
    raw = _index()
    raw.update(job_id="dcp-damaged", step=2, rank=1)
    raw["tensors"][0]["offsets"] = [5, 0]
    data = json.dumps(raw).encode()
    blob = ctypes.create_string_buffer(data, tdcp.INDEX_CAPACITY)
    with tessera.Client(str(daemon.socket), when_busy="wait", use_gpu=False) as client:
        client.register("dcp-damaged.dcp-index", 1, 2, [tessera.Entry.blob(
            tdcp.INDEX_ENTRY, ctypes.addressof(blob), tdcp.INDEX_CAPACITY, len(data))])
        client.snapshot(2)
        client.wait()
    with pytest.raises(tessera.DataLossError,
                       match=r"the DCP index of job 'dcp-damaged' rank 1 step 2, tensors\[0\] "
                             r"\('w'\): .*\[5, 8\) is outside \[0, 6\)"):
        tdcp.CheckpointReader("dcp-damaged", 2, socket_path=str(daemon.socket)).index


# -- the client's read of a snapshot by entry name -----------------------------------------------


_HOLD_RANK = """
import ctypes, sys, time
import tessera
buf = ctypes.create_string_buffer(8)
with tessera.Client(sys.argv[1], when_busy="wait", use_gpu=False) as client:
    client.register("held", 0, 1, [tessera.Entry.tensor("x", ctypes.addressof(buf), "uint8",
                                                        (8,))])
    print("holding", flush=True)
    time.sleep(600)
"""


def test_read_snapshot_waits_for_a_held_rank_and_refuses_bad_layouts(daemon: Daemon) -> None:
    data = (ctypes.c_uint8 * 8)(*range(11, 19))
    layout = [tessera.Entry("x", 0, 8, "uint8", (8,), tessera.EntryKind.TENSOR)]
    with tessera.Client(str(daemon.socket), when_busy="wait", use_gpu=False) as client:
        client.register("held", 0, 1, [tessera.Entry.tensor("x", ctypes.addressof(data), "uint8",
                                                            (8,))])
        client.snapshot(1)
        client.wait()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_RANK, str(daemon.socket)],
                              env=daemon.env("held"), stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"holding\n"
        started = time.monotonic()
        with pytest.raises(tessera.FailedPreconditionError,
                           match=r"held by pid \d+.*still held after waiting 0.3 s"):
            tessera.client.read_snapshot(str(daemon.socket), "held", 0, 1, 1, layout,
                                         claim_timeout_s=0.3)
        assert time.monotonic() - started >= 0.3
    finally:
        holder.kill()
        holder.wait()
    copy = tessera.client.read_snapshot(str(daemon.socket), "held", 0, 1, 1, layout)
    assert bytes(copy.entry("x")) == bytes(range(11, 19)) and copy.step == 1
    with pytest.raises(tessera.NotFoundError, match=r"has no entry 'y' \(it has 1: 'x'\)"):
        copy.entry("y")
    with pytest.raises(tessera.InvalidArgumentError, match=r"take 64 bytes, more than the 63 "
                       r"bytes allowed \(max_bytes\)"):
        tessera.client.read_snapshot(str(daemon.socket), "held", 0, 1, 1, layout, max_bytes=63)
    with pytest.raises(tessera.InvalidArgumentError, match=r"uint8\[4\] is 4 bytes, not 8"):
        tessera.client.read_snapshot(str(daemon.socket), "held", 0, 1, 1, [
            tessera.Entry("x", 0, 8, "uint8", (4,), tessera.EntryKind.TENSOR)])
    with pytest.raises(tessera.FailedPreconditionError, match="does not match the registered"):
        tessera.client.read_snapshot(str(daemon.socket), "held", 0, 1, 1, [
            tessera.Entry("x", 0, 8, "uint8", (2, 4), tessera.EntryKind.TENSOR)])
    with pytest.raises(tessera.NotFoundError, match="no sealed step 2"):
        tessera.client.read_snapshot(str(daemon.socket), "held", 0, 1, 2, layout)
    # A read with the wrong layout restored nothing and damaged nothing.
    again = tessera.client.read_snapshot(str(daemon.socket), "held", 0, 1, 1, layout)
    assert bytes(again.entry("x")) == bytes(range(11, 19))


# -- the DCP adapters, through stand-ins of DCP's classes ----------------------------------------


class _WriteItemType(enum.Enum):
    TENSOR = 1
    SHARD = 2
    BYTE_IO = 3


class _LoadItemType(enum.Enum):
    TENSOR = 1
    BYTE_IO = 2


@dataclasses.dataclass(frozen=True)
class _MetadataIndex:
    fqn: str
    offset: Optional[torch.Size] = None
    index: Optional[int] = dataclasses.field(hash=False, compare=False, default=None)


@dataclasses.dataclass
class _ChunkStorageMetadata:
    offsets: torch.Size
    sizes: torch.Size


@dataclasses.dataclass
class _TensorProperties:
    dtype: torch.dtype


@dataclasses.dataclass
class _TensorStorageMetadata:
    properties: _TensorProperties
    size: torch.Size
    chunks: List[_ChunkStorageMetadata]


@dataclasses.dataclass
class _BytesStorageMetadata:
    pass


@dataclasses.dataclass
class _Metadata:
    state_dict_metadata: Dict[str, Any]
    planner_data: Any = None
    storage_data: Any = None


@dataclasses.dataclass(frozen=True)
class _WriteResult:
    index: _MetadataIndex
    size_in_bytes: int
    storage_data: Any


@dataclasses.dataclass(frozen=True)
class _TensorWriteData:
    chunk: _ChunkStorageMetadata
    properties: _TensorProperties
    size: torch.Size


@dataclasses.dataclass(frozen=True)
class _WriteItem:
    index: _MetadataIndex
    type: _WriteItemType
    tensor_data: Optional[_TensorWriteData] = None


@dataclasses.dataclass(frozen=True)
class _SavePlan:
    items: List[_WriteItem]
    storage_data: Any = None
    planner_data: Any = None


@dataclasses.dataclass(frozen=True)
class _ReadItem:
    type: _LoadItemType
    dest_index: _MetadataIndex
    dest_offsets: torch.Size
    storage_index: _MetadataIndex
    storage_offsets: torch.Size
    lengths: torch.Size


@dataclasses.dataclass
class _LoadPlan:
    items: List[_ReadItem]
    storage_data: Any = None
    planner_data: Any = None


@dataclasses.dataclass
class _StorageMeta:
    checkpoint_id: Any = None


def _stand_ins() -> Any:
    import types

    return types.SimpleNamespace(
        Metadata=_Metadata, MetadataIndex=_MetadataIndex,
        TensorStorageMetadata=_TensorStorageMetadata, BytesStorageMetadata=_BytesStorageMetadata,
        ChunkStorageMetadata=_ChunkStorageMetadata, TensorProperties=_TensorProperties,
        StorageMeta=_StorageMeta, WriteResult=_WriteResult, WriteItemType=_WriteItemType,
        LoadItemType=_LoadItemType, Future=torch.futures.Future)


class _SavePlanner:
    """What DCP's default planner hands the writer: tensor chunks (views, not contiguous here)
    and serialised items."""

    def __init__(self, values: Dict[Tuple[str, Any], Any]) -> None:
        self.values = values

    def resolve_data(self, item: _WriteItem) -> Any:
        value = self.values[(item.index.fqn, item.index.offset)]
        return io.BytesIO(value) if isinstance(value, bytes) else value


class _LoadPlanner:
    """DCP's default load planning, cut down: each destination chunk against every stored chunk
    it meets (DCP's create_read_items)."""

    def __init__(self, dest: Dict[str, Any], dest_offsets: Dict[str, Tuple[int, ...]]) -> None:
        self.dest = dest
        self.dest_offsets = dest_offsets
        self.loaded_bytes: Dict[str, bytes] = {}
        self.committed = 0

    def plan(self, metadata: _Metadata) -> _LoadPlan:
        items = []
        for fqn, target in self.dest.items():
            md = metadata.state_dict_metadata[fqn]
            if isinstance(md, _BytesStorageMetadata):
                items.append(_ReadItem(_LoadItemType.BYTE_IO, _MetadataIndex(fqn), torch.Size(),
                                       _MetadataIndex(fqn), torch.Size(), torch.Size()))
                continue
            offsets = self.dest_offsets[fqn]
            for i, chunk in enumerate(md.chunks):
                common = tdcp._intersect(offsets, tuple(target.shape), tuple(chunk.offsets),
                                         tuple(chunk.sizes)) if target.dim() else ((), ())
                if common is None:
                    continue
                at, lengths = common
                items.append(_ReadItem(
                    _LoadItemType.TENSOR, _MetadataIndex(fqn, torch.Size(offsets)),
                    torch.Size([a - o for a, o in zip(at, offsets)]),
                    _MetadataIndex(fqn, chunk.offsets, i),
                    torch.Size([a - o for a, o in zip(at, chunk.offsets)]), torch.Size(lengths)))
        return _LoadPlan(items)

    def resolve_tensor(self, item: _ReadItem) -> torch.Tensor:
        return tdcp.narrow(self.dest[item.dest_index.fqn], item.dest_offsets, item.lengths)

    def commit_tensor(self, item: _ReadItem, tensor: torch.Tensor) -> None:
        self.committed += 1

    def load_bytes(self, item: _ReadItem, value: io.BytesIO) -> None:
        self.loaded_bytes[item.dest_index.fqn] = value.read()


def test_writer_and_reader_adapters_reshard_4_fsdp_ranks_to_2_tp_ranks(
        daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writer.write_data on 4 ranks (each a row chunk, FSDP-like), Reader.read_data on 2 ranks
    (column halves, TP-like), with DCP's classes stood in for: bit-exact."""
    monkeypatch.setattr(tdcp, "_types", _stand_ins)
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    w = _random_tensor(gen, (21, 10), torch.bfloat16)
    step_count = torch.tensor(77, dtype=torch.int64)
    extra = bytes(random.Random(seed).randrange(256) for _ in range(300))
    bounds = [0, 6, 11, 16, 21]
    # A column-major copy: every row chunk of it is a view that is not contiguous.
    w_storage = w.t().contiguous().t()
    plans, planners = [], []
    for r in range(4):
        items, values = [], {}
        offsets = torch.Size([bounds[r], 0])
        sizes = torch.Size([bounds[r + 1] - bounds[r], 10])
        index = _MetadataIndex("model.w", offsets)
        items.append(_WriteItem(index, _WriteItemType.SHARD, _TensorWriteData(
            _ChunkStorageMetadata(offsets, sizes), _TensorProperties(torch.bfloat16),
            torch.Size([21, 10]))))
        values[("model.w", offsets)] = w_storage[bounds[r]:bounds[r + 1]]
        if r == 0:
            index = _MetadataIndex("optim.step", torch.Size([]))
            items.append(_WriteItem(index, _WriteItemType.TENSOR, _TensorWriteData(
                _ChunkStorageMetadata(torch.Size([]), torch.Size([])),
                _TensorProperties(torch.int64), torch.Size([]))))
            values[("optim.step", torch.Size([]))] = step_count
        if r == 3:
            items.append(_WriteItem(_MetadataIndex("extra"), _WriteItemType.BYTE_IO))
            values[("extra", None)] = extra
        plans.append(_SavePlan(items, planner_data={"model.w": ("model", "w"),
                                                    "optim.step": ("optim", "step"),
                                                    "extra": ("extra",)}))
        planners.append(_SavePlanner(values))
    assert not w_storage[6:11].is_contiguous()

    writers = [tdcp.Writer(socket_path=str(daemon.socket)) for _ in range(4)]
    for r, writer in enumerate(writers):
        writer.reset("tessera://dcp-adapters/30")
        writer.set_up_storage_writer(r == 0, rank=r)
        assert writer.storage_meta().checkpoint_id == "tessera://dcp-adapters/30"
        plans[r] = writer.prepare_local_plan(plans[r])
    plans = writers[0].prepare_global_plan(plans)
    results = [writer.write_data(plan, planner).wait()
               for writer, plan, planner in zip(writers, plans, planners)]
    writers[0].finish(None, results)
    assert [len(r) for r in results] == [2, 1, 1, 2]
    assert results[0][0].index == _MetadataIndex("model.w", torch.Size([0, 0]))
    assert results[0][0].size_in_bytes == 6 * 10 * 2
    assert results[3][1].storage_data == tdcp.StoredAt(3, "b0")

    for tp_rank, (lo, hi) in enumerate(((0, 5), (5, 10))):
        reader = tdcp.Reader(socket_path=str(daemon.socket))
        reader.reset("tessera://dcp-adapters/30")
        metadata = reader.read_metadata()
        md = metadata.state_dict_metadata["model.w"]
        assert (md.size, md.properties.dtype) == (torch.Size([21, 10]), torch.bfloat16)
        assert [tuple(c.offsets) for c in md.chunks] == [(b, 0) for b in bounds[:4]]
        assert isinstance(metadata.state_dict_metadata["extra"], _BytesStorageMetadata)
        assert metadata.planner_data["model.w"] == ("model", "w")
        reader.set_up_storage_reader(metadata, tp_rank == 0, rank=tp_rank)
        dest = {"model.w": torch.zeros(21, hi - lo, dtype=torch.bfloat16),
                "optim.step": torch.tensor(0, dtype=torch.int64), "extra": None}
        planner = _LoadPlanner(dest, {"model.w": (0, lo), "optim.step": ()})
        plan = reader.prepare_global_plan([reader.prepare_local_plan(planner.plan(metadata))])[0]
        reader.read_data(plan, planner).wait()
        assert _bytes_of(dest["model.w"]) == _bytes_of(w[:, lo:hi]), (seed, tp_rank)
        assert dest["optim.step"].item() == 77
        assert planner.loaded_bytes["extra"] == extra
        assert planner.committed == 5  # 4 chunks of model.w, one of optim.step


def _cuts(rng: random.Random, n: int, parts: int) -> List[int]:
    """Bounds splitting range(n) into `parts` non-empty, uneven pieces."""
    return [0] + sorted(rng.sample(range(1, n), parts - 1)) + [n]


@pytest.mark.parametrize("saved,loaded,save_dim,load_dim", [
    (3, 2, 0, 1), (2, 5, 1, 0), (4, 3, 0, 0), (1, 4, 0, 1)])
def test_the_reader_adapter_loads_n_saved_ranks_into_m_bit_exact(
        daemon: Daemon, monkeypatch: pytest.MonkeyPatch, saved: int, loaded: int, save_dim: int,
        load_dim: int) -> None:
    """Tensors saved by `saved` ranks, split along `save_dim`, loaded through Reader.read_data
    by `loaded` ranks split along `load_dim` (DCP's classes stood in for), in parts of at most
    256 bytes copied into the planner's tensors (views of each rank's shard, not contiguous
    when split by columns): every rank's shard bit-exact."""
    monkeypatch.setattr(tdcp, "_types", _stand_ins)
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    rows, cols = rng.randint(2 * max(saved, loaded), 40), rng.randint(2 * max(saved, loaded), 30)
    full = {"model.w": _random_tensor(gen, (rows, cols, rng.randint(1, 4)), torch.float32),
            "model.h": _random_tensor(gen, (rows, cols), torch.bfloat16)}
    job = f"dcp-nm-{saved}-{loaded}-{save_dim}{load_dim}"
    chunks: Dict[int, list] = {r: [] for r in range(saved)}
    for fqn, t in full.items():
        bounds = _cuts(rng, t.shape[save_dim], saved)
        for r in range(saved):
            offsets = [0] * t.dim()
            sizes = list(t.shape)
            offsets[save_dim], sizes[save_dim] = bounds[r], bounds[r + 1] - bounds[r]
            chunks[r].append((fqn, t, tuple(offsets), tuple(sizes)))
    _save(daemon, job, 1, saved, chunks)

    bounds = {fqn: _cuts(rng, t.shape[load_dim], loaded) for fqn, t in full.items()}
    for r in range(loaded):
        reader = tdcp.Reader(socket_path=str(daemon.socket), max_shard_bytes=256)
        reader.reset(f"tessera://{job}/1")
        metadata = reader.read_metadata()
        reader.set_up_storage_reader(metadata, r == 0)
        dest, where = {}, {}
        for fqn, t in full.items():
            offsets = [0] * t.dim()
            sizes = list(t.shape)
            offsets[load_dim] = bounds[fqn][r]
            sizes[load_dim] = bounds[fqn][r + 1] - bounds[fqn][r]
            dest[fqn] = torch.zeros(sizes, dtype=t.dtype)
            where[fqn] = tuple(offsets)
        planner = _LoadPlanner(dest, where)
        plan = planner.plan(metadata)
        reader.read_data(plan, planner).wait()
        assert planner.committed == len(plan.items)
        assert 0 < reader.reader.stats.largest_read_bytes <= 256
        for fqn, t in full.items():
            want = tdcp.narrow(t, where[fqn], tuple(dest[fqn].shape))
            assert _bytes_of(dest[fqn]) == _bytes_of(want), (seed, r, fqn)


def test_the_adapters_say_what_they_need(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tdcp, "_types", _stand_ins)
    with pytest.raises(tessera.InvalidArgumentError, match=r"needs a job id and a step: "
                       r"Writer\(job_id, step=...\), or dcp.save\(..., checkpoint_id="):
        tdcp.Writer().set_up_storage_writer(True)
    with pytest.raises(tessera.InvalidArgumentError, match="use_collectives=False is not"):
        tdcp.Writer("j", 1).set_up_storage_writer(True, rank=0, use_collectives=False)
    with pytest.raises(tessera.InvalidArgumentError, match="is not a Tessera checkpoint id: "
                       "write 'tessera://JOB/STEP'"):
        tdcp.Writer().reset("/checkpoints/step-10")
    assert tdcp.Writer.validate_checkpoint_id("tessera://run7/10")
    assert not tdcp.Reader.validate_checkpoint_id("/checkpoints/step-10")
    assert not tdcp.Reader.validate_checkpoint_id("tessera://run7/latest")
    with pytest.raises(tessera.FailedPreconditionError, match="got a plan its "
                       "prepare_global_plan did not make"):
        tdcp.Writer("j", 1).write_data(_SavePlan([]), _SavePlanner({}))
    with pytest.raises(tessera.NotFoundError, match="no complete DCP checkpoint of job 'absent'"):
        tdcp.Reader("absent", socket_path=str(daemon.socket)).read_metadata()


# -- the real torch.distributed.checkpoint -------------------------------------------------------


def test_dcp_save_and_load_through_tessera(daemon: Daemon) -> None:
    """dcp.save with tessera.dcp.Writer and dcp.load with tessera.dcp.Reader, one process."""
    missing = tdcp.dcp_available()
    if missing:
        pytest.skip(f"torch.distributed.checkpoint is not usable with PyTorch {torch.__version__}"
                    f" here ({missing}); tests/gpu/dcp_on_device.py runs this with PyTorch 2.x")
    import torch.distributed.checkpoint as dcp

    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    state = {"model": {"w": _random_tensor(gen, (64, 33), torch.float32),
                       "b": _random_tensor(gen, (33,), torch.bfloat16)},
             "step": 12, "note": "abc"}
    want = {k: v.clone() for k, v in state["model"].items()}
    dcp.save(state, storage_writer=tdcp.Writer("dcp-real", 12, socket_path=str(daemon.socket)),
             no_dist=True)
    loaded = {"model": {k: torch.zeros_like(v) for k, v in want.items()}, "step": 0,
              "note": ""}
    dcp.load(loaded, storage_reader=tdcp.Reader("dcp-real", 12, socket_path=str(daemon.socket)),
             no_dist=True)
    for k, v in want.items():
        assert _bytes_of(loaded["model"][k]) == _bytes_of(v), (seed, k)
    assert loaded["step"] == 12 and loaded["note"] == "abc"


# -- what a save through DCP costs next to a snapshot --------------------------------------------


def test_what_a_dcp_save_costs_next_to_a_snapshot(daemon: Daemon) -> None:
    """Prints (pytest -s) the time the training thread spends on a Snapshotter snapshot and on the
    Tessera part of a DCP save through tessera.dcp.Writer (write_data: copy, seal, for both
    jobs; with keep_registered=False also register, map and release each time), for the same
    64 MiB of parameters; DCP's own planning (a gather and a scatter of the plans, a gather of
    the results) comes on top and is not measured here. Then what a load of it costs: the
    ranged reader filling tensors of the state's shapes (as Reader.read_data does), the whole
    shard through tessera.client.read_snapshot (register, restore, unregister: what the Reader
    did before), and a copy of the same bytes between tensors as the limit. Timings are
    printed, not asserted; the saved and loaded bytes are checked."""
    import statistics

    import tessera.torch

    seed = _seed()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(16)])
    state = model.state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    snapshotter = tessera.torch.Snapshotter(model, None, job_id="dcp-cost-snapshotter",
                                            socket_path=str(daemon.socket), when_busy="wait")
    blocked, sealed = [], []
    try:
        for step in range(5):
            start = time.perf_counter()
            snapshotter.step(step)
            blocked.append(time.perf_counter() - start)
            snapshotter.wait()
            sealed.append(time.perf_counter() - start)
    finally:
        snapshotter.close(drop=True)
    tensors = [tdcp.TensorToSave(name, (0,) * t.dim(), tuple(t.shape), tuple(t.shape),
                                 "float32", 4, t.data_ptr()) for name, t in state.items()]
    saves: Dict[bool, List[float]] = {True: [], False: []}
    for keep in (False, True):
        for step in range(5):
            start = time.perf_counter()
            tdcp.save_rank(f"dcp-cost-{keep}", step, 0, 1, tensors, [], keep_registered=keep,
                           socket_path=str(daemon.socket))
            saves[keep].append(time.perf_counter() - start)
    reader = tdcp.CheckpointReader("dcp-cost-True", 4, socket_path=str(daemon.socket))
    reads = [tdcp.ChunkRead(name, (0,) * t.dim(), (0,) * t.dim(), tuple(t.shape))
             for name, t in state.items()]
    got = {read.fqn: bytes(box) for read, box in zip(reads, _serve_boxes(reader, reads))}
    assert got == {name: _bytes_of(t) for name, t in state.items()}, seed

    loaded = {name: torch.empty_like(t) for name, t in state.items()}

    def fill(read: tdcp.ChunkRead, chunk: tdcp.TensorChunk, part: tdcp.ReadPart) -> None:
        tdcp.narrow(loaded[read.fqn], part.at, part.lengths).copy_(
            tdcp.part_tensor(read, chunk, part))

    layout = reader.index.layout(0)
    loads: Dict[str, List[float]] = {"ranged": [], "again": [], "read_snapshot": [], "copy": []}
    for _ in range(5):
        for name in loaded:
            loaded[name].fill_(0)
        start = time.perf_counter()
        again = tdcp.CheckpointReader("dcp-cost-True", 4, socket_path=str(daemon.socket))
        again.serve(reads, fill)
        loads["ranged"].append(time.perf_counter() - start)
        assert all(_bytes_of(loaded[n]) == _bytes_of(t) for n, t in state.items()), seed
        start = time.perf_counter()
        again.serve(reads, fill)
        loads["again"].append(time.perf_counter() - start)
        again.close()
        start = time.perf_counter()
        tessera.client.read_snapshot(str(daemon.socket), "dcp-cost-True", 0, 1, 4, layout)
        loads["read_snapshot"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for name, t in state.items():
            loaded[name].copy_(t)
        loads["copy"].append(time.perf_counter() - start)

    def ms(values: List[float]) -> str:
        return f"median {statistics.median(values) * 1e3:.1f} ms (max {max(values) * 1e3:.1f})"

    def rate(values: List[float]) -> str:
        return f"{nbytes / statistics.median(values) / 1e9:.2f} GB/s"

    print(f"{nbytes / 2**20:.0f} MiB in {len(state)} tensors, 5 each: Snapshotter.step blocked "
          f"{ms(blocked)}, sealed {ms(sealed)} after it; tessera.dcp save of the same (blocks "
          f"until sealed) {ms(saves[True])}, with keep_registered=False {ms(saves[False])}")
    ratio = statistics.median(loads["copy"]) / statistics.median(loads["again"])
    print(f"load of the same: the ranged reader into tensors {ms(loads['ranged'])}, "
          f"{rate(loads['ranged'])} (again, through the reader's open connection "
          f"{ms(loads['again'])}, {rate(loads['again'])}); read_snapshot of the shard "
          f"{ms(loads['read_snapshot'])}, "
          f"{rate(loads['read_snapshot'])}; a copy between tensors (the limit) "
          f"{ms(loads['copy'])}, {rate(loads['copy'])}; the load again / limit {ratio:.2f}")


def test_a_kept_registration_stays_through_a_read_in_the_same_process_and_a_new_layout(
        daemon: Daemon) -> None:
    """A save keeps its ranks registered; a read of them in the same process claims nothing, so
    the next save goes through the same registration; a save of another layout registers anew.
    A job holds one complete checkpoint: the older ones are released, which a read says."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    socket = str(daemon.socket)

    def kept() -> Dict[str, Any]:
        return {k[1]: held.client for k, held in tdcp._held.items()}

    first = _random_tensor(gen, (6, 4), torch.float32)
    _save(daemon, "dcp-kept", 1, 1, _row_chunks("w", first, [0, 6]))
    clients = kept()
    assert set(clients) == {"dcp-kept", "dcp-kept.dcp-index"}
    assert tdcp.CheckpointReader("dcp-kept", 1, socket_path=socket).read_tensor("w") == \
        bytearray(_bytes_of(first))
    assert kept() == clients
    second = _random_tensor(gen, (6, 4), torch.float32)
    _save(daemon, "dcp-kept", 2, 1, _row_chunks("w", second, [0, 6]))  # the same registration
    assert kept() == clients
    assert tdcp.CheckpointReader("dcp-kept", 2, socket_path=socket).read_tensor("w") == \
        bytearray(_bytes_of(second))
    third = _random_tensor(gen, (5, 4), torch.float32)
    _save(daemon, "dcp-kept", 3, 1, _row_chunks("w", third, [0, 5]))  # another layout
    assert kept()["dcp-kept"] is not clients["dcp-kept"]
    assert kept()["dcp-kept.dcp-index"] is clients["dcp-kept.dcp-index"]
    assert tdcp.CheckpointReader("dcp-kept", 3, socket_path=socket).read_tensor("w") == \
        bytearray(_bytes_of(third))
    with tessera.Client(socket, use_gpu=False) as client:
        assert [(v.rank, v.step) for v in client.list_versions("dcp-kept") if v.sealed] == [(0, 3)]
    with pytest.raises(tessera.NotFoundError, match=r"step 2 has no index for rank 0 .*the "
                       r"daemons no longer hold the step \(.*no sealed step 2; sealed steps "
                       r"here: 3"):
        tdcp.CheckpointReader("dcp-kept", 2, socket_path=socket).index


class _ChunksGoneSource(tdcp.DaemonSource):
    """The daemon's answers, except that the chunks (not the index) of the step are gone, as
    between the last rank's chunks and its index being sealed by the next save."""

    def manifest(self, job_id, rank, step):
        if not job_id.endswith(tdcp.INDEX_JOB_SUFFIX):
            raise tessera.NotFoundError(f"job '{job_id}' rank {rank} has no sealed step {step}")
        return super().manifest(job_id, rank, step)


def test_an_index_whose_chunks_are_gone_is_named(daemon: Daemon) -> None:
    _save(daemon, "dcp-gone", 5, 1, _row_chunks("w", torch.ones(2, 2), [0, 2]))
    reader = tdcp.CheckpointReader("dcp-gone", 5, source=_ChunksGoneSource(str(daemon.socket)))
    with pytest.raises(tessera.NotFoundError, match=r"step 5 has an index for rank 0 but not its "
                       r"chunks \(job 'dcp-gone' rank 0 has no sealed step 5\): a newer "
                       r"checkpoint's chunks were sealed by every rank"):
        reader.read_tensor("w")
