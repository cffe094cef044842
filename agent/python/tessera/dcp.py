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

Reading. The C ABI restores a snapshot only into a registration that matches its manifest, so a
reader learns each rank's layout from its index and copies the whole shard out through
`tessera.client.read_snapshot`: the daemon serves it from its own memory, copies it from the node
that holds it, or rebuilds it from fragments, checking every block. That read claims the rank
while it runs, and waits while a live process has the rank registered, which a saving process
does between its saves (`release`). A read-only, ranged access to another rank's snapshot needs
a call the C ABI does not have yet.

The Tessera side is plain Python, usable and tested without DCP: `save_rank` stores one rank's
chunks and index, `CheckpointIndex` merges the ranks' indexes into DCP's view of the checkpoint
(every chunk checked against the tensor's bounds, the chunks of a tensor covering it exactly once),
and `CheckpointReader` serves chunk ranges (`CheckpointReader.serve`) and regions of whole tensors
assembled from every chunk they cross (`CheckpointReader.read_region`). `Writer` and `Reader` are
thin adapters to DCP's ``StorageWriter`` and ``StorageReader``; they need PyTorch >= 2.2 (DCP's
current API) and are imported from it when this module is.

Bytes read out of the daemons are not trusted: an index is parsed as JSON (never unpickled), and
every name, dtype, dimension, offset and length in it is bounded and cross-checked before it
sizes an allocation or a copy.
"""

from __future__ import annotations

import atexit
import dataclasses
import io
import itertools
import json
import logging
import math
import os
import re
import threading
from dataclasses import dataclass
from typing import (Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple,
                    Union)

from .client import (DTYPE_BYTES, Client, Entry, EntryKind, SnapshotCopy, _register_when_free,
                     read_snapshot)
from .errors import (DataLossError, FailedPreconditionError, InvalidArgumentError, NotFoundError,
                     TesseraError)

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
    "RankIndex",
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
    "release",
    "save_rank",
]

_log = logging.getLogger("tessera.dcp")

FORMAT = "tessera.dcp/1"
"""The index format this module writes and reads."""

INDEX_JOB_SUFFIX = ".dcp-index"
"""The indexes of checkpoint job ``JOB`` are the Tessera job ``JOB + INDEX_JOB_SUFFIX``."""

INDEX_CAPACITY = 4 << 20
"""The capacity of a rank's index blob, bytes. Writer and reader must use the same (it is part of
the index shard's layout); about 100 bytes per chunk and per FQN of the planner's data, so 4 MiB
holds some 30,000 chunks per rank."""

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
             lengths: Sequence[int], itemsize: int) -> int:
    """Copies the box of `lengths` at `src_offsets` in row-major `src` (of `src_shape`) to
    `dst_offsets` in row-major `dst` (of `dst_shape`), both of elements of `itemsize` bytes, run
    by run. Returns the bytes copied.

    Raises:
        InvalidArgumentError: a box outside its shape, or a buffer shorter than its shape.
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
    for name, buf, shape in (("source", src, src_shape), ("destination", dst, dst_shape)):
        if len(buf) < _volume(shape) * itemsize:
            raise InvalidArgumentError(
                f"copy_box: the {name} buffer is {len(buf)} bytes, short of {list(shape)} "
                f"elements of {itemsize} bytes")
    if _volume(lengths) == 0:
        return 0
    if not lengths:
        dst[:itemsize] = src[:itemsize]
        return itemsize
    k = max(_contiguous_from(src_shape, src_offsets, lengths),
            _contiguous_from(dst_shape, dst_offsets, lengths))
    src_strides = _strides(src_shape, itemsize)
    dst_strides = _strides(dst_shape, itemsize)
    run = _volume(lengths[k:]) * itemsize
    src_start = src_offsets[k] * src_strides[k]
    dst_start = dst_offsets[k] * dst_strides[k]
    copied = 0
    for index in itertools.product(*(range(n) for n in lengths[:k])):
        s = src_start + sum((o + i) * st for o, i, st in zip(src_offsets, index, src_strides))
        d = dst_start + sum((o + i) * st for o, i, st in zip(dst_offsets, index, dst_strides))
        dst[d:d + run] = src[s:s + run]
        copied += run
    return copied


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
    """Reads shards through the local tesserad (`tessera.client.read_snapshot`).

    Args:
        socket_path: the daemon's agent socket.
        claim_timeout_s: how long a read waits while a live process holds the rank it reads.
        max_bytes: the most bytes one shard may take in this process; None: physical memory.
    """

    def __init__(self, socket_path: str, claim_timeout_s: float = 60.0,
                 max_bytes: Optional[int] = None) -> None:
        self.socket_path = socket_path
        self.claim_timeout_s = claim_timeout_s
        self.max_bytes = max_bytes

    def read(self, job_id: str, rank: int, world_size: int, step: int, layout: Sequence[Entry],
             max_bytes: Optional[int] = None) -> SnapshotCopy:
        """The entries of (`job_id`, `rank`) at `step`, whose layout is `layout`; refused before
        anything is allocated when they take more than `max_bytes` (else this source's bound)."""
        try:
            return read_snapshot(self.socket_path, job_id, rank, world_size, step, layout,
                                 claim_timeout_s=self.claim_timeout_s,
                                 max_bytes=self.max_bytes if max_bytes is None else max_bytes)
        except FailedPreconditionError as e:
            if "still held after waiting" not in str(e):
                raise
            raise FailedPreconditionError(
                f"{_message(e)}. A process that saved with tessera.dcp keeps its ranks "
                "registered until it exits or calls tessera.dcp.release() (or saves with "
                "keep_registered=False)") from e

    def versions(self, job_id: str) -> List[Any]:
        """The snapshots this daemon holds of `job_id` (`tessera.Version`)."""
        with Client(self.socket_path, use_gpu=False) as client:
            return client.list_versions(job_id)


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


