"""``torch.distributed.checkpoint`` (DCP) over Tessera: a `Writer` and a `Reader` that keep a DCP
checkpoint in the daemons' shared memory instead of files.

::

    import torch.distributed.checkpoint as dcp
    import tessera.dcp

    dcp.save(state_dict, storage_writer=tessera.dcp.Writer("run7-dcp", step=1000))
    ...  # later, possibly with another world size, FSDP, TP or DP layout:
    dcp.load(state_dict, storage_reader=tessera.dcp.Reader("run7-dcp", step=1000))

DCP plans which chunk of which tensor each rank writes and, on load, which byte ranges of which
stored chunks each rank needs for the layout it loads into (its resharding); Tessera stores the
chunks and serves those ranges. A checkpoint is keyed by (job id, step) and lives in two Tessera
jobs:

* ``JOB``: one shard per saving rank holding its chunks (one tensor entry each, in the tensor's
  own dtype and shape where Tessera knows the dtype, else as bytes) and its non-tensor items
  (one blob each, the bytes DCP serialised);
* ``JOB.dcp-index`` (`INDEX_JOB_SUFFIX`): one shard per saving rank holding its *index*, a JSON
  blob of fixed capacity (`INDEX_CAPACITY`) saying which fully qualified name (FQN) and which
  chunk each entry of its ``JOB`` shard holds, the shard's layout, and the planner's data. It is
  sealed after the rank's chunks are, so an index at a step means the chunks are there.

Steps must increase per job (a Tessera rule), and a job holds one complete checkpoint: the
daemons release a rank's step once every rank of the job has sealed a newer one. A save in
progress leaves the previous checkpoint readable, except for the moment between the last rank's
chunks and its index being sealed (the data job has moved on, the index job not yet), when a read
of either step fails with NotFoundError and can be retried.

Reading. A reader reads the manifest of each shard its reads need, then only the byte ranges they
need, through the reader calls of the C ABI (`tessera.client.Client.read_manifest` and
`read_range`): the daemon serves a shard from its own memory, copies it from the node that holds
it or rebuilds it from fragments, and every block a range overlaps is checked against the
snapshot's CRC32C after it is copied out. Nothing is registered or claimed, so a process that
keeps its ranks registered between saves, or goes on saving, is not disturbed. The ranges one
stored chunk must give are merged where they touch and cut into pieces of at most
`max_shard_bytes` (default `READ_PIECE_BYTES`), each of a few rows at a time when a box is not
contiguous (the bytes between its rows are read too, at most one checksum block's worth per
piece, as checking a range reads its whole blocks anyway); the pieces are read on a few threads,
at most twice as many held at once as there are threads. A non-tensor item (refused when over
`max_shard_bytes`) and an index are read whole.

The Tessera side is plain Python, usable and tested without DCP: `save_rank` stores one rank's
chunks and index, `CheckpointIndex` merges the ranks' indexes into DCP's view of the checkpoint
(every chunk checked against the tensor's bounds, the chunks of a tensor covering it exactly once),
and `CheckpointReader` serves chunk ranges (`CheckpointReader.serve`, in parts: see `ReadPart`)
and regions of whole tensors assembled from every chunk they cross
(`CheckpointReader.read_region`). `Writer` and `Reader` are thin adapters to DCP's
``StorageWriter`` and ``StorageReader``; they need PyTorch >= 2.2 (DCP's current API) and are
imported from it when this module is.

Bytes read out of the daemons are not trusted: an index is parsed as JSON (never unpickled), and
every name, dtype, dimension, offset and length in it is bounded and cross-checked before it
sizes an allocation or a copy.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import dataclasses
import io
import itertools
import json
import logging
import math
import os
import re
import threading
import warnings
from dataclasses import dataclass
from typing import (Any, Callable, Deque, Dict, Iterator, List, Mapping, Optional, Sequence,
                    Tuple, Union)

from .client import DTYPE_BYTES, Client, Entry, EntryKind, _register_when_free
from .errors import (DataLossError, FailedPreconditionError, InternalError, InvalidArgumentError,
                     NotFoundError, TesseraError)

try:  # DCP's base classes, when this PyTorch has them (torch.distributed.checkpoint, >= 2.2).
    from torch.distributed.checkpoint import StorageReader as _StorageReaderBase
    from torch.distributed.checkpoint import StorageWriter as _StorageWriterBase
    _DCP_MISSING = ""
except Exception as _e:  # not installed, too old, or (PyTorch 1.13 on Python 3.11) broken
    _StorageReaderBase = object  # type: ignore[misc,assignment]
    _StorageWriterBase = object  # type: ignore[misc,assignment]
    _DCP_MISSING = f"{type(_e).__name__}: {_e}"

__all__ = [
    "BytesItem",
    "BytesToSave",
    "CheckpointIndex",
    "CheckpointReader",
    "ChunkRead",
    "DEFAULT_SOCKET_PATH",
    "DaemonSnapshotSource",
    "DaemonSource",
    "FORMAT",
    "INDEX_CAPACITY",
    "INDEX_ENTRY",
    "INDEX_JOB_SUFFIX",
    "READ_PIECE_BYTES",
    "RankIndex",
    "ReadPart",
    "ReadStats",
    "Reader",
    "StoredAt",
    "TensorChunk",
    "TensorInfo",
    "TensorToSave",
    "SnapshotCheckpoint",
    "SnapshotReader",
    "Writer",
    "box_runs",
    "chunk_tensor",
    "copy_box",
    "dcp_available",
    "narrow",
    "parse_checkpoint_id",
    "part_tensor",
    "release",
    "save_rank",
]

_log = logging.getLogger("tessera.dcp")

FORMAT = "tessera.dcp/1"
"""The index format this module writes and reads."""

INDEX_JOB_SUFFIX = ".dcp-index"
"""The indexes of checkpoint job ``JOB`` are the Tessera job ``JOB + INDEX_JOB_SUFFIX``."""

INDEX_CAPACITY = 4 << 20
"""The capacity of a rank's index blob that a `Writer` registers, bytes (a reader reads the index's
length from its shard's manifest, whatever the capacity); about 100 bytes per chunk and per FQN of
the planner's data, so 4 MiB holds some 30,000 chunks per rank."""

READ_PIECE_BYTES = 16 << 20
"""Without ``max_shard_bytes``, the most bytes of tensor data a reader holds for one read from the
daemon (two of its 8 MiB checksum blocks)."""

INDEX_ENTRY = "dcp.index"
"""The name of the index blob in its shard."""

DEFAULT_SOCKET_PATH = "/run/tessera/agent.sock"
"""The daemon's default ``agent.socket_path`` (as ``tessera.torch.DEFAULT_SOCKET_PATH``); the
environment variable ``TESSERA_SOCKET`` overrides it."""

_MAX_NAME_BYTES = 256        # an entry name, as the daemon bounds it
_MAX_FQN_BYTES = 16 << 10    # an FQN in an index
_MAX_DIMS = 64
_MAX_DIM = 1 << 62
_MAX_ENTRIES = 100_000       # entries of one registration, as the daemon bounds it
_MAX_ITEMSIZE = 64
_MAX_INDEX_BYTES = 1 << 30   # an index blob read, whatever its manifest says
_DEFAULT_BLOCK_BYTES = 8 << 20  # the agent's CRC32C block, for a manifest that does not say
_JOB_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_CHECKPOINT_ID = re.compile(r"tessera://([^/]+)/([0-9]+)")

Shape = Tuple[int, ...]


def dcp_available() -> str:
    """"" when `Writer` and `Reader` can be used; otherwise why not (DCP did not import)."""
    return _DCP_MISSING


def _socket_path(socket_path: Optional[str]) -> str:
    return socket_path or os.environ.get("TESSERA_SOCKET") or DEFAULT_SOCKET_PATH


def _check_job_id(job_id: Any) -> str:
    if not isinstance(job_id, str):
        raise TypeError(f"job_id must be a str, got {type(job_id).__name__}")
    longest = 128 - len(INDEX_JOB_SUFFIX)
    if not 1 <= len(job_id) <= longest or not _JOB_ID.fullmatch(job_id):
        raise InvalidArgumentError(
            f"job_id {job_id!r}: a DCP checkpoint's job id is 1..{longest} characters of letters, "
            f"digits, '.', '_' and '-', not starting with '.' (its index job adds "
            f"'{INDEX_JOB_SUFFIX}')")
    return job_id


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"step must be an int, got {type(step).__name__} {step!r}")
    if step < 0:
        raise InvalidArgumentError(f"step must be >= 0, got {step}")
    return step


def parse_checkpoint_id(checkpoint_id: Union[str, "os.PathLike[str]"]) -> Tuple[str, int]:
    """(job id, step) of a DCP ``checkpoint_id`` of the form ``"tessera://JOB/STEP"``.

    Raises:
        InvalidArgumentError: another form, or a bad job id.
    """
    text = os.fspath(checkpoint_id)
    if not isinstance(text, str):
        raise TypeError(f"checkpoint_id must be a str, got {type(text).__name__}")
    match = _CHECKPOINT_ID.fullmatch(text)
    if match is None:
        raise InvalidArgumentError(
            f"checkpoint_id {text!r} is not a Tessera checkpoint id: write "
            "'tessera://JOB/STEP', e.g. 'tessera://run7-dcp/1000'")
    return _check_job_id(match.group(1)), int(match.group(2))


# -- the shape of a tensor's bytes ---------------------------------------------------------------


def _volume(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _check_box(what: str, shape: Shape, offsets: Sequence[int],
               lengths: Sequence[int]) -> Tuple[Shape, Shape]:
    """(offsets, lengths) as tuples of ints, checked to lie within `shape`."""
    offsets = tuple(offsets)
    lengths = tuple(lengths)
    if len(offsets) != len(shape) or len(lengths) != len(shape):
        raise InvalidArgumentError(
            f"{what}: offsets {list(offsets)} and lengths {list(lengths)} must have one value per "
            f"dimension of its shape {list(shape)}")
    for d, (o, n, s) in enumerate(zip(offsets, lengths, shape)):
        if isinstance(o, bool) or isinstance(n, bool) or not isinstance(o, int) \
                or not isinstance(n, int):
            raise TypeError(f"{what}: offsets and lengths must be ints, got {o!r} and {n!r}")
        if o < 0 or n < 0 or o + n > s:
            raise InvalidArgumentError(
                f"{what}: dimension {d}: [{o}, {o + n}) is outside [0, {s}) (offsets "
                f"{list(offsets)}, lengths {list(lengths)}, shape {list(shape)})")
    return offsets, lengths


def _contiguous_from(shape: Shape, offsets: Shape, lengths: Shape) -> int:
    """The first dimension k such that the box is contiguous over dimensions k.. in `shape`'s
    row-major layout (every dimension after k is whole); 0 when all of it is."""
    k = len(shape) - 1
    while k >= 0 and offsets[k] == 0 and lengths[k] == shape[k]:
        k -= 1
    return max(k, 0)


def _strides(shape: Shape, itemsize: int) -> List[int]:
    strides = [itemsize] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    return strides


def box_runs(shape: Sequence[int], itemsize: int, offsets: Sequence[int],
             lengths: Sequence[int]) -> Iterator[Tuple[int, int]]:
    """The (byte offset, byte length) runs of the box [offsets, offsets + lengths) in a row-major
    tensor of `shape` and `itemsize`, in the box's row-major order, each as long as it can be
    (trailing whole dimensions merge into one run). Nothing for an empty box.

    Raises:
        InvalidArgumentError: the box does not lie within `shape`.
    """
    shape = tuple(shape)
    offsets, lengths = _check_box("box", shape, offsets, lengths)
    if isinstance(itemsize, bool) or not isinstance(itemsize, int) or itemsize < 1:
        raise InvalidArgumentError(f"box: itemsize must be an int >= 1, got {itemsize!r}")
    return _runs(shape, itemsize, offsets, lengths)


def _runs(shape: Shape, itemsize: int, offsets: Shape, lengths: Shape) -> Iterator[Tuple[int, int]]:
    if _volume(lengths) == 0:
        return
    if not shape:
        yield 0, itemsize
        return
    k = _contiguous_from(shape, offsets, lengths)
    strides = _strides(shape, itemsize)
    run = _volume(lengths[k:]) * itemsize
    start = offsets[k] * strides[k]
    for index in itertools.product(*(range(o, o + n) for o, n in zip(offsets[:k], lengths[:k]))):
        yield start + sum(i * s for i, s in zip(index, strides)), run


def copy_box(src: memoryview, src_shape: Sequence[int], src_offsets: Sequence[int],
             dst: memoryview, dst_shape: Sequence[int], dst_offsets: Sequence[int],
             lengths: Sequence[int], itemsize: int, *, src_start: int = 0) -> int:
    """Copies the box of `lengths` at `src_offsets` in row-major `src` (of `src_shape`) to
    `dst_offsets` in row-major `dst` (of `dst_shape`), both of elements of `itemsize` bytes, run
    by run. Returns the bytes copied. `src` may hold only bytes [src_start, src_start + len(src))
    of its tensor (a `ReadPart`'s data), as long as the box lies within them.

    Raises:
        InvalidArgumentError: a box outside its shape, or a buffer that does not hold it.
    """
    src_shape, dst_shape = tuple(src_shape), tuple(dst_shape)
    if len(src_shape) != len(dst_shape):
        raise InvalidArgumentError(
            f"copy_box: source shape {list(src_shape)} and destination shape {list(dst_shape)} "
            "differ in dimensions")
    src_offsets, lengths = _check_box("copy_box source", src_shape, src_offsets, lengths)
    dst_offsets, _ = _check_box("copy_box destination", dst_shape, dst_offsets, lengths)
    src = src.cast("B") if src.format != "B" else src
    dst = dst.cast("B") if dst.format != "B" else dst
    if isinstance(itemsize, bool) or not isinstance(itemsize, int) or itemsize < 1:
        raise InvalidArgumentError(f"copy_box: itemsize must be an int >= 1, got {itemsize!r}")
    if len(dst) < _volume(dst_shape) * itemsize:
        raise InvalidArgumentError(
            f"copy_box: the destination buffer is {len(dst)} bytes, short of {list(dst_shape)} "
            f"elements of {itemsize} bytes")
    if _volume(lengths) == 0:
        return 0
    src_strides = _strides(src_shape, itemsize)
    first, end = _box_span(src_strides, itemsize, src_offsets, lengths)
    if not 0 <= src_start <= first or end > src_start + len(src):
        raise InvalidArgumentError(
            f"copy_box: the source buffer holds bytes [{src_start}, {src_start + len(src)}) of "
            f"its tensor, the box needs [{first}, {end})")
    if not lengths:
        dst[:itemsize] = src[first - src_start:first - src_start + itemsize]
        return itemsize
    k = max(_contiguous_from(src_shape, src_offsets, lengths),
            _contiguous_from(dst_shape, dst_offsets, lengths))
    dst_strides = _strides(dst_shape, itemsize)
    run = _volume(lengths[k:]) * itemsize
    src_at = src_offsets[k] * src_strides[k] - src_start
    dst_at = dst_offsets[k] * dst_strides[k]
    copied = 0
    for index in itertools.product(*(range(n) for n in lengths[:k])):
        s = src_at + sum((o + i) * st for o, i, st in zip(src_offsets, index, src_strides))
        d = dst_at + sum((o + i) * st for o, i, st in zip(dst_offsets, index, dst_strides))
        dst[d:d + run] = src[s:s + run]
        copied += run
    return copied


def _box_span(strides: Sequence[int], itemsize: int, offsets: Sequence[int],
              lengths: Sequence[int]) -> Tuple[int, int]:
    """[first byte, end) of a non-empty box in a row-major tensor of byte `strides`: from its
    first element to the end of its last."""
    first = sum(o * s for o, s in zip(offsets, strides))
    last = sum((o + n - 1) * s for o, n, s in zip(offsets, lengths, strides))
    return first, last + itemsize


def _split_box(shape: Shape, itemsize: int, offsets: Shape, lengths: Shape, limit: int,
               slack: int) -> List[Tuple[Shape, Shape]]:
    """The non-empty box [offsets, offsets + lengths) of a row-major tensor of `shape`, cut into
    parts that cover it once, each (at, lengths) with `at` relative to `offsets`: each part spans
    at most `limit` bytes of the tensor from its first byte to the end of its last, at most
    `slack` of them not its own (the bytes between its rows). A single element is not cut.

    A box is cut along its first dimension longer than 1 into slabs of as many indices as fit,
    the slabs' bounds at multiples of that count in the tensor (so that slabs of rows whose size
    divides the checksum block start on block boundaries); a slab of one index that does not fit
    is cut along the next dimension."""
    strides = _strides(shape, itemsize)
    parts: List[Tuple[Shape, Shape]] = []

    def span(at: Shape, part: Shape) -> int:
        first, end = _box_span(strides, itemsize, [o + a for o, a in zip(offsets, at)], part)
        return end - first

    def fits(at: Shape, part: Shape) -> bool:
        spanned = span(at, part)
        return spanned <= limit and spanned - _volume(part) * itemsize <= slack

    def cut(at: Shape, part: Shape, d: int) -> None:
        if fits(at, part):
            parts.append((at, part))
            return
        while d < len(part) and part[d] == 1:
            d += 1
        if d == len(part):  # one element
            parts.append((at, part))
            return
        unit = part[:d] + (1,) + part[d + 1:]
        if not fits(at, unit):
            for i in range(part[d]):
                cut(at[:d] + (at[d] + i,) + at[d + 1:], unit, d + 1)
            return
        # m slabs span unit_span + (m - 1) * stride bytes, of which m * unit_bytes are theirs.
        unit_span, unit_bytes, stride = span(at, unit), _volume(unit) * itemsize, strides[d]
        count = (limit - unit_span) // stride + 1
        if stride > unit_bytes:
            count = min(count, (slack + stride - unit_span) // (stride - unit_bytes))
        count = max(count, 1)
        lo = offsets[d] + at[d]
        hi = lo + part[d]
        i = lo
        while i < hi:
            j = min(hi, (i // count + 1) * count)
            parts.append((at[:d] + (i - offsets[d],) + at[d + 1:],
                          part[:d] + (j - i,) + part[d + 1:]))
            i = j

    cut((0,) * len(lengths), tuple(lengths), 0)
    return parts


def _intersect(a_offsets: Shape, a_sizes: Shape, b_offsets: Shape,
               b_sizes: Shape) -> Optional[Tuple[Shape, Shape]]:
    """The intersection of two boxes as (offsets, lengths), None when it is empty."""
    offsets, lengths = [], []
    for ao, an, bo, bn in zip(a_offsets, a_sizes, b_offsets, b_sizes):
        lo, hi = max(ao, bo), min(ao + an, bo + bn)
        if hi <= lo:
            return None
        offsets.append(lo)
        lengths.append(hi - lo)
    return tuple(offsets), tuple(lengths)


# -- what an index records -----------------------------------------------------------------------


@dataclass(frozen=True)
class TensorChunk:
    """One stored chunk of a tensor: which part of it, and where it is."""

    fqn: str
    """The tensor's fully qualified name in the state dict (DCP's FQN)."""
    offsets: Shape
    """Where the chunk starts in the whole tensor."""
    sizes: Shape
    """The chunk's shape."""
    size: Shape
    """The whole tensor's shape."""
    dtype: str
    """The torch dtype's name ("float32", "bfloat16", ...)."""
    itemsize: int
    """Bytes per element."""
    rank: int
    """The saving rank whose shard holds it."""
    entry: str
    """Its entry in that shard (row-major, `nbytes` bytes)."""

    @property
    def nbytes(self) -> int:
        return _volume(self.sizes) * self.itemsize


@dataclass(frozen=True)
class BytesItem:
    """One stored non-tensor item (the bytes DCP serialised), and where it is."""

    fqn: str
    rank: int
    entry: str
    length: int


@dataclass(frozen=True)
class TensorInfo:
    """A tensor of the checkpoint: its shape, dtype and chunks (which cover it exactly once)."""

    fqn: str
    size: Shape
    dtype: str
    itemsize: int
    chunks: Tuple[TensorChunk, ...]


PlannerData = Optional[Dict[str, Tuple[Union[str, int], ...]]]
"""DCP's default planner data: each FQN's path in the nested state dict."""


class _Fields:
    """Reads the fields of one JSON object of an index, each checked, naming what was wrong."""

    def __init__(self, where: str, value: Any) -> None:
        if not isinstance(value, dict):
            raise DataLossError(f"{where}: expected a JSON object, got {type(value).__name__}")
        self.where = where
        self.value = value

    def _get(self, key: str) -> Any:
        if key not in self.value:
            raise DataLossError(f"{self.where}: missing {key!r}")
        return self.value[key]

    def integer(self, key: str, lo: int = 0, hi: int = _MAX_DIM) -> int:
        v = self._get(key)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise DataLossError(f"{self.where}: {key!r} must be an integer in [{lo}, {hi}], "
                                f"got {v!r:.60}")
        return v

    def string(self, key: str, max_bytes: int) -> str:
        v = self._get(key)
        if not isinstance(v, str) or not 1 <= len(v.encode("utf-8", "surrogatepass")) <= max_bytes:
            raise DataLossError(f"{self.where}: {key!r} must be a string of 1..{max_bytes} bytes, "
                                f"got {v!r:.60}")
        return v

    def dims(self, key: str) -> Shape:
        v = self._get(key)
        if not isinstance(v, list) or len(v) > _MAX_DIMS or any(
                isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= _MAX_DIM for d in v):
            raise DataLossError(f"{self.where}: {key!r} must be a list of at most {_MAX_DIMS} "
                                f"integers in [0, 2^62], got {v!r:.80}")
        return tuple(v)

    def items(self, key: str, most: int) -> List[Any]:
        v = self._get(key)
        if not isinstance(v, list) or len(v) > most:
            raise DataLossError(f"{self.where}: {key!r} must be a list of at most {most} items")
        return v


@dataclass(frozen=True)
class RankIndex:
    """What one saving rank stored: its shard's layout and what each entry holds.

    `layout` is the rank's ``JOB`` shard in registration order (addresses 0), () when the rank
    stored nothing; `chunks` and `byte_items` name entries of it.
    """

    job_id: str
    step: int
    rank: int
    world_size: int
    layout: Tuple[Entry, ...]
    chunks: Tuple[TensorChunk, ...]
    byte_items: Tuple[BytesItem, ...]
    planner_data: PlannerData = None

    def to_json(self) -> bytes:
        """The index as stored (UTF-8 JSON)."""
        return json.dumps({
            "format": FORMAT,
            "job_id": self.job_id,
            "step": self.step,
            "rank": self.rank,
            "world_size": self.world_size,
            "entries": [{"name": e.name, "kind": "tensor" if e.kind == EntryKind.TENSOR else
                         "blob", "dtype": e.dtype, "shape": list(e.shape), "nbytes": e.nbytes}
                        for e in self.layout],
            "tensors": [{"fqn": c.fqn, "entry": c.entry, "offsets": list(c.offsets),
                         "sizes": list(c.sizes), "size": list(c.size), "dtype": c.dtype,
                         "itemsize": c.itemsize} for c in self.chunks],
            "bytes": [{"fqn": b.fqn, "entry": b.entry, "length": b.length}
                      for b in self.byte_items],
            "planner_data": None if self.planner_data is None else
            {k: list(v) for k, v in self.planner_data.items()},
        }, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, data: Union[bytes, memoryview], *, job_id: str, step: int,
                  rank: int) -> "RankIndex":
        """Parses and checks the index of (`job_id`, `rank`) at `step`.

        Raises:
            DataLossError: it does not parse, is of another format, job, step or rank, or an
                entry, chunk or item in it is out of bounds or inconsistent with the layout; the
                message names the field.
        """
        where = f"the DCP index of job '{job_id}' rank {rank} step {step}"
        try:
            raw = json.loads(bytes(data).decode("utf-8"))
        except Exception as e:  # bad UTF-8, bad JSON, nesting too deep, an integer too long
            raise DataLossError(f"{where} does not parse as JSON ({type(e).__name__}: "
                                f"{str(e)[:200]})") from None
        top = _Fields(where, raw)
        if raw.get("format") != FORMAT:
            raise DataLossError(f"{where} is of format {raw.get('format')!r:.60}, not {FORMAT!r}")
        got = (top.string("job_id", 128), top.integer("step", 0, 2**63 - 1), top.integer("rank", 0, 2**32))
        if got != (job_id, step, rank):
            raise DataLossError(f"{where} says it is job '{got[0]}' rank {got[2]} step {got[1]}")
        world_size = top.integer("world_size", 1, 2**32)
        if rank >= world_size:
            raise DataLossError(f"{where}: rank {rank} is outside its world of {world_size}")

        layout: List[Entry] = []
        by_name: Dict[str, Entry] = {}
        for i, value in enumerate(top.items("entries", _MAX_ENTRIES)):
            f = _Fields(f"{where}, entries[{i}]", value)
            name = f.string("name", _MAX_NAME_BYTES)
            kind = value.get("kind")
            dtype = f.string("dtype", 32)
            shape = f.dims("shape")
            nbytes = f.integer("nbytes")
            if name in by_name:
                raise DataLossError(f"{f.where}: the name {name!r} is used twice")
            if kind == "tensor":
                if dtype not in DTYPE_BYTES or dtype == "bytes":
                    raise DataLossError(f"{f.where}: {dtype!r} is not a tensor dtype of Tessera")
                if _volume(shape) * DTYPE_BYTES[dtype] != nbytes:
                    raise DataLossError(f"{f.where}: {dtype}{list(shape)} is not {nbytes} bytes")
                entry = Entry(name, 0, nbytes, dtype, shape, EntryKind.TENSOR)
            elif kind == "blob":
                if dtype != "bytes" or shape != (nbytes,) or nbytes < 1:
                    raise DataLossError(f"{f.where}: a blob is dtype 'bytes' of shape [capacity], "
                                        f"capacity >= 1; got {dtype!r}{list(shape)} of {nbytes}")
                entry = Entry(name, 0, nbytes, "bytes", shape, EntryKind.BLOB)
            else:
                raise DataLossError(f"{f.where}: kind must be 'tensor' or 'blob', got {kind!r:.40}")
            layout.append(entry)
            by_name[name] = entry

        used: Dict[str, str] = {}

        def claim(f: _Fields, name: str, kind: EntryKind) -> Entry:
            entry = by_name.get(name)
            if entry is None:
                raise DataLossError(f"{f.where}: entry {name!r} is not in the layout")
            if entry.kind != kind:
                raise DataLossError(f"{f.where}: entry {name!r} is a {entry.kind.name.lower()}")
            if name in used:
                raise DataLossError(f"{f.where}: entry {name!r} also holds {used[name]!r}")
            used[name] = f.where
            return entry

        chunks: List[TensorChunk] = []
        for i, value in enumerate(top.items("tensors", _MAX_ENTRIES)):
            f = _Fields(f"{where}, tensors[{i}]", value)
            fqn = f.string("fqn", _MAX_FQN_BYTES)
            f.where += f" ({fqn!r:.80})"
            offsets, sizes, size = f.dims("offsets"), f.dims("sizes"), f.dims("size")
            dtype = f.string("dtype", 32)
            itemsize = f.integer("itemsize", 1, _MAX_ITEMSIZE)
            if not len(offsets) == len(sizes) == len(size):
                raise DataLossError(f"{f.where}: offsets, sizes and size differ in dimensions")
            try:
                _check_box(f.where, size, offsets, sizes)
            except InvalidArgumentError as e:
                raise DataLossError(f"the chunk lies outside its tensor: {e}") from None
            entry = claim(f, f.string("entry", _MAX_NAME_BYTES), EntryKind.TENSOR)
            chunk = TensorChunk(fqn, offsets, sizes, size, dtype, itemsize, rank, entry.name)
            if dtype in DTYPE_BYTES and dtype != "bytes":
                expected = (dtype, sizes)
                if DTYPE_BYTES[dtype] != itemsize:
                    raise DataLossError(f"{f.where}: {dtype} is {DTYPE_BYTES[dtype]} bytes an "
                                        f"element, not {itemsize}")
            else:
                expected = ("uint8", (chunk.nbytes,))
            if (entry.dtype, entry.shape) != expected or entry.nbytes != chunk.nbytes:
                raise DataLossError(
                    f"{f.where}: entry {entry.name!r} is {entry.dtype}{list(entry.shape)} "
                    f"({entry.nbytes} bytes), not {expected[0]}{list(expected[1])} "
                    f"({chunk.nbytes} bytes)")
            chunks.append(chunk)

        byte_items: List[BytesItem] = []
        for i, value in enumerate(top.items("bytes", _MAX_ENTRIES)):
            f = _Fields(f"{where}, bytes[{i}]", value)
            fqn = f.string("fqn", _MAX_FQN_BYTES)
            entry = claim(f, f.string("entry", _MAX_NAME_BYTES), EntryKind.BLOB)
            length = f.integer("length")
            if length > entry.nbytes:
                raise DataLossError(f"{f.where} ({fqn!r:.80}): length {length} exceeds the "
                                    f"capacity {entry.nbytes} of entry {entry.name!r}")
            byte_items.append(BytesItem(fqn, rank, entry.name, length))

        planner_data: PlannerData = None
        if raw.get("planner_data") is not None:
            mapping = raw["planner_data"]
            if not isinstance(mapping, dict) or len(mapping) > _MAX_ENTRIES:
                raise DataLossError(f"{where}: planner_data must be an object of at most "
                                    f"{_MAX_ENTRIES} FQNs")
            planner_data = {}
            for key, path in mapping.items():
                if not isinstance(path, list) or len(path) > _MAX_DIMS or any(
                        isinstance(p, bool) or not isinstance(p, (str, int)) for p in path):
                    raise DataLossError(f"{where}: planner_data[{key!r:.80}] must be a list of "
                                        f"at most {_MAX_DIMS} strings and integers")
                planner_data[key] = tuple(path)
        return cls(job_id, step, rank, world_size, tuple(layout), tuple(chunks),
                   tuple(byte_items), planner_data)


class CheckpointIndex:
    """The indexes of every saving rank of one checkpoint, merged into DCP's view of it: each
    tensor's shape, dtype and chunks, each non-tensor item, the planner's data.

    Raises (from the constructor):
        DataLossError: the ranks' indexes disagree (world size, a tensor's shape or dtype), an FQN
            is stored twice, or a tensor's chunks overlap or leave part of it uncovered.
    """

    def __init__(self, ranks: Sequence[RankIndex]) -> None:
        if not ranks:
            raise DataLossError("a checkpoint needs the index of at least one rank")
        first = ranks[0]
        self.job_id = first.job_id
        self.step = first.step
        self.world_size = first.world_size
        what = f"DCP checkpoint of job '{self.job_id}' step {self.step}"
        if [r.rank for r in ranks] != list(range(self.world_size)):
            raise DataLossError(f"{what}: indexes of ranks {[r.rank for r in ranks][:16]} for a "
                                f"world of {self.world_size}")
        self.ranks: Tuple[RankIndex, ...] = tuple(ranks)
        chunks_of: Dict[str, List[TensorChunk]] = {}
        self.byte_items: Dict[str, BytesItem] = {}
        self.planner_data: Dict[str, Tuple[Union[str, int], ...]] = {}
        for r in ranks:
            if (r.job_id, r.step, r.world_size) != (self.job_id, self.step, self.world_size):
                raise DataLossError(f"{what}: rank {r.rank}'s index is of job '{r.job_id}' step "
                                    f"{r.step} in a world of {r.world_size}")
            for c in r.chunks:
                chunks_of.setdefault(c.fqn, []).append(c)
            for b in r.byte_items:
                if b.fqn in self.byte_items:
                    raise DataLossError(f"{what}: {b.fqn!r:.80} is stored by rank "
                                        f"{self.byte_items[b.fqn].rank} and rank {b.rank}")
                self.byte_items[b.fqn] = b
            for key, path in (r.planner_data or {}).items():
                self.planner_data.setdefault(key, path)  # the first rank's, as DCP merges them
        self.tensors: Dict[str, TensorInfo] = {}
        for fqn, chunks in chunks_of.items():
            if fqn in self.byte_items:
                raise DataLossError(f"{what}: {fqn!r:.80} is stored both as a tensor and as bytes")
            c0 = chunks[0]
            for c in chunks:
                if (c.size, c.dtype, c.itemsize) != (c0.size, c0.dtype, c0.itemsize):
                    raise DataLossError(
                        f"{what}: tensor {fqn!r:.80} is {c0.dtype}{list(c0.size)} at rank "
                        f"{c0.rank} but {c.dtype}{list(c.size)} at rank {c.rank}")
            _check_cover(what, fqn, c0.size, chunks)
            self.tensors[fqn] = TensorInfo(fqn, c0.size, c0.dtype, c0.itemsize, tuple(chunks))
        self._chunk_by_key = {(c.fqn, c.offsets): c for t in self.tensors.values()
                              for c in t.chunks}

    def layout(self, rank: int) -> Tuple[Entry, ...]:
        """The ``JOB`` shard layout of saving rank `rank`."""
        return self.ranks[rank].layout

    def chunk(self, fqn: str, offsets: Sequence[int]) -> TensorChunk:
        """The stored chunk of tensor `fqn` that starts at `offsets`.

        Raises:
            NotFoundError: no such tensor, or no chunk of it starts there (the message lists
                where its chunks start).
        """
        key = (fqn, tuple(offsets))
        chunk = self._chunk_by_key.get(key)
        if chunk is not None:
            return chunk
        info = self.tensors.get(fqn)
        if info is None:
            raise NotFoundError(self._unknown(fqn))
        starts = [list(c.offsets) for c in info.chunks[:8]]
        raise NotFoundError(
            f"tensor {fqn!r} of job '{self.job_id}' step {self.step} has no chunk starting at "
            f"{list(offsets)}; its {len(info.chunks)} chunks start at {starts}"
            f"{' ...' if len(info.chunks) > 8 else ''}")

    def bytes_item(self, fqn: str) -> BytesItem:
        """The stored non-tensor item `fqn`.

        Raises:
            NotFoundError: there is none of that name.
        """
        item = self.byte_items.get(fqn)
        if item is None:
            raise NotFoundError(self._unknown(fqn))
        return item

    def _unknown(self, fqn: str) -> str:
        names = sorted(itertools.chain(self.tensors, self.byte_items))
        close = [n for n in names if fqn.split(".")[-1] in n][:5] or names[:5]
        return (f"{fqn!r} is not in the DCP checkpoint of job '{self.job_id}' step {self.step} "
                f"({len(self.tensors)} tensors, {len(self.byte_items)} other items; e.g. "
                f"{', '.join(repr(n) for n in close)})")


_MAX_OVERLAP_CHECKS = 10_000_000


def _check_cover(what: str, fqn: str, size: Shape, chunks: Sequence[TensorChunk]) -> None:
    """Chunks of one tensor must not overlap and must cover it (volumes add up)."""
    total = sum(_volume(c.sizes) for c in chunks)
    if total != _volume(size):
        raise DataLossError(
            f"{what}: the {len(chunks)} chunks of tensor {fqn!r:.80} hold {total} elements of "
            f"its {_volume(size)} ({list(size)}): a part is missing or stored twice")
    if not size:
        return  # a scalar: one chunk of one element, by the count above
    # Sweep along the longest dimension: only chunks whose ranges there meet can overlap. Chunks
    # that split other dimensions are compared pairwise, within a bound an index cannot exceed.
    d = max(range(len(size)), key=lambda i: size[i])
    ordered = sorted((c for c in chunks if _volume(c.sizes)), key=lambda c: c.offsets[d])
    checks = 0
    for i, a in enumerate(ordered):
        for b in ordered[i + 1:]:
            if b.offsets[d] >= a.offsets[d] + a.sizes[d]:
                break
            checks += 1
            if checks > _MAX_OVERLAP_CHECKS:
                raise DataLossError(
                    f"{what}: the {len(chunks)} chunks of tensor {fqn!r:.80} overlap along every "
                    f"dimension too often to check ({_MAX_OVERLAP_CHECKS} pairs)")
            if _intersect(a.offsets, a.sizes, b.offsets, b.sizes) is not None:
                raise DataLossError(
                    f"{what}: chunks of tensor {fqn!r:.80} overlap: at {list(a.offsets)} of "
                    f"{list(a.sizes)} (rank {a.rank}) and at {list(b.offsets)} of "
                    f"{list(b.sizes)} (rank {b.rank})")


# -- where the bytes come from -------------------------------------------------------------------


class DaemonSource:
    """Reads manifests and entry ranges through the local tesserad, over one connection that
    registers nothing (`tessera.client.Client.read_manifest` and `read_range`): no rank is
    claimed, so the job's trainers and savers go on meanwhile.

    Args:
        socket_path: the daemon's agent socket.
    """

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._client: Optional[Client] = None
        self._lock = threading.Lock()

    def _connected(self) -> Client:
        with self._lock:
            if self._client is None or self._client.closed:
                self._client = Client(self.socket_path, use_gpu=False)
            return self._client

    def manifest(self, job_id: str, rank: int, step: int) -> Any:
        """The manifest (`tessera.SnapshotManifest`) of (`job_id`, `rank`) at `step`."""
        return self._connected().read_manifest(job_id, rank, step)

    def read(self, job_id: str, rank: int, step: int, entry: str, offset: int, length: int,
             out: memoryview) -> None:
        """Bytes [offset, offset + length) of `entry`'s stored bytes into `out`, every block they
        overlap checked. Safe from several threads at once: the library's reads are, and they
        release the GIL while they copy and check."""
        self._connected().read_range(job_id, rank, step, entry, offset, length, out=out)

    def versions(self, job_id: str) -> List[Any]:
        """The snapshots this daemon holds of `job_id` (`tessera.Version`)."""
        return self._connected().list_versions(job_id)

    def close(self) -> None:
        """Closes the connection (and the snapshots the library keeps open for it); the next
        call opens another."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


@dataclass(frozen=True)
class ChunkRead:
    """One read `CheckpointReader.serve` answers: a box of a stored chunk, or a stored item.

    Attributes:
        fqn: the tensor's or item's FQN.
        chunk_offsets: where the chunk starts in the tensor (DCP's ``storage_index.offset``);
            None for a non-tensor item.
        box_offsets: the box's start within the chunk (DCP's ``storage_offsets``).
        lengths: the box's shape (DCP's ``lengths``).
        token: the caller's, handed back with the bytes.
    """

    fqn: str
    chunk_offsets: Optional[Shape] = None
    box_offsets: Shape = ()
    lengths: Shape = ()
    token: Any = None


@dataclass(frozen=True)
class ReadPart:
    """What `CheckpointReader.serve` hands `deliver` for one part of a read, valid during that
    call only.

    A tensor read comes in one or more parts, boxes that cover the read's box once: `at` is where
    the part starts within the read's box, `lengths` its shape, and `data` holds bytes
    [start, start + len(data)) of the chunk's row-major bytes, the part's among them (and the
    bytes between its rows when it is not contiguous in the chunk): `part_tensor` views it as a
    tensor, `copy_box` with ``src_start=start`` copies it. A non-tensor item comes in one part of
    all its bytes (`at` and `lengths` (), `start` 0).
    """

    at: Shape
    lengths: Shape
    data: memoryview
    start: int


Deliver = Callable[[ChunkRead, Union[TensorChunk, BytesItem], ReadPart], None]
"""Called by `CheckpointReader.serve` with a read, the chunk or item it names, and one part of
its bytes."""


@dataclass
class ReadStats:
    """What a reader has read from the daemons (`CheckpointReader.stats`), its index included."""

    manifests_read: int = 0
    """Manifests read: each index shard's, and each data shard's that the reads needed."""
    ranges_read: int = 0
    """Byte ranges read (`tessera.client.Client.read_range` calls)."""
    bytes_read: int = 0
    """The bytes of those ranges, each checked against the snapshot's CRC32C."""
    largest_read_bytes: int = 0
    """The most bytes one read held in this process (its buffer)."""


@dataclass(frozen=True)
class _Piece:
    """Bytes [at, at + length) of a chunk's (or an item's) row-major bytes, stored in `entry` of
    `rank`'s shard, whose stored bytes start with them (a DP slice's start at its first byte)."""

    rank: int
    entry: str
    at: int
    length: int


@dataclass
class _Fetch:
    """One read into one buffer: bytes [start, end) of a chunk or an item, taken from `pieces`,
    and the parts of reads it answers, as (the read's position, at, lengths)."""

    pieces: Tuple[_Piece, ...]
    start: int
    end: int
    parts: List[Tuple[int, Shape, Shape]]


_DEPRECATED_READER_OPTIONS = {
    "index_capacity": "a reader reads each index's length from its shard's manifest, whatever "
                      "capacity the Writer gave it",
    "claim_timeout_s": "a reader claims no rank, so it never waits for one",
    "max_chunk_bytes": "pass max_shard_bytes, the same bound: the most bytes one read holds "
                       "(a chunk is read in pieces that fit, not refused)",
}
_warned_options: set = set()
_warned_lock = threading.Lock()


def _deprecated(owner: str, name: str, value: Any) -> None:
    """Warns (DeprecationWarning, once per option and process) that `owner` was given `name`."""
    if value is None:
        return
    with _warned_lock:
        if name in _warned_options:
            return
        _warned_options.add(name)
    warnings.warn(f"{owner}: {name} is deprecated and will be removed: "
                  f"{_DEPRECATED_READER_OPTIONS[name]}", DeprecationWarning, stacklevel=4)


def _reader_options(owner: str, max_shard_bytes: Any, read_threads: Any, index_capacity: Any,
                    claim_timeout_s: Any) -> Tuple[Optional[int], int]:
    """A reader's `max_shard_bytes` and `read_threads` (its default filled in), checked; a
    warning for each deprecated option given."""
    if index_capacity is not None:
        _check_capacity(index_capacity)
    _deprecated(owner, "index_capacity", index_capacity)
    _deprecated(owner, "claim_timeout_s", claim_timeout_s)
    if max_shard_bytes is not None and (isinstance(max_shard_bytes, bool) or not isinstance(
            max_shard_bytes, int) or max_shard_bytes < 1):
        raise InvalidArgumentError(f"max_shard_bytes must be None or an int >= 1, got "
                                   f"{max_shard_bytes!r:.40}")
    if read_threads is None:
        read_threads = min(8, os.cpu_count() or 1)
    if isinstance(read_threads, bool) or not isinstance(read_threads, int) or not (
            1 <= read_threads <= 256):
        raise InvalidArgumentError(f"read_threads must be an integer in [1, 256], got "
                                   f"{read_threads!r:.40}")
    return max_shard_bytes, read_threads


class CheckpointReader:
    """Reads one DCP checkpoint held by the daemons: its index, and byte ranges of its chunks,
    without registering or claiming any rank.

    Args:
        job_id: the checkpoint's job.
        step: its step; None: the newest step whose index every rank has on this daemon.
        socket_path: the daemon's agent socket; default ``TESSERA_SOCKET``, else
            `DEFAULT_SOCKET_PATH`.
        max_shard_bytes: the most bytes one read of checkpoint data from the daemon may hold
            in this process: a chunk's bytes are read in pieces of at most this (default
            `READ_PIECE_BYTES`); a non-tensor item, read whole, that takes more is refused
            before anything is read (None: no bound for those). The indexes, read first, are
            not bounded by it (an index is at most the Writer's ``index_capacity``).
        read_threads: reads run at once (each copies and checks its bytes without the GIL);
            default min(8, CPUs). At most twice as many reads are held in memory.
        source: where manifests and bytes come from (tests); default a `DaemonSource`.
        index_capacity, claim_timeout_s: deprecated, without effect (a reader reads an index of
            any capacity, and claims no rank); each warns once.
    """

    def __init__(self, job_id: str, step: Optional[int] = None, *,
                 socket_path: Optional[str] = None, max_shard_bytes: Optional[int] = None,
                 read_threads: Optional[int] = None, source: Optional[Any] = None,
                 index_capacity: Optional[int] = None,
                 claim_timeout_s: Optional[float] = None) -> None:
        self.job_id = _check_job_id(job_id)
        self.step = None if step is None else _check_step(step)
        self.max_shard_bytes, self.read_threads = _reader_options(
            type(self).__name__, max_shard_bytes, read_threads, index_capacity, claim_timeout_s)
        self.source = source or DaemonSource(_socket_path(socket_path))
        self.stats = ReadStats()
        """What this reader has read so far."""
        self._index: Optional[CheckpointIndex] = None
        self._versions: Dict[str, Dict[Tuple[int, int], Any]] = {}
        self._manifests: Dict[int, Any] = {}  # of the data shards, by rank, checked
        self._lock = threading.Lock()
        self._stats_lock = threading.Lock()

    @property
    def index_job(self) -> str:
        return self.job_id + INDEX_JOB_SUFFIX

    # -- what is read, counted -------------------------------------------------------------------

    def _manifest(self, job_id: str, rank: int, step: int) -> Any:
        manifest = self.source.manifest(job_id, rank, step)
        with self._stats_lock:
            self.stats.manifests_read += 1
        return manifest

    def _read(self, job_id: str, rank: int, step: int, entry: str, offset: int, length: int,
              out: memoryview) -> None:
        self.source.read(job_id, rank, step, entry, offset, length, out)
        with self._stats_lock:
            self.stats.ranges_read += 1
            self.stats.bytes_read += length

    def _check_whole(self, what: str, nbytes: int) -> None:
        """Refuses a read of `nbytes` that cannot be cut (an item, an index, an element) when
        it exceeds `max_shard_bytes`."""
        if self.max_shard_bytes is not None and nbytes > self.max_shard_bytes:
            raise InvalidArgumentError(
                f"{what} needs {nbytes} bytes in one read, over max_shard_bytes="
                f"{self.max_shard_bytes}: nothing was read; pass a larger max_shard_bytes")

    # -- the index -------------------------------------------------------------------------------

    def _read_index(self, rank: int, step: int) -> RankIndex:
        what = f"the DCP index of job '{self.job_id}' rank {rank} step {step}"
        try:
            manifest = self._manifest(self.index_job, rank, step)
            blob = next((e for e in manifest.entries if e.name == INDEX_ENTRY), None)
            if blob is None or blob.kind != EntryKind.BLOB:
                names = ", ".join(repr(e.name) for e in manifest.entries[:8])
                raise DataLossError(
                    f"{what}: its shard (job '{self.index_job}') holds no index blob "
                    f"{INDEX_ENTRY!r} (it holds {names or 'nothing'}): it was not stored by "
                    "tessera.dcp")
            if blob.length > _MAX_INDEX_BYTES:
                raise DataLossError(f"{what}: its manifest says the index takes {blob.length} "
                                    f"bytes, more than the {_MAX_INDEX_BYTES} read")
            data = bytearray(blob.length)
            self._read(self.index_job, rank, step, INDEX_ENTRY, 0, blob.length, memoryview(data))
        except NotFoundError as e:
            raise NotFoundError(
                f"the DCP checkpoint of job '{self.job_id}' step {step} has no index for rank "
                f"{rank} (job '{self.index_job}'): that rank's save did not finish, or the "
                f"daemons no longer hold the step ({_message(e)})") from e
        index = RankIndex.from_json(data, job_id=self.job_id, step=step, rank=rank)
        if manifest.world_size != index.world_size:
            raise DataLossError(f"{what} is of a world of {index.world_size}, its shard of a "
                                f"world of {manifest.world_size}")
        return index

    def _newest_complete_step(self) -> RankIndex:
        """Rank 0's index at the newest step whose index every rank of its world has on this
        daemon."""
        ranks_at: Dict[int, set] = {}
        for rank, step in self._listed(self.index_job):
            ranks_at.setdefault(step, set()).add(rank)
        tried = []
        for step in sorted(ranks_at, reverse=True):
            if 0 not in ranks_at[step]:
                continue
            first = self._read_index(0, step)
            world = first.world_size
            if ranks_at[step] >= set(range(world)):
                return first
            tried.append(f"step {step}: ranks {sorted(ranks_at[step])[:8]} of {world}")
        raise NotFoundError(
            f"this daemon holds no complete DCP checkpoint of job '{self.job_id}' (index job "
            f"'{self.index_job}'{': ' + '; '.join(tried) if tried else ': none at all'}); on a "
            "cluster a checkpoint's ranks may be held by other nodes: pass step= explicitly")

    @property
    def index(self) -> CheckpointIndex:
        """The checkpoint's merged index (read once, then kept).

        Raises:
            NotFoundError: no such checkpoint, or a rank's index is missing.
            DataLossError: an index is damaged or the indexes disagree.
        """
        with self._lock:
            if self._index is None:
                self._index = self._build()
            return self._index

    def _build(self) -> CheckpointIndex:
        first = (self._newest_complete_step() if self.step is None
                 else self._read_index(0, self.step))
        step = first.step
        ranks = [first] + [self._read_index(r, step) for r in range(1, first.world_size)]
        index = CheckpointIndex(ranks)
        self.step = step
        _log.info("DCP checkpoint of job '%s' step %d: %d ranks, %d tensors in %d chunks, %d "
                  "other items", self.job_id, step, first.world_size, len(index.tensors),
                  sum(len(t.chunks) for t in index.tensors.values()), len(index.byte_items))
        return index

    def _listed(self, job_id: str) -> Dict[Tuple[int, int], Any]:
        """(rank, step) -> the sealed versions of `job_id` this daemon lists (asked once)."""
        if job_id not in self._versions:
            listed = getattr(self.source, "versions", None)
            self._versions[job_id] = {} if listed is None else {
                (v.rank, v.step): v for v in listed(job_id) if v.sealed}
        return self._versions[job_id]

    # -- where each chunk's bytes are ------------------------------------------------------------

    def _shard(self, rank: int) -> Any:
        """The manifest of saving rank `rank`'s data shard, read once and checked against its
        index: the entries the index names must be there as it describes them."""
        manifest = self._manifests.get(rank)
        if manifest is not None:
            return manifest
        index = self.index
        try:
            manifest = self._manifest(self.job_id, rank, index.step)
        except NotFoundError as e:
            raise self._gone(rank, e) from e
        what = f"the DCP checkpoint of job '{self.job_id}' rank {rank} step {index.step}"
        if manifest.world_size != index.world_size:
            raise DataLossError(f"{what}: its shard is of a world of {manifest.world_size}, its "
                                f"index of {index.world_size}")
        stored = {e.name: e for e in manifest.entries}
        lengths = {c.entry: c.nbytes for c in index.ranks[rank].chunks}
        lengths.update((b.entry, b.length) for b in index.ranks[rank].byte_items)
        for e in index.layout(rank):
            m = stored.get(e.name)
            want = (e.kind, e.dtype, tuple(e.shape), e.nbytes)
            got = None if m is None else (m.kind, m.dtype, tuple(m.shape), m.nbytes)
            if got != want or (e.name in lengths and m.length != lengths[e.name]):
                held = "nothing" if m is None else (
                    f"a {m.kind.name.lower()} {m.dtype}{list(m.shape)} of {m.nbytes} bytes, "
                    f"{m.length} valid")
                raise DataLossError(
                    f"{what}: its index describes entry {e.name!r} as a {e.kind.name.lower()} "
                    f"{e.dtype}{list(e.shape)} of {e.nbytes} bytes"
                    f"{', ' + str(lengths[e.name]) + ' valid' if e.name in lengths else ''}, "
                    f"but the shard holds {held} under that name")
        self._manifests[rank] = manifest
        return manifest

    def _pieces(self, where: Union[TensorChunk, BytesItem]) -> Tuple[_Piece, ...]:
        """Where the bytes of a chunk or item are stored."""
        self._shard(where.rank)
        length = where.nbytes if isinstance(where, TensorChunk) else where.length
        return (_Piece(where.rank, where.entry, 0, length),)

    def _held(self, item: BytesItem) -> Optional[memoryview]:
        """An item's bytes when this reader holds them already, else None."""
        return None

    def _block_bytes(self, rank: int) -> int:
        """The checksum block of `rank`'s shard, whose manifest `_pieces` read."""
        manifest = self._manifests.get(rank)
        return getattr(manifest, "crc_block_bytes", 0) or _DEFAULT_BLOCK_BYTES

    def _gone(self, rank: int, error: NotFoundError) -> NotFoundError:
        """The error for a shard the daemons no longer hold (a newer step released it)."""
        return NotFoundError(
            f"the DCP checkpoint of job '{self.job_id}' step {self.step} has an index for rank "
            f"{rank} but not its chunks ({_message(error)}): a newer checkpoint's chunks were "
            "sealed by every rank, which releases this one; read the newest")

    def _resolve(self, read: ChunkRead) -> Union[TensorChunk, BytesItem]:
        index = self.index
        if read.chunk_offsets is None:
            return index.bytes_item(read.fqn)
        chunk = index.chunk(read.fqn, read.chunk_offsets)
        _check_box(f"read of tensor {read.fqn!r} chunk at {list(chunk.offsets)} of "
                   f"{list(chunk.sizes)}", chunk.sizes, read.box_offsets, read.lengths)
        return chunk

    # -- reads -----------------------------------------------------------------------------------

    def serve(self, reads: Sequence[ChunkRead], deliver: Deliver) -> None:
        """Answers `reads`: checks every one first (no byte is read when one is bad), reads the
        manifest of each shard they need, then only the byte ranges they need, and calls
        `deliver` with each read's parts (`ReadPart`) on this thread, each part once.

        The ranges of one chunk are merged where they overlap or touch and cut into pieces of at
        most `max_shard_bytes` (default `READ_PIECE_BYTES`); pieces are read on `read_threads`
        threads, at most twice that many held at once, and delivered in the order of the
        shards, entries and bytes they hold.

        Raises:
            NotFoundError: an FQN or chunk the checkpoint does not have, or a step the daemons
                no longer hold.
            InvalidArgumentError: a box outside its chunk; an item over `max_shard_bytes`.
            DataLossError: a shard that does not match its index, or bytes that do not match
                the snapshot's checksums.
        """
        resolved = [(read, self._resolve(read)) for read in reads]
        step = self.index.step
        limit = self.max_shard_bytes or READ_PIECE_BYTES
        by_key: Dict[Tuple[str, Optional[Shape]], List[int]] = {}
        for i, (read, where) in enumerate(resolved):
            offsets = where.offsets if isinstance(where, TensorChunk) else None
            by_key.setdefault((where.fqn, offsets), []).append(i)
        held: List[Tuple[int, ReadPart]] = []
        fetches: List[_Fetch] = []
        for positions in by_key.values():
            where = resolved[positions[0]][1]
            if isinstance(where, TensorChunk):
                fetches += self._chunk_fetches(where, [(i, resolved[i][0]) for i in positions],
                                               limit, held)
                continue
            data = self._held(where)
            if data is None and where.length > 0:
                self._check_whole(f"non-tensor item {where.fqn!r:.80} (job '{self.job_id}' rank "
                                  f"{where.rank} step {step} entry {where.entry!r})",
                                  where.length)
                fetches.append(_Fetch(self._pieces(where), 0, where.length,
                                      [(i, (), ()) for i in positions]))
                continue
            part = ReadPart((), (), memoryview(b"") if data is None else data, 0)
            held += [(i, part) for i in positions]
        fetches.sort(key=lambda f: (f.pieces[0].rank, f.pieces[0].entry, f.start))
        for i, part in held:
            deliver(resolved[i][0], resolved[i][1], part)
        self._run(fetches, resolved, deliver, step)

    def _chunk_fetches(self, chunk: TensorChunk, reads: List[Tuple[int, ChunkRead]], limit: int,
                       held: List[Tuple[int, ReadPart]]) -> List[_Fetch]:
        """The reads of the boxes of one chunk that `reads` ask for; an empty box needs none and
        goes to `held`."""
        pieces = self._pieces(chunk)
        if any(_volume(read.lengths) for _, read in reads):
            self._check_whole(f"an element of tensor {chunk.fqn!r:.80} ({chunk.dtype})",
                              chunk.itemsize)
        slack = self._block_bytes(pieces[0].rank)
        strides = _strides(chunk.sizes, chunk.itemsize)
        spans = []
        for i, read in reads:
            if _volume(read.lengths) == 0:
                held.append((i, ReadPart((0,) * len(read.lengths), tuple(read.lengths),
                                         memoryview(b""), 0)))
                continue
            for at, lengths in _split_box(chunk.sizes, chunk.itemsize, read.box_offsets,
                                          read.lengths, limit, slack):
                first, end = _box_span(strides, chunk.itemsize,
                                       [o + a for o, a in zip(read.box_offsets, at)], lengths)
                spans.append((first, end, i, at, lengths))
        spans.sort(key=lambda s: (s[0], s[1]))
        fetches: List[_Fetch] = []
        for first, end, i, at, lengths in spans:
            last = fetches[-1] if fetches else None
            if last is not None and first <= last.end and max(last.end, end) - last.start <= limit:
                last.end = max(last.end, end)
            else:
                last = _Fetch(pieces, first, end, [])
                fetches.append(last)
            last.parts.append((i, at, lengths))
        return fetches

    def _run(self, fetches: Sequence[_Fetch],
             resolved: Sequence[Tuple[ChunkRead, Union[TensorChunk, BytesItem]]],
             deliver: Deliver, step: int) -> None:
        """Reads `fetches` on `read_threads` threads, at most twice that many ahead of the one
        delivered, and delivers their parts in order on this thread. A buffer is used again once
        its parts are delivered (a new one's pages are faulted in at the first write, which
        costs more than the read itself); one too small for the next read is dropped when a new
        one is made, so at most 2 x `read_threads` buffers exist at once."""
        spare: List[bytearray] = []
        spare_lock = threading.Lock()

        def fetch(f: _Fetch) -> memoryview:
            size = f.end - f.start
            with spare_lock:
                fitting = [b for b in spare if len(b) >= size]
                buffer = min(fitting, key=len) if fitting else None
                if buffer is not None:
                    spare.remove(buffer)
                elif spare:
                    spare.remove(min(spare, key=len))
            view = memoryview(bytearray(size) if buffer is None else buffer)[:size]
            with self._stats_lock:
                self.stats.largest_read_bytes = max(self.stats.largest_read_bytes, size)
            for p in f.pieces:
                lo, hi = max(f.start, p.at), min(f.end, p.at + p.length)
                if lo >= hi:
                    continue
                try:
                    self._read(self.job_id, p.rank, step, p.entry, lo - p.at, hi - lo,
                               view[lo - f.start:hi - f.start])
                except NotFoundError as e:
                    raise self._gone(p.rank, e) from e
            return view

        if not fetches:
            return
        with concurrent.futures.ThreadPoolExecutor(min(self.read_threads, len(fetches))) as pool:
            ahead: Deque[Tuple[_Fetch, Any]] = collections.deque()
            upcoming = iter(fetches)
            try:
                for f in itertools.islice(upcoming, 2 * self.read_threads):
                    ahead.append((f, pool.submit(fetch, f)))
                while ahead:
                    f, future = ahead.popleft()
                    view = future.result()
                    del future
                    for i, at, lengths in f.parts:
                        read, where = resolved[i]
                        deliver(read, where, ReadPart(at, lengths, view, f.start))
                    with spare_lock:
                        spare.append(view.obj)  # type: ignore[arg-type]
                    del view
                    following = next(upcoming, None)
                    if following is not None:
                        ahead.append((following, pool.submit(fetch, following)))
            finally:
                for _, future in ahead:
                    future.cancel()

    def read_bytes(self, fqn: str) -> bytes:
        """The stored bytes of non-tensor item `fqn`. Like `read_region` and `read_tensor`, each
        call reads the manifests it needs once per reader and the bytes anew: batch reads
        through `serve`."""
        out: List[bytes] = []
        self.serve([ChunkRead(fqn)], lambda _r, _w, part: out.append(bytes(part.data)))
        return out[0]

    def read_region(self, fqn: str, offsets: Sequence[int], lengths: Sequence[int]) -> bytearray:
        """The box [offsets, offsets + lengths) of tensor `fqn`, row-major, assembled from every
        stored chunk it crosses, whichever ranks stored them: a resharded read.

        Raises:
            NotFoundError: no such tensor.
            InvalidArgumentError: the box lies outside the tensor.
        """
        info = self.index.tensors.get(fqn)
        if info is None:
            raise NotFoundError(self.index._unknown(fqn))
        offsets, lengths = _check_box(f"region of tensor {fqn!r}", info.size, offsets, lengths)
        out = bytearray(_volume(lengths) * info.itemsize)
        reads = []
        for c in info.chunks:
            common = _intersect(c.offsets, c.sizes, offsets, lengths) if info.size else ((), ())
            if common is None:
                continue
            at, n = common
            reads.append(ChunkRead(fqn, c.offsets, tuple(a - o for a, o in zip(at, c.offsets)),
                                   n, tuple(a - o for a, o in zip(at, offsets))))

        def deliver(read: ChunkRead, chunk: Any, part: ReadPart) -> None:
            copy_box(part.data, chunk.sizes,
                     [o + a for o, a in zip(read.box_offsets, part.at)], memoryview(out),
                     lengths, [o + a for o, a in zip(read.token, part.at)], part.lengths,
                     chunk.itemsize, src_start=part.start)

        self.serve(reads, deliver)
        return out

    def read_tensor(self, fqn: str) -> bytearray:
        """All of tensor `fqn`, row-major."""
        info = self.index.tensors.get(fqn)
        if info is None:
            raise NotFoundError(self.index._unknown(fqn))
        return self.read_region(fqn, (0,) * len(info.size), info.size)

    def close(self) -> None:
        """Closes the connection to the daemon (when this reader's source has one); a later read
        opens another."""
        close = getattr(self.source, "close", None)
        if close is not None:
            close()


def _check_capacity(capacity: Any) -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 4096:
        raise InvalidArgumentError(f"index_capacity must be an int >= 4096, got {capacity!r}")
    return capacity


# -- writing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorToSave:
    """One chunk a rank stores: what it is, and the contiguous memory that holds it (host or, with
    a GPU client, device memory of the current device), which must stay valid and unchanged until
    `save_rank` returns."""

    fqn: str
    offsets: Shape
    sizes: Shape
    size: Shape
    dtype: str
    itemsize: int
    address: int
    on_device: bool = False
    """Whether `address` is GPU memory."""


@dataclass(frozen=True)
class BytesToSave:
    """One non-tensor item a rank stores: its serialised bytes."""

    fqn: str
    data: bytes


_MIN_BLOB_CAPACITY = 64


def _entries_for(tensors: Sequence[TensorToSave], byte_items: Sequence[BytesToSave],
                 held: Optional[Sequence[Entry]]) -> Tuple[List[Entry], List[Any]]:
    """The ``JOB`` shard's entries (with their memory) and the buffers that must outlive them.

    A blob gets a power-of-two capacity, or the capacity it has in `held` (the layout registered
    by the last save) when its bytes still fit, so that a save whose items changed size a little
    keeps the layout and its registration."""
    import ctypes

    entries: List[Entry] = []
    keep: List[Any] = []
    for i, t in enumerate(tensors):
        name = f"t{i}"
        nbytes = _volume(t.sizes) * t.itemsize
        address = t.address if nbytes else 0
        if t.dtype in DTYPE_BYTES and t.dtype != "bytes":
            entries.append(Entry.tensor(name, address, t.dtype, t.sizes))
        else:  # a dtype Tessera has no name for: its bytes
            entries.append(Entry.tensor(name, address, "uint8", (nbytes,)))
    before = {e.name: e.nbytes for e in held or () if e.kind == EntryKind.BLOB}
    for i, b in enumerate(byte_items):
        name = f"b{i}"
        capacity = before.get(name, 0)
        if capacity < max(1, len(b.data)):
            capacity = 1 << (max(_MIN_BLOB_CAPACITY, len(b.data)) - 1).bit_length()
        buffer = ctypes.create_string_buffer(b.data, capacity)
        keep.append(buffer)
        entries.append(Entry.blob(name, ctypes.addressof(buffer), capacity, len(b.data)))
    return entries, keep


@dataclass
class _HeldShard:
    """A client that keeps one rank of one job registered between saves (see `release`)."""

    client: Client
    world_size: int
    layout: Tuple[Entry, ...]
    on_device: Tuple[bool, ...]  # per entry: registered as GPU memory


_held: Dict[Tuple[str, str, int, bool], _HeldShard] = {}
_held_lock = threading.Lock()


def _layout_of(entries: Sequence[Entry]) -> Tuple[Entry, ...]:
    return tuple(Entry(e.name, 0, e.nbytes, e.dtype, e.shape, e.kind) for e in entries)


def release(job_id: Optional[str] = None) -> int:
    """Unregisters the ranks this process keeps registered after saving (all, or those of
    `job_id` and its index job), keeping their snapshots, so that another process can register
    them (save them). Returns how many it released; a daemon that does not answer is logged.

    A save keeps its ranks registered (``keep_registered``, the default) because a registration
    maps the rank's slots anew, and the first copy into a new mapping faults in every page. A
    `CheckpointReader` claims no rank and reads them meanwhile; `tessera.client.read_snapshot`,
    which registers the rank it reads, waits for them.
    """
    with _held_lock:
        keys = [k for k in _held if job_id is None or k[1] in (job_id, job_id + INDEX_JOB_SUFFIX)]
        released = [_held.pop(k) for k in keys]
    for key, held in zip(keys, released):
        try:
            held.client.close()
        except TesseraError as e:
            _log.warning("tessera.dcp: releasing job '%s' rank %d: %s", key[1], key[2], e)
    return len(released)


atexit.register(release)


def _store_shard(path: str, job_id: str, rank: int, world_size: int, make_entries: Callable[
        [Optional[Sequence[Entry]]], List[Entry]], on_device: Tuple[bool, ...], step: int,
        stream: Any, use_gpu: bool, keep_registered: bool, claim_timeout_s: float,
        what: str) -> None:
    """Snapshots one shard of `step` and waits for its seal, through the client this process
    keeps for (`job_id`, `rank`) when its layout (and where each entry lives) is unchanged, else
    through a new registration."""
    key = (path, job_id, rank, use_gpu)
    with _held_lock:
        held = _held.pop(key, None)  # this save owns it until it puts it back
    try:
        entries = make_entries(held.layout if held is not None else None)
        layout = _layout_of(entries)
        if held is not None and (held.layout, held.world_size, held.on_device) == (
                layout, world_size, on_device):
            for i, e in enumerate(entries):
                held.client.update_entry(i, e.address or None, e.length if e.kind ==
                                         EntryKind.BLOB else e.nbytes)
        else:
            if held is not None:
                held.client.close()
            held = None
            client = Client(path, when_busy="wait", use_gpu=use_gpu)
            held = _HeldShard(client, world_size, layout, on_device)
            _register_when_free(client, job_id, rank, world_size, entries, claim_timeout_s)
        try:
            _snapshot_once(held.client, what, step, stream)
        except NotFoundError as e:
            if "is not registered" not in str(e):
                raise
            # A read_snapshot in this process registered the rank too, and released it when
            # done.
            _register_when_free(held.client, job_id, rank, world_size, entries, claim_timeout_s)
            _snapshot_once(held.client, what, step, stream)
    except BaseException:
        if held is not None:
            try:
                held.client.close()
            except TesseraError as e:
                _log.warning("%s: closing the client after the failure: %s", what, e)
        raise
    if keep_registered:
        with _held_lock:
            stale = _held.pop(key, None)
            _held[key] = held
        if stale is not None:  # another thread saved the same rank meanwhile
            stale.client.close()
    else:
        held.client.close()


def _message(e: TesseraError) -> str:
    """An error's message without its code's name (it is said again when wrapped)."""
    prefix = e.code_name + ": "
    return e.message[len(prefix):] if e.code_name and e.message.startswith(prefix) else e.message


def _snapshot_once(client: Client, what: str, step: int, stream: Any) -> None:
    """Starts the snapshot of `step` and waits for its seal, naming `what` in errors."""
    try:
        if not client.snapshot(step, stream):
            raise FailedPreconditionError(f"{what}: the snapshot was skipped")
        client.wait()
    except TesseraError as e:
        hint = ""
        if "steps must increase" in str(e):
            hint = (": a DCP checkpoint in Tessera is keyed by its step and a job's steps must "
                    "increase; save under a later step or another job id, or drop this one "
                    "(`tessera drop JOB`)")
        raise type(e)(f"{what}: {_message(e)}{hint}") from e


def save_rank(job_id: str, step: int, rank: int, world_size: int,
              tensors: Sequence[TensorToSave], byte_items: Sequence[BytesToSave], *,
              planner_data: PlannerData = None, socket_path: Optional[str] = None,
              use_gpu: bool = False, stream: Any = None, index_capacity: int = INDEX_CAPACITY,
              claim_timeout_s: float = 60.0, keep_registered: bool = True) -> RankIndex:
    """Stores one saving rank's part of DCP checkpoint (`job_id`, `step`): its chunks and items
    in its ``JOB`` shard, then its index in its ``JOB.dcp-index`` shard; returns the index.

    Blocks until both are sealed. With `keep_registered` the two shards stay registered by this
    process afterwards, and the next save of the same layout reuses them (no new registration,
    no new mapping); readers (`CheckpointReader`, `Reader`) read them meanwhile, but another
    process cannot save these ranks until this one exits or calls `release`. Without it, each
    save registers and releases them.

    Raises:
        InvalidArgumentError: a bad job id, step, rank or item; an index over `index_capacity`.
        FailedPreconditionError: the job already holds a step >= `step` for this rank; or a live
            process held the rank for `claim_timeout_s`.
        ResourceExhaustedError: the daemon's store has no room for the shard.
    """
    job_id = _check_job_id(job_id)
    step = _check_step(step)
    index_capacity = _check_capacity(index_capacity)
    if isinstance(rank, bool) or isinstance(world_size, bool) or not 0 <= rank < world_size:
        raise InvalidArgumentError(f"rank {rank} of world {world_size}: need 0 <= rank < world")
    fqns = set()
    for item in itertools.chain(tensors, byte_items):
        key = (item.fqn, getattr(item, "offsets", None))
        if key in fqns:
            raise InvalidArgumentError(f"rank {rank} stores {item.fqn!r} "
                                       f"{'at ' + str(list(key[1])) + ' ' if key[1] else ''}twice")
        fqns.add(key)
    import ctypes

    path = _socket_path(socket_path)
    where = f"tessera.dcp: saving job '{job_id}' rank {rank} step {step}"
    made: Dict[str, Any] = {}

    def data_entries(held: Optional[Sequence[Entry]]) -> List[Entry]:
        entries, made["keep"] = _entries_for(tensors, byte_items, held)
        layout = _layout_of(entries)
        index = RankIndex(
            job_id, step, rank, world_size, layout,
            tuple(TensorChunk(t.fqn, tuple(t.offsets), tuple(t.sizes), tuple(t.size), t.dtype,
                              t.itemsize, rank, e.name) for t, e in zip(tensors, entries)),
            tuple(BytesItem(b.fqn, rank, e.name, len(b.data))
                  for b, e in zip(byte_items, entries[len(tensors):])),
            planner_data)
        encoded = index.to_json()
        # What a reader checks, checked here first: a save no reader would accept fails now.
        RankIndex.from_json(encoded, job_id=job_id, step=step, rank=rank)
        if len(encoded) > index_capacity:
            raise InvalidArgumentError(
                f"the DCP index of rank {rank} is {len(encoded)} bytes ({len(tensors)} chunks, "
                f"{len(byte_items)} other items), over index_capacity={index_capacity}: pass a "
                "larger index_capacity to the Writer and the same to the Reader")
        made["index"], made["encoded"] = index, encoded
        return entries

    if tensors or byte_items:
        on_device = tuple(t.on_device for t in tensors) + (False,) * len(byte_items)
        _store_shard(path, job_id, rank, world_size, data_entries, on_device, step, stream,
                     use_gpu, keep_registered, claim_timeout_s,
                     f"{where} ({len(tensors) + len(byte_items)} entries)")
    else:
        data_entries(None)
    encoded = made["encoded"]
    blob = ctypes.create_string_buffer(encoded, index_capacity)
    _store_shard(path, job_id + INDEX_JOB_SUFFIX, rank, world_size,
                 lambda _held: [Entry.blob(INDEX_ENTRY, ctypes.addressof(blob), index_capacity,
                                           len(encoded))],
                 (False,), step, None, False, keep_registered, claim_timeout_s,
                 f"{where} (its index)")
    return made["index"]


# -- DCP adapters --------------------------------------------------------------------------------


def _types() -> Any:
    """The DCP classes the adapters build (a seam: tests without DCP put stand-ins here)."""
    if _DCP_MISSING:
        raise ImportError(
            "tessera.dcp.Writer and Reader need torch.distributed.checkpoint (PyTorch >= 2.2), "
            f"which did not import here: {_DCP_MISSING}")
    import types

    import torch.distributed.checkpoint.metadata as md
    import torch.distributed.checkpoint.planner as planner
    import torch.distributed.checkpoint.storage as storage
    from torch.futures import Future

    return types.SimpleNamespace(
        Metadata=md.Metadata, MetadataIndex=md.MetadataIndex,
        TensorStorageMetadata=md.TensorStorageMetadata,
        BytesStorageMetadata=md.BytesStorageMetadata,
        ChunkStorageMetadata=md.ChunkStorageMetadata, TensorProperties=md.TensorProperties,
        StorageMeta=getattr(md, "StorageMeta", None), WriteResult=storage.WriteResult,
        WriteItemType=planner.WriteItemType, LoadItemType=planner.LoadItemType, Future=Future)


@dataclass(frozen=True)
class StoredAt:
    """Where a DCP item went (a ``WriteResult``'s and the ``Metadata``'s ``storage_data``)."""

    rank: int
    entry: str


@dataclass(frozen=True)
class _RankAssignment:
    """What the coordinator's global plan tells each saving rank (a ``SavePlan``'s
    ``storage_data``): its index among the plans and how many there are."""

    rank: int
    world_size: int


def _torch_dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "", 1)


def _torch_dtype(name: str, itemsize: int) -> Any:
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise DataLossError(f"the checkpoint's dtype {name!r:.40} is not a dtype of this "
                            f"PyTorch ({torch.__version__})")
    size = torch.empty((), dtype=dtype).element_size()
    if size != itemsize:
        raise DataLossError(f"the checkpoint's {name} has {itemsize}-byte elements, this "
                            f"PyTorch's {size}")
    return dtype


def chunk_tensor(view: memoryview, chunk: TensorChunk) -> Any:
    """A CPU tensor over `view` (a chunk's bytes, row-major), of the chunk's dtype and shape; it
    shares `view`'s memory."""
    import torch

    dtype = _torch_dtype(chunk.dtype, chunk.itemsize)
    if len(view) != chunk.nbytes:
        raise DataLossError(f"chunk of {chunk.fqn!r:.80} at {list(chunk.offsets)}: "
                            f"{len(view)} bytes for {chunk.nbytes}")
    if chunk.nbytes == 0:
        return torch.empty(chunk.sizes, dtype=dtype)
    return torch.frombuffer(view, dtype=torch.uint8).view(dtype).reshape(chunk.sizes)


def part_tensor(read: ChunkRead, chunk: TensorChunk, part: ReadPart) -> Any:
    """A CPU tensor of the chunk's dtype and the part's shape over the part's bytes in
    `part.data` (a strided view: it shares that memory, valid during the `deliver` call)."""
    import torch

    dtype = _torch_dtype(chunk.dtype, chunk.itemsize)
    if _volume(part.lengths) == 0:
        return torch.empty(part.lengths, dtype=dtype)
    strides = _strides(chunk.sizes, 1)  # in elements
    first = sum((o + a) * s for o, a, s in zip(read.box_offsets, part.at, strides))
    at = first * chunk.itemsize - part.start
    if at < 0 or at % chunk.itemsize or len(part.data) % chunk.itemsize:
        raise InternalError(f"part of {chunk.fqn!r:.80} at {list(part.at)}: its data holds bytes "
                            f"[{part.start}, +{len(part.data)}), not aligned to its "
                            f"{chunk.itemsize}-byte elements from byte {first * chunk.itemsize}")
    flat = torch.frombuffer(part.data, dtype=torch.uint8).view(dtype)
    return flat.as_strided(part.lengths, strides, at // chunk.itemsize)


def narrow(tensor: Any, offsets: Sequence[int], lengths: Sequence[int]) -> Any:
    """`tensor` narrowed to the box [offsets, offsets + lengths) (a view)."""
    for d, (o, n) in enumerate(zip(offsets, lengths)):
        if o != 0 or n != tensor.shape[d]:
            tensor = tensor.narrow(d, o, n)
    return tensor


class Writer(_StorageWriterBase):  # type: ignore[misc,valid-type]
    """A DCP ``StorageWriter`` that stores the checkpoint in Tessera: ``dcp.save(state_dict,
    storage_writer=tessera.dcp.Writer(job_id, step))`` (or ``async_save``).

    Each saving rank stores its chunks in its shard of Tessera job `job_id` and its index in job
    ``job_id + ".dcp-index"``, waiting until both are sealed (see the module's docstring). Use a
    job id of its own, not the Snapshotter's.

    Args:
        job_id: the checkpoint's job; or give ``checkpoint_id="tessera://JOB/STEP"`` to
            ``dcp.save``.
        step: the checkpoint's step; steps must increase within a job.
        socket_path: the daemon's agent socket; default ``TESSERA_SOCKET``, else
            `DEFAULT_SOCKET_PATH`.
        use_gpu: copy CUDA tensors device-to-host with Tessera's copy engine (False: refuse CUDA
            tensors; DCP's ``async_save`` hands over CPU copies anyway).
        index_capacity: bytes of each rank's index blob (a reader reads any).
        claim_timeout_s: how long to wait while another live process has one of this rank's
            shards registered (another process saving the rank, or a
            `tessera.client.read_snapshot` of it; a `Reader` claims nothing).
        keep_registered: keep this rank's shards registered after the save, so that the next
            save of the same layout reuses the registration and its mapped memory; readers are
            not held up by it (see `release`).
    """

    def __init__(self, job_id: Optional[str] = None, step: Optional[int] = None, *,
                 socket_path: Optional[str] = None, use_gpu: bool = True,
                 index_capacity: int = INDEX_CAPACITY, claim_timeout_s: float = 60.0,
                 keep_registered: bool = True) -> None:
        super().__init__()
        self.job_id = None if job_id is None else _check_job_id(job_id)
        self.step = None if step is None else _check_step(step)
        self.socket_path = socket_path
        self.use_gpu = bool(use_gpu)
        self.index_capacity = _check_capacity(index_capacity)
        self.claim_timeout_s = claim_timeout_s
        self.keep_registered = bool(keep_registered)
        self.is_coordinator = False
        self._planner_data: PlannerData = None
        self.last_index: Optional[RankIndex] = None
        """This rank's index, once `write_data` stored it."""

    @property
    def checkpoint_id(self) -> Optional[str]:
        """``"tessera://JOB/STEP"``, once both are known."""
        if self.job_id is None or self.step is None:
            return None
        return f"tessera://{self.job_id}/{self.step}"

    def reset(self, checkpoint_id: Union[str, "os.PathLike[str]", None] = None) -> None:
        if checkpoint_id is not None:
            self.job_id, self.step = parse_checkpoint_id(checkpoint_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Union[str, "os.PathLike[str]"]) -> bool:
        try:
            parse_checkpoint_id(checkpoint_id)
            return True
        except (InvalidArgumentError, TypeError):
            return False

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if self.job_id is None or self.step is None:
            raise InvalidArgumentError(
                "tessera.dcp.Writer needs a job id and a step: Writer(job_id, step=...), or "
                "dcp.save(..., checkpoint_id='tessera://JOB/STEP')")
        if kwargs.get("use_collectives") is False:
            raise InvalidArgumentError(
                "tessera.dcp.Writer needs DCP's collectives (the global plan numbers the saving "
                "ranks); use_collectives=False is not supported")
        self.is_coordinator = bool(is_coordinator)

    def storage_meta(self) -> Any:
        meta = _types().StorageMeta
        return None if meta is None else meta(checkpoint_id=self.checkpoint_id)

    def prepare_local_plan(self, plan: Any) -> Any:
        self._planner_data = _planner_data(plan.planner_data)
        return plan

    def prepare_global_plan(self, plans: List[Any]) -> List[Any]:
        return [dataclasses.replace(plan, storage_data=_RankAssignment(i, len(plans)))
                for i, plan in enumerate(plans)]

    def write_data(self, plan: Any, planner: Any) -> Any:
        t = _types()
        assignment = plan.storage_data
        if not isinstance(assignment, _RankAssignment):
            raise FailedPreconditionError(
                "tessera.dcp.Writer.write_data got a plan its prepare_global_plan did not make "
                f"(storage_data {assignment!r:.80}); the same Writer class must run on every rank")
        tensors: List[TensorToSave] = []
        byte_items: List[BytesToSave] = []
        keep: List[Any] = []  # the tensors whose memory is registered
        indexes: List[Tuple[Any, bool]] = []  # (WriteItem index, is a tensor), in entry order
        cuda = False
        for item in plan.items:
            data = planner.resolve_data(item)
            if item.type == t.WriteItemType.BYTE_IO:
                raw = data.getvalue() if hasattr(data, "getvalue") else data.read()
                byte_items.append(BytesToSave(item.index.fqn, bytes(raw)))
                indexes.append((item.index, False))
                continue
            tensor = _local_contiguous(data, item)
            if tensor.is_cuda:
                import torch

                if not self.use_gpu:
                    raise InvalidArgumentError(
                        f"{item.index.fqn!r} is a CUDA tensor and the Writer has use_gpu=False")
                if tensor.device.index != torch.cuda.current_device():
                    raise InvalidArgumentError(
                        f"{item.index.fqn!r} is on {tensor.device}, not on the current device "
                        f"cuda:{torch.cuda.current_device()} that Tessera copies from: call "
                        "torch.cuda.set_device first")
                cuda = True
            elif tensor.device.type != "cpu":  # memory Tessera cannot copy from: a host copy
                tensor = tensor.cpu()
            keep.append(tensor)
            chunk = item.tensor_data.chunk
            tensors.append(TensorToSave(
                item.index.fqn, tuple(chunk.offsets), tuple(chunk.sizes),
                tuple(item.tensor_data.size), _torch_dtype_name(tensor.dtype),
                tensor.element_size(), tensor.data_ptr(), tensor.is_cuda))
            indexes.append((item.index, True))
        stream = None
        if cuda:
            import torch

            stream = torch.cuda.current_stream()
        assert self.job_id is not None and self.step is not None
        # The final plan carries this rank's planner data; with DCP's plan caching the local
        # plan seen by prepare_local_plan may be an empty stand-in for an unchanged one.
        planner_data = (self._planner_data if plan.planner_data is None
                        else _planner_data(plan.planner_data))
        index = save_rank(self.job_id, self.step, assignment.rank, assignment.world_size,
                          tensors, byte_items, planner_data=planner_data,
                          socket_path=self.socket_path, use_gpu=cuda, stream=stream,
                          index_capacity=self.index_capacity,
                          claim_timeout_s=self.claim_timeout_s,
                          keep_registered=self.keep_registered)
        self.last_index = index
        del keep
        tensor_at = iter(index.chunks)
        bytes_at = iter(index.byte_items)
        results = []
        for write_index, is_tensor in indexes:
            stored: Any = next(tensor_at) if is_tensor else next(bytes_at)
            size = stored.nbytes if is_tensor else stored.length
            results.append(t.WriteResult(index=write_index, size_in_bytes=size,
                                         storage_data=StoredAt(stored.rank, stored.entry)))
        future = t.Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Any, results: List[List[Any]]) -> None:
        total = sum(r.size_in_bytes for rank in results for r in rank)
        _log.info("tessera.dcp: saved %s: %d ranks, %d items, %d bytes", self.checkpoint_id,
                  len(results), sum(len(rank) for rank in results), total)


def _local_contiguous(data: Any, item: Any) -> Any:
    """The plain, contiguous tensor of a resolved write item, checked against its chunk."""
    tensor = data.detach()
    if hasattr(tensor, "to_local"):  # a DTensor that a planner did not narrow to its shard
        tensor = tensor.to_local()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    sizes = tuple(item.tensor_data.chunk.sizes)
    if tuple(tensor.shape) != sizes:
        raise InvalidArgumentError(
            f"{item.index.fqn!r}: the planner resolved a tensor of shape {list(tensor.shape)} "
            f"for a chunk of {list(sizes)}")
    return tensor


def _planner_data(data: Any) -> PlannerData:
    """DCP's default planner data (FQN -> path of str and int), or None for anything else."""
    if data is None:
        return None
    if isinstance(data, Mapping) and all(
            isinstance(k, str) and isinstance(v, (tuple, list))
            and all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in v)
            for k, v in data.items()):
        return {k: tuple(v) for k, v in data.items()}
    _log.warning("tessera.dcp: planner data of type %s is not stored (only the default "
                 "planner's FQN paths are)", type(data).__name__)
    return None


class Reader(_StorageReaderBase):  # type: ignore[misc,valid-type]
    """A DCP ``StorageReader`` that loads a checkpoint a `Writer` stored in Tessera:
    ``dcp.load(state_dict, storage_reader=tessera.dcp.Reader(job_id, step))``, into the same
    layout or another (world size, FSDP, TP or DP sharding: DCP plans the ranges, Tessera serves
    them). It reads the manifest of each shard the plan needs and only the byte ranges the plan
    needs, claiming no rank (see `CheckpointReader`): the processes that saved it, or save the
    job on, are not disturbed.

    Args:
        job_id: the checkpoint's job; or give ``checkpoint_id="tessera://JOB/STEP"`` to
            ``dcp.load``.
        step: its step; None: the newest step whose index every rank has on this daemon.
        socket_path, max_shard_bytes, read_threads: as `CheckpointReader`.
        index_capacity, claim_timeout_s: deprecated, without effect; each warns once.
    """

    def __init__(self, job_id: Optional[str] = None, step: Optional[int] = None, *,
                 socket_path: Optional[str] = None, max_shard_bytes: Optional[int] = None,
                 read_threads: Optional[int] = None, index_capacity: Optional[int] = None,
                 claim_timeout_s: Optional[float] = None) -> None:
        super().__init__()
        self.job_id = None if job_id is None else _check_job_id(job_id)
        self.step = None if step is None else _check_step(step)
        self.socket_path = socket_path
        self.max_shard_bytes, self.read_threads = _reader_options(
            type(self).__name__, max_shard_bytes, read_threads, index_capacity, claim_timeout_s)
        self.reader: Optional[CheckpointReader] = None
        """The Tessera side, once `read_metadata` made it."""

    @property
    def checkpoint_id(self) -> Optional[str]:
        if self.job_id is None:
            return None
        step = self.reader.step if self.reader is not None else self.step
        return f"tessera://{self.job_id}/{'latest' if step is None else step}"

    def reset(self, checkpoint_id: Union[str, "os.PathLike[str]", None] = None) -> None:
        if checkpoint_id is not None:
            self.job_id, self.step = parse_checkpoint_id(checkpoint_id)
        if self.reader is not None:
            self.reader.close()
        self.reader = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Union[str, "os.PathLike[str]"]) -> bool:
        return Writer.validate_checkpoint_id(checkpoint_id)

    def read_metadata(self) -> Any:
        # Newer DCP catches this method's exceptions and fails with "metadata is None": the
        # reason is logged here first.
        try:
            if self.job_id is None:
                raise InvalidArgumentError(
                    "tessera.dcp.Reader needs a job id: Reader(job_id, step=...), or "
                    "dcp.load(..., checkpoint_id='tessera://JOB/STEP')")
            self.reader = self._open()
            return _metadata(self.reader.index, _types())
        except Exception as e:
            _log.error("tessera.dcp: cannot read the metadata of DCP checkpoint %s: %s",
                       self.checkpoint_id, e)
            raise

    def _open(self) -> CheckpointReader:
        assert self.job_id is not None
        return CheckpointReader(self.job_id, self.step, socket_path=self.socket_path,
                                max_shard_bytes=self.max_shard_bytes,
                                read_threads=self.read_threads)

    def set_up_storage_reader(self, metadata: Any, is_coordinator: bool, *args: Any,
                              **kwargs: Any) -> None:
        if self.reader is None:
            raise FailedPreconditionError("tessera.dcp.Reader: set_up_storage_reader before "
                                          "read_metadata")
        self.is_coordinator = bool(is_coordinator)

    def prepare_local_plan(self, plan: Any) -> Any:
        return plan

    def prepare_global_plan(self, plans: List[Any]) -> List[Any]:
        return plans

    def read_data(self, plan: Any, planner: Any) -> Any:
        """Reads the plan's items and hands each to the planner: a tensor's parts are copied
        into the tensor the planner resolves, which is committed once all are in. The
        connection to the daemon is closed when done (a later read opens another)."""
        t = _types()
        reader = self.reader
        if reader is None:
            raise FailedPreconditionError("tessera.dcp.Reader: read_data before read_metadata")
        reads = []
        for item in plan.items:
            storage = item.storage_index
            if item.type == t.LoadItemType.BYTE_IO:
                reads.append(ChunkRead(storage.fqn, token=item))
            else:
                if storage.offset is None:
                    raise InvalidArgumentError(
                        f"read of tensor {storage.fqn!r} names no chunk (storage_index.offset)")
                reads.append(ChunkRead(storage.fqn, tuple(storage.offset),
                                       tuple(item.storage_offsets), tuple(item.lengths), item))
        # Per tensor read being filled: its target and the elements still to come.
        filling: Dict[int, List[Any]] = {}

        def deliver(read: ChunkRead, where: Any, part: ReadPart) -> None:
            item = read.token
            if isinstance(where, BytesItem):
                planner.load_bytes(item, io.BytesIO(bytes(part.data)))
                return
            state = filling.get(id(read))
            if state is None:
                target = planner.resolve_tensor(item).detach()
                if tuple(target.shape) != tuple(read.lengths):
                    raise InvalidArgumentError(
                        f"read of {read.fqn!r}: the planner's target is {list(target.shape)}, "
                        f"the read {list(read.lengths)}")
                state = filling[id(read)] = [target, _volume(read.lengths)]
            count = _volume(part.lengths)
            if count:
                narrow(state[0], part.at, part.lengths).copy_(part_tensor(read, where, part))
            state[1] -= count
            if state[1] == 0:
                planner.commit_tensor(item, state[0])

        try:
            reader.serve(reads, deliver)
        finally:
            reader.close()
        future = t.Future()
        future.set_result(None)
        return future