Deliver = Callable[[ChunkRead, Union[TensorChunk, BytesItem], memoryview], None]
"""Called by `CheckpointReader.serve` with a read, the chunk or item it names, and all of that
chunk's bytes (row-major) or the item's bytes; valid during the call only."""


class CheckpointReader:
    """Reads one DCP checkpoint held by the daemons: its index, and byte ranges of its chunks.

    Args:
        job_id: the checkpoint's job.
        step: its step; None: the newest step whose index every rank has on this daemon.
        socket_path: the daemon's agent socket; default ``TESSERA_SOCKET``, else
            `DEFAULT_SOCKET_PATH`.
        index_capacity: as the `Writer` used.
        claim_timeout_s: how long a read waits while a live process holds the rank it reads.
        max_shard_bytes: the most bytes one shard may take in this process (checked before it is
            allocated); None: the size the daemon lists for it, else physical memory.
        source: where shards come from (tests); default a `DaemonSource`.
    """

    def __init__(self, job_id: str, step: Optional[int] = None, *,
                 socket_path: Optional[str] = None, index_capacity: int = INDEX_CAPACITY,
                 claim_timeout_s: float = 60.0, max_shard_bytes: Optional[int] = None,
                 source: Optional[Any] = None) -> None:
        self.job_id = _check_job_id(job_id)
        self.step = None if step is None else _check_step(step)
        self.index_capacity = _check_capacity(index_capacity)
        self.max_shard_bytes = max_shard_bytes
        self.source = source or DaemonSource(_socket_path(socket_path), claim_timeout_s)
        self._index: Optional[CheckpointIndex] = None
        self._versions: Dict[str, Dict[Tuple[int, int], Any]] = {}
        self._lock = threading.Lock()

    @property
    def index_job(self) -> str:
        return self.job_id + INDEX_JOB_SUFFIX

    def _index_layout(self) -> List[Entry]:
        return [Entry(INDEX_ENTRY, 0, self.index_capacity, "bytes", (self.index_capacity,),
                      EntryKind.BLOB)]

    def _read_index(self, rank: int, world_size: int, step: int) -> RankIndex:
        try:
            copy = self.source.read(self.index_job, rank, world_size, step, self._index_layout())
        except NotFoundError as e:
            raise NotFoundError(
                f"the DCP checkpoint of job '{self.job_id}' step {step} has no index for rank "
                f"{rank} (job '{self.index_job}'): that rank's save did not finish, or the "
                f"daemons no longer hold the step ({_message(e)})") from e
        except FailedPreconditionError as e:
            if "does not match the registered state" not in str(e):
                raise
            raise FailedPreconditionError(
                f"the DCP index of job '{self.job_id}' rank {rank} step {step} is not a blob of "
                f"{self.index_capacity} bytes: the Writer used another index_capacity; pass the "
                f"same to the Reader ({_message(e)})") from e
        return RankIndex.from_json(copy.entry(INDEX_ENTRY), job_id=self.job_id, step=step,
                                   rank=rank)

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
            first = self._read_index(0, max(ranks_at[step]) + 1, step)
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
                if self.step is None:
                    first = self._newest_complete_step()
                else:
                    # The world comes with rank 0's index; registering to read it needs one,
                    # which this daemon's listing tells when it holds the ranks.
                    guess = 1 + max((r for r, s in self._listed(self.index_job)
                                     if s == self.step), default=0)
                    first = self._read_index(0, guess, self.step)
                step = first.step
                ranks = [first] + [self._read_index(r, first.world_size, step)
                                   for r in range(1, first.world_size)]
                self._index = CheckpointIndex(ranks)
                self.step = step
                _log.info("DCP checkpoint of job '%s' step %d: %d ranks, %d tensors in %d "
                          "chunks, %d other items", self.job_id, step, first.world_size,
                          len(self._index.tensors),
                          sum(len(t.chunks) for t in self._index.tensors.values()),
                          len(self._index.byte_items))
            return self._index

    def _listed(self, job_id: str) -> Dict[Tuple[int, int], Any]:
        """(rank, step) -> the sealed versions of `job_id` this daemon lists (asked once)."""
        if job_id not in self._versions:
            listed = getattr(self.source, "versions", None)
            self._versions[job_id] = {} if listed is None else {
                (v.rank, v.step): v for v in listed(job_id) if v.sealed}
        return self._versions[job_id]

    def _shard_bound(self, rank: int, layout: Sequence[Entry]) -> Optional[int]:
        """Refuses a layout larger than the shard the daemon lists; returns the bound to use
        (None: the source's own)."""
        if self.max_shard_bytes is not None:
            return self.max_shard_bytes
        version = self._listed(self.job_id).get((rank, self.step))
        if version is None:
            return None  # held by another node: the restore itself checks the layout
        stored = sum(e.nbytes for e in layout)
        if stored > version.payload_bytes:
            raise DataLossError(
                f"the DCP index of job '{self.job_id}' rank {rank} step {self.step} describes "
                f"{stored} bytes of entries, but the daemon holds {version.payload_bytes} bytes "
                "for that shard")
        return None

    def _resolve(self, read: ChunkRead) -> Union[TensorChunk, BytesItem]:
        index = self.index
        if read.chunk_offsets is None:
            return index.bytes_item(read.fqn)
        chunk = index.chunk(read.fqn, read.chunk_offsets)
        _check_box(f"read of tensor {read.fqn!r} chunk at {list(chunk.offsets)} of "
                   f"{list(chunk.sizes)}", chunk.sizes, read.box_offsets, read.lengths)
        return chunk

    def serve(self, reads: Sequence[ChunkRead], deliver: Deliver) -> None:
        """Answers `reads`: checks every one first (nothing is read when one is bad), then reads
        the shards they need, one at a time in rank order, and calls `deliver` for each read.

        Raises:
            NotFoundError: an FQN or chunk the checkpoint does not have.
            InvalidArgumentError: a box outside its chunk.
            DataLossError: a shard whose bytes do not match its index.
        """
        resolved = [(read, self._resolve(read)) for read in reads]
        by_rank: Dict[int, List[Tuple[ChunkRead, Union[TensorChunk, BytesItem]]]] = {}
        for read, where in resolved:
            by_rank.setdefault(where.rank, []).append((read, where))
        for rank in sorted(by_rank):
            layout = self.index.layout(rank)
            try:
                copy = self.source.read(self.job_id, rank, self.index.world_size, self.step,
                                        layout, self._shard_bound(rank, layout))
            except NotFoundError as e:
                raise NotFoundError(
                    f"the DCP checkpoint of job '{self.job_id}' step {self.step} has an index for "
                    f"rank {rank} but not its chunks ({_message(e)}): a newer checkpoint's chunks "
                    "were sealed by every rank, which releases this one; read the newest") from e
            for read, where in by_rank[rank]:
                view = copy.entry(where.entry)
                expected = where.nbytes if isinstance(where, TensorChunk) else where.length
                if len(view) != expected:
                    raise DataLossError(
                        f"job '{self.job_id}' rank {rank} step {self.step}: entry "
                        f"{where.entry!r} ({where.fqn!r:.80}) holds {len(view)} bytes, its index "
                        f"says {expected}")
                deliver(read, where, view)
            del copy

    def read_bytes(self, fqn: str) -> bytes:
        """The stored bytes of non-tensor item `fqn`. Like `read_region` and `read_tensor`, each
        call reads the whole shards it needs: batch reads through `serve`."""
        out: List[bytes] = []
        self.serve([ChunkRead(fqn)], lambda _r, _w, view: out.append(bytes(view)))
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

        def deliver(read: ChunkRead, chunk: Any, view: memoryview) -> None:
            copy_box(view, chunk.sizes, read.box_offsets, memoryview(out), lengths, read.token,
                     read.lengths, chunk.itemsize)

        self.serve(reads, deliver)
        return out

    def read_tensor(self, fqn: str) -> bytearray:
        """All of tensor `fqn`, row-major."""
        info = self.index.tensors.get(fqn)
        if info is None:
            raise NotFoundError(self.index._unknown(fqn))
        return self.read_region(fqn, (0,) * len(info.size), info.size)


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
    `job_id` and its index job), keeping their snapshots, so that other processes can read them
    at once. Returns how many it released; a daemon that does not answer is logged.

    A save keeps its ranks registered (``keep_registered``, the default) because a registration
    maps the rank's slots anew, and the first copy into a new mapping faults in every page; while
    the process lives, another process's read of those ranks waits for them (`DaemonSource`).
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
            # A read in this process registered the rank too, and released it when done.
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
    no new mapping); other processes' reads of these ranks then wait until this process exits
    or calls `release`. Without it, each save registers and releases them.

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
        index_capacity: bytes of each rank's index blob; the Reader must be given the same.
        claim_timeout_s: how long to wait while a reader holds one of this rank's shards.
        keep_registered: keep this rank's shards registered after the save, so that the next
            save of the same layout reuses the registration and its mapped memory; other
            processes' reads of them wait meanwhile (see `release`).
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
    them).

    Args:
        job_id: the checkpoint's job; or give ``checkpoint_id="tessera://JOB/STEP"`` to
            ``dcp.load``.
        step: its step; None: the newest step whose index every rank has on this daemon.
        socket_path, index_capacity, claim_timeout_s, max_shard_bytes: as `CheckpointReader`.
    """

    def __init__(self, job_id: Optional[str] = None, step: Optional[int] = None, *,
                 socket_path: Optional[str] = None, index_capacity: int = INDEX_CAPACITY,
                 claim_timeout_s: float = 60.0, max_shard_bytes: Optional[int] = None) -> None:
        super().__init__()
        self.job_id = None if job_id is None else _check_job_id(job_id)
        self.step = None if step is None else _check_step(step)
        self.socket_path = socket_path
        self.index_capacity = _check_capacity(index_capacity)
        self.claim_timeout_s = claim_timeout_s
        self.max_shard_bytes = max_shard_bytes
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
        return CheckpointReader(
            self.job_id, self.step, socket_path=self.socket_path,
            index_capacity=self.index_capacity, claim_timeout_s=self.claim_timeout_s,
            max_shard_bytes=self.max_shard_bytes)

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

        def deliver(read: ChunkRead, where: Any, view: memoryview) -> None:
            item = read.token
            if isinstance(where, BytesItem):
                planner.load_bytes(item, io.BytesIO(bytes(view)))
                return
            source = narrow(chunk_tensor(view, where), read.box_offsets, read.lengths)
            target = planner.resolve_tensor(item).detach()
            if tuple(target.shape) != tuple(read.lengths):
                raise InvalidArgumentError(
                    f"read of {read.fqn!r}: the planner's target is {list(target.shape)}, the "
                    f"read {list(read.lengths)}")
            target.copy_(source)
            planner.commit_tensor(item, target)

        reader.serve(reads, deliver)
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
        max_chunk_bytes: the most bytes one chunk may take in this process.
    """

    def __init__(self, job_id: Optional[str] = None, step: Optional[int] = None, *,
                 socket_path: Optional[str] = None, model_prefix: str = "model.",
                 optim_prefix: str = "optim.", max_chunk_bytes: Optional[int] = None) -> None:
        super().__init__(job_id, step, socket_path=socket_path, max_shard_bytes=max_chunk_bytes)
        self.model_prefix = model_prefix
        self.optim_prefix = optim_prefix

    def _open(self) -> CheckpointReader:
        assert self.job_id is not None
        return SnapshotCheckpoint(self.job_id, self.step, socket_path=self.socket_path,
                                  model_prefix=self.model_prefix, optim_prefix=self.optim_prefix,
                                  max_chunk_bytes=self.max_shard_bytes)


from ._snapshot_checkpoint import DaemonSnapshotSource, SnapshotCheckpoint  # noqa: E402,F401