def _metadata(index: CheckpointIndex, t: Any) -> Any:
    """DCP's ``Metadata`` of a checkpoint, with `StoredAt` as its storage data."""
    import torch

    state: Dict[str, Any] = {}
    storage: Dict[Any, StoredAt] = {}
    for fqn, info in index.tensors.items():
        dtype = _torch_dtype(info.dtype, info.itemsize)
        state[fqn] = t.TensorStorageMetadata(
            properties=t.TensorProperties(dtype=dtype), size=torch.Size(info.size),
            chunks=[t.ChunkStorageMetadata(offsets=torch.Size(c.offsets),
                                           sizes=torch.Size(c.sizes)) for c in info.chunks])
        for i, c in enumerate(info.chunks):
            storage[t.MetadataIndex(fqn, c.offsets, i)] = StoredAt(c.rank, c.entry)
    for fqn, item in index.byte_items.items():
        state[fqn] = t.BytesStorageMetadata()
        storage[t.MetadataIndex(fqn)] = StoredAt(item.rank, item.entry)
    return t.Metadata(state_dict_metadata=state, planner_data=dict(index.planner_data) or None,
                      storage_data=storage)


class SnapshotReader(Reader):
    """A DCP ``StorageReader`` over a snapshot the `tessera.torch.Snapshotter` took (not a DCP
    checkpoint): ``dcp.load(state_dict, storage_reader=tessera.dcp.SnapshotReader(job_id))``
    loads it into any layout (another world size, FSDP, TP or DP sharding), as if
    ``get_state_dict(model, optimizer)`` had been saved as ``{"model": ..., "optim": ...}``
    (see `SnapshotCheckpoint` for the names and how the bytes are read). The trainers of the job
    may go on snapshotting meanwhile: the reader does not claim their ranks, but a step they
    release while it is read fails the read (NotFoundError), and the newest is read again.

    Args:
        job_id: the Snapshotter's job; or ``checkpoint_id="tessera://JOB/STEP"``.
        step: the step; None: the newest step every rank sealed on this daemon.
        socket_path: the daemon's agent socket.
        model_prefix, optim_prefix: the FQN prefixes of the model's and the optimizer's state
            in the state dict loaded into ("model." and "optim.").
        max_shard_bytes, read_threads: as `CheckpointReader`.
        allow_pickle: as `SnapshotCheckpoint` (the model's extra state).
        max_chunk_bytes: deprecated name of `max_shard_bytes`; warns once.
    """

    def __init__(self, job_id: Optional[str] = None, step: Optional[int] = None, *,
                 socket_path: Optional[str] = None, model_prefix: str = "model.",
                 optim_prefix: str = "optim.", max_shard_bytes: Optional[int] = None,
                 read_threads: Optional[int] = None, allow_pickle: bool = False,
                 max_chunk_bytes: Optional[int] = None) -> None:
        super().__init__(job_id, step, socket_path=socket_path,
                         max_shard_bytes=_shard_limit(type(self).__name__, max_shard_bytes,
                                                      max_chunk_bytes),
                         read_threads=read_threads)
        self.model_prefix = model_prefix
        self.optim_prefix = optim_prefix
        self.allow_pickle = bool(allow_pickle)

    def _open(self) -> CheckpointReader:
        assert self.job_id is not None
        return SnapshotCheckpoint(self.job_id, self.step, socket_path=self.socket_path,
                                  model_prefix=self.model_prefix, optim_prefix=self.optim_prefix,
                                  max_shard_bytes=self.max_shard_bytes,
                                  read_threads=self.read_threads, allow_pickle=self.allow_pickle)


def _shard_limit(owner: str, max_shard_bytes: Optional[int],
                 max_chunk_bytes: Optional[int]) -> Optional[int]:
    """`max_shard_bytes`, or the deprecated `max_chunk_bytes` that stands for it."""
    _deprecated(owner, "max_chunk_bytes", max_chunk_bytes)
    if max_chunk_bytes is None:
        return max_shard_bytes
    if max_shard_bytes is not None:
        raise InvalidArgumentError(f"{owner}: pass max_shard_bytes only (max_chunk_bytes is its "
                                   "deprecated name)")
    return max_chunk_bytes


DaemonSnapshotSource = DaemonSource
"""The name `DaemonSource` had as `SnapshotCheckpoint`'s source."""

from ._snapshot_checkpoint import SnapshotCheckpoint  # noqa: E402,F401
