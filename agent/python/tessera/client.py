"""A thin, typed Python wrapper over the C ABI of ``libtessera.so``.

`Client` knows nothing of PyTorch: entries describe raw memory by address. `tessera.torch` builds
on it. Contract, from ``agent/tessera.h``:

* Registered memory belongs to the caller and must stay valid (same address, same size) until
  `Client.close` or the next `Client.register`. The library reads it on its own thread after
  `Client.snapshot` returns, until the snapshot's copies finish; call `Client.fence` before
  anything overwrites it.
* A client is used from one training thread. ctypes releases the GIL during each call, so a
  blocking `Client.wait` does not stall other Python threads.

Example::

    with Client("/run/tessera/agent.sock") as client:
        client.register("job", rank=0, world_size=1,
                        entries=[Entry.tensor("w", addr, "float32", (1024,))])
        client.snapshot(step=10)
        client.wait()
"""

from __future__ import annotations

import ctypes
import enum
import json
import mmap
import operator
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from . import _lib
from .errors import (FailedPreconditionError, InternalError, InvalidArgumentError,
                     NotFoundError, OutOfRangeError)

DTYPE_BYTES = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int16": 2,
    "uint16": 2,
    "float16": 2,
    "bfloat16": 2,
    "int32": 4,
    "uint32": 4,
    "float32": 4,
    "int64": 8,
    "uint64": 8,
    "float64": 8,
    "complex64": 8,
    "complex128": 16,
    "bytes": 1,
}
"""The dtypes the daemon accepts, with their element size in bytes."""


class EntryKind(enum.IntEnum):
    """What an entry holds."""

    TENSOR = _lib.ENTRY_TENSOR
    """Fixed-size memory: nbytes must equal prod(shape) * itemsize."""
    BLOB = _lib.ENTRY_BLOB
    """Variable-size bytes: nbytes is the capacity, `Entry.length` the bytes currently valid."""


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}") from None


def _as_bounded_int(value: Any, what: str, low: int, high: int) -> int:
    """`value` as an int in [low, high]; InvalidArgumentError names the range otherwise."""
    number = _as_int(value, what)
    if not low <= number <= high:
        raise InvalidArgumentError(f"{what} must be in [{low}, {high}], got {number}")
    return number


def _as_c_string(value: Any, what: str) -> bytes:
    """A str without NUL characters, UTF-8 encoded for the C ABI."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    if "\0" in value:
        raise InvalidArgumentError(f"{what} {value!r} has a NUL character")
    return value.encode("utf-8")


@dataclass(frozen=True)
class Entry:
    """One registered region of memory: a tensor or a blob.

    Attributes:
        name: unique within the registration, 1..256 bytes, no control characters.
        address: host or device address of the memory (an int, e.g. ``tensor.data_ptr()``).
        nbytes: a tensor's size, or a blob's capacity.
        dtype: one of `DTYPE_BYTES` ("bytes" for blobs).
        shape: the tensor's dimensions (() for a scalar); informational for blobs.
        kind: `EntryKind.TENSOR` or `EntryKind.BLOB`.
        length: a blob's valid bytes (<= nbytes); ignored for tensors.
    """

    name: str
    address: int
    nbytes: int
    dtype: str = "bytes"
    shape: Tuple[int, ...] = ()
    kind: EntryKind = EntryKind.TENSOR
    length: int = 0

    @classmethod
    def tensor(cls, name: str, address: int, dtype: str, shape: Sequence[int]) -> "Entry":
        """A tensor entry; nbytes is computed from dtype and shape."""
        if not isinstance(dtype, str):
            raise TypeError(f"entry '{name}': dtype must be a str, got {type(dtype).__name__}")
        if dtype not in DTYPE_BYTES or dtype == "bytes":
            raise InvalidArgumentError(
                f"entry '{name}': dtype '{dtype}' is not one of "
                + ", ".join(d for d in DTYPE_BYTES if d != "bytes")
            )
        dims = tuple(_as_int(d, f"entry '{name}': shape dimension") for d in shape)
        count = 1
        for d in dims:
            count *= d
        return cls(name, address, count * DTYPE_BYTES[dtype], dtype, dims, EntryKind.TENSOR)

    @classmethod
    def blob(cls, name: str, address: int, capacity: int, length: int = 0) -> "Entry":
        """A blob entry of `capacity` bytes, `length` of them valid now."""
        return cls(name, address, capacity, "bytes", (capacity,), EntryKind.BLOB, length)


@dataclass(frozen=True)
class Stats:
    """The client's counters (``tessera_stats``)."""

    started: int
    """Snapshots started."""
    skipped: int
    """Snapshots skipped because the previous one was still in flight (when_busy="skip")."""
    busy_waits: int
    """Snapshots that waited for the previous one (when_busy="wait")."""
    busy_wait_ns: int
    """Total time those waits took."""
    sealed: int
    """Snapshots the daemon sealed."""
    failed: int
    """Snapshots that failed (see the log and `Client.wait`)."""
    bytes_copied: int
    """Bytes copied into the daemon's slots."""
    last_sealed_step: Optional[int]
    """The newest step this client sealed, None before the first."""
    has_gpu: bool
    """Whether the client copies with the CUDA engine."""
    bytes_staged: int = 0
    """Bytes copied device-to-device into the staging buffer, in all."""
    plan_staged_bytes: int = 0
    """The last snapshot's plan: bytes staged, of `plan_device_to_host_bytes`."""
    plan_device_to_host_bytes: int = 0
    """The last snapshot's device-to-host bytes."""
    plan_expected_stall_s: Optional[float] = None
    """The fence's expected wait beyond the window under that plan; None: not measured yet."""
    window_s: Optional[float] = None
    """GPU time from a snapshot to the next fence (smoothed); None: not measured yet."""
    d2h_bytes_per_s: Optional[float] = None
    """Measured device-to-host rate of snapshot copies (smoothed)."""
    d2d_bytes_per_s: Optional[float] = None
    """Measured device-to-device rate of staging copies (smoothed)."""
    staging_buffer_bytes: int = 0
    """GPU memory the staging buffer holds now."""
    staging_budget_short: int = 0
    """Snapshots whose plan wanted more staging than the budget allowed."""
    staging_alloc_failures: int = 0
    """Staging buffers the device could not allocate (those snapshots fell back to the fence)."""
    fence_cpu_waits: int = 0
    """Fences that waited on the CPU for the snapshot's copies to be issued."""
    dp_size: int = 0
    """The last DP-sharded restore's group size; 0: no DP-sharded restore yet."""
    gathered_with_nccl: bool = False
    """Whether that restore gathered the other members' slices over NCCL (else the daemon)."""
    bytes_gathered: int = 0
    """Bytes of the other members' slices that restore gathered."""
    gather_note: str = ""
    """Why that restore read the slices through the daemon instead of NCCL (cut, ending in
    "...", past 255 bytes); "" when NCCL was used or no DP-sharded restore happened."""


@dataclass(frozen=True)
class Version:
    """One snapshot the daemon holds (``tessera_version_info``). It does not say which job it
    belongs to."""

    rank: int
    """The rank whose snapshot it is."""
    step: int
    """The training step snapshotted."""
    payload_bytes: int
    """The bytes stored: the entries' slots (a blob's whole capacity) and the manifest."""
    payload_crc32c: int
    """The payload's CRC32C; meaningful once `sealed`."""
    sealed: bool
    """True when sealed (restorable); False while it is still being written."""


@dataclass(frozen=True)
class EntrySlice:
    """The part of a tensor that a DP-sharded snapshot's rank stores: bytes
    [offset, offset + length) of the tensor."""

    offset: int
    length: int


@dataclass(frozen=True)
class SnapshotEntry:
    """One entry of a snapshot's manifest (`Client.read_manifest`)."""

    name: str
    dtype: str
    """One of `DTYPE_BYTES` ("bytes" for blobs)."""
    shape: Tuple[int, ...]
    kind: EntryKind
    nbytes: int
    """A tensor's size, or a blob's capacity."""
    length: int
    """The bytes stored and readable with `Client.read_range`: a blob's valid length, a tensor's
    nbytes, or the length of its `slice`."""
    slice: Optional[EntrySlice]
    """Set when the rank stores only this part of the tensor (a DP-sharded snapshot): the other
    members of its data-parallel group store the rest, each its own slice."""


@dataclass(frozen=True)
class DataParallelGroup:
    """The data-parallel group of a DP-sharded snapshot's rank."""

    dp_rank: int
    """The rank's index in its group."""
    dp_size: int
    replicated_bytes: int
    """The replicated tensors' bytes, all members' slices together."""
    members_fingerprint: str
    """16 hex digits, the same for every member of the group."""


@dataclass(frozen=True)
class SnapshotManifest:
    """What one rank's sealed snapshot holds (`Client.read_manifest`)."""

    job_id: str
    rank: int
    world_size: int
    step: int
    """The step read (the newest sealed one when -1 was asked)."""
    crc_block_bytes: int
    """The size of the blocks `Client.read_range` checks, each against its CRC32C."""
    data_parallel: Optional[DataParallelGroup]
    """None unless the snapshot is DP-sharded."""
    entries: Tuple[SnapshotEntry, ...]
    """In the snapshot's order."""

    def entry(self, name: str) -> SnapshotEntry:
        """The entry named `name`.

        Raises:
            NotFoundError: no entry of that name (the message names a few that exist).
        """
        for e in self.entries:
            if e.name == name:
                return e
        shown = ", ".join(repr(e.name) for e in self.entries[:8])
        raise NotFoundError(
            f"job '{self.job_id}' rank {self.rank} step {self.step} has no entry {name!r} (it "
            f"has {len(self.entries)}: {shown}{', ...' if len(self.entries) > 8 else ''})")


_UINT64_MAX = 2**64 - 1
_MAX_MANIFEST_JSON_BYTES = 1 << 30
"""More manifest JSON than this is not asked for (100,000 entries take about 60 MB)."""


class _ManifestJson:
    """Reads the JSON of ``tessera_read_manifest``, checking every value's type and range: it
    is the library's output, but a value out of bounds is not passed on."""

    def __init__(self, text: str) -> None:
        try:
            self.raw = json.loads(text)
        except ValueError as e:
            raise self.error(f"does not parse ({e})") from None

    @staticmethod
    def error(what: str) -> InternalError:
        return InternalError(f"libtessera.so returned a manifest whose JSON {what}")

    def obj(self, value: Any, where: str) -> Dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(f"has {type(value).__name__} at {where}, not an object")
        return value

    def field(self, obj: Dict[str, Any], key: str, kind: type, where: str) -> Any:
        value = obj.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise self.error(f"has {value!r:.80} at {where}.{key}, not a {kind.__name__}")
        return value

    def number(self, value: Any, where: str, low: int = 0, high: int = _UINT64_MAX) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise self.error(f"has {value!r:.80} at {where}, not an integer in [{low}, {high}]")
        return value

    def integer(self, obj: Dict[str, Any], key: str, where: str, low: int = 0,
                high: int = _UINT64_MAX) -> int:
        return self.number(obj.get(key), f"{where}.{key}", low, high)

    def manifest(self) -> SnapshotManifest:
        top = self.obj(self.raw, "the top")
        group = top.get("data_parallel")
        dp = None
        if group is not None:
            group = self.obj(group, "data_parallel")
            dp = DataParallelGroup(
                self.integer(group, "dp_rank", "data_parallel", high=2**32 - 1),
                self.integer(group, "dp_size", "data_parallel", high=2**32 - 1),
                self.integer(group, "replicated_bytes", "data_parallel"),
                self.field(group, "members_fingerprint", str, "data_parallel"))
        entries = []
        for i, raw in enumerate(self.field(top, "entries", list, "the top")):
            where = f"entries[{i}]"
            e = self.obj(raw, where)
            shape = self.field(e, "shape", list, where)
            dims = tuple(self.number(d, f"{where}.shape", -2**63, 2**63 - 1) for d in shape)
            kind = self.field(e, "kind", str, where)
            if kind not in ("tensor", "blob"):
                raise self.error(f"has kind {kind!r:.40} at {where}")
            part = e.get("slice")
            if part is not None:
                part = self.obj(part, f"{where}.slice")
                part = EntrySlice(self.integer(part, "offset", f"{where}.slice"),
                                  self.integer(part, "length", f"{where}.slice"))
            entries.append(SnapshotEntry(
                self.field(e, "name", str, where), self.field(e, "dtype", str, where), dims,
                EntryKind.TENSOR if kind == "tensor" else EntryKind.BLOB,
                self.integer(e, "nbytes", where), self.integer(e, "length", where), part))
        return SnapshotManifest(
            self.field(top, "job_id", str, "the top"),
            self.integer(top, "rank", "the top", high=2**32 - 1),
            self.integer(top, "world_size", "the top", high=2**32 - 1),
            self.integer(top, "step", "the top", high=2**63 - 1),
            self.integer(top, "crc_block_bytes", "the top"), dp, tuple(entries))


StreamLike = Union[None, int, Any]
"""A CUDA stream: None (the default stream), a ``cudaStream_t`` as an int, or an object with a
``cuda_stream`` attribute such as ``torch.cuda.Stream``."""


def _stream_pointer(stream: StreamLike) -> Optional[int]:
    if stream is None:
        return None
    if hasattr(stream, "cuda_stream"):
        stream = stream.cuda_stream
    value = _as_int(stream, "stream")
    return value or None


def _validated(entries: Sequence[Entry]) -> List[Entry]:
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence):
        raise TypeError(
            f"entries must be a sequence of tessera.Entry, got {type(entries).__name__}")
    out = []
    names = set()
    for i, e in enumerate(entries):
        if not isinstance(e, Entry):
            raise TypeError(f"entries[{i}] must be a tessera.Entry, got {type(e).__name__}")
        if not isinstance(e.name, str):
            raise TypeError(f"entries[{i}].name must be a str, got {type(e.name).__name__}")
        where = f"entry {i} ('{e.name}')"
        if not isinstance(e.dtype, str):
            raise TypeError(f"{where}: dtype must be a str, got {type(e.dtype).__name__}")
        address = _as_int(e.address, f"{where}: address")
        nbytes = _as_int(e.nbytes, f"{where}: nbytes")
        length = _as_int(e.length, f"{where}: length")
        if isinstance(e.shape, (str, bytes)) or not isinstance(e.shape, Sequence):
            raise TypeError(f"{where}: shape must be a sequence of ints, got {e.shape!r}")
        shape = tuple(_as_int(d, f"{where}: shape dimension") for d in e.shape)
        try:
            kind = EntryKind(_as_int(e.kind, f"{where}: kind"))
        except ValueError:
            raise InvalidArgumentError(
                f"{where}: kind {e.kind!r} must be EntryKind.TENSOR (1) or EntryKind.BLOB (2)"
            ) from None
        if address < 0 or nbytes < 0 or length < 0:
            raise InvalidArgumentError(f"{where}: address, nbytes and length must be >= 0")
        if address == 0 and nbytes > 0:
            raise InvalidArgumentError(f"{where}: address is 0 (NULL) for {nbytes} bytes")
        if kind == EntryKind.BLOB and length > nbytes:
            raise InvalidArgumentError(
                f"{where}: blob length {length} exceeds its capacity {nbytes}")
        if e.name in names:
            raise InvalidArgumentError(f"{where}: the name is registered twice")
        names.add(e.name)
        out.append(Entry(e.name, address, nbytes, e.dtype, shape, kind, length))
    return out


class Client:
    """A connection to the local tesserad for one rank.

    Args:
        socket_path: the daemon's ``agent.socket_path``.
        when_busy: what `snapshot` does while the previous snapshot is still in flight: "skip"
            (return False at once; counted) or "wait" (block until it is sealed).
        use_gpu: False forces host copies even where a GPU exists.

    Raises:
        UnavailableError: no daemon answers on `socket_path`.
        LibraryNotFoundError: libtessera.so could not be loaded.
    """

    def __init__(self, socket_path: str, when_busy: str = "skip", use_gpu: bool = True) -> None:
        try:
            path = os.fsdecode(os.fspath(socket_path))
        except TypeError:
            raise TypeError(
                f"socket_path must be a str or path, got {type(socket_path).__name__}"
            ) from None
        if when_busy not in ("skip", "wait"):
            raise InvalidArgumentError(f"when_busy must be 'skip' or 'wait', got {when_busy!r}")
        self._lib = _lib.library()
        # snapshot (under "skip"), fence and update_entry return at once: called with the GIL
        # held (see _lib.fast_library); a snapshot that may wait for the previous one releases it.
        self._fast = _lib.fast_library()
        self._handle: Optional[ctypes.c_void_p] = None
        self._entries: List[Entry] = []
        self.socket_path = path
        self.when_busy = when_busy
        handle = ctypes.c_void_p()
        policy = _lib.WHEN_BUSY_WAIT if when_busy == "wait" else _lib.WHEN_BUSY_SKIP
        _lib.check(
            self._lib.tessera_connect(path.encode(), policy, 1 if use_gpu else 0,
                                      ctypes.byref(handle)),
            "tessera_connect",
        )
        self._handle = handle

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    @property
    def closed(self) -> bool:
        """Whether `close` was called."""
        return self._handle is None

    def _h(self) -> ctypes.c_void_p:
        if self._handle is None:
            raise FailedPreconditionError("the tessera client is closed")
        return self._handle

    def close(self, drop: bool = False) -> None:
        """Waits for an in-flight snapshot and unregisters. Idempotent.

        Args:
            drop: also delete this rank's snapshots in the daemon.
        """
        handle, self._handle = self._handle, None
        if handle is None:
            return
        _lib.check(self._lib.tessera_close(handle, 1 if drop else 0), "tessera_close")

    # -- registration ----------------------------------------------------------------------------

    @property
    def entries(self) -> Tuple[Entry, ...]:
        """The entries of the last successful `register` (addresses as registered)."""
        return tuple(self._entries)

    def register(self, job_id: str, rank: int, world_size: int, entries: Sequence[Entry]) -> None:
        """Registers this rank's memory with the daemon, which creates (or re-attaches) its two
        snapshot slots. May be called again, with new entries; it first waits for a snapshot in
        flight.

        Raises:
            TypeError: a value of the wrong type.
            InvalidArgumentError: a bad job id, rank, entry, dtype, shape or size.
            ResourceExhaustedError: the slots do not fit the daemon's capacity.
            FailedPreconditionError: another live process holds this rank.
        """
        if not isinstance(job_id, str):
            raise TypeError(f"job_id must be a str, got {type(job_id).__name__}")
        rank = _as_int(rank, "rank")
        world_size = _as_int(world_size, "world_size")
        if world_size < 1 or not 0 <= rank < world_size:
            raise InvalidArgumentError(
                f"rank {rank} and world_size {world_size}: need 0 <= rank < world_size"
            )
        if world_size > 0xFFFFFFFF:
            raise InvalidArgumentError(f"world_size {world_size} does not fit 32 bits")
        checked = _validated(entries)
        array = (_lib.CEntry * max(1, len(checked)))()
        keep_alive = []  # the byte strings and shape arrays must outlive the call
        for i, e in enumerate(checked):
            name = e.name.encode("utf-8")
            dtype = e.dtype.encode("utf-8")
            shape = (ctypes.c_int64 * max(1, len(e.shape)))(*e.shape)
            keep_alive.extend((name, dtype, shape))
            array[i].name = name
            array[i].dtype = dtype
            array[i].shape = ctypes.cast(shape, ctypes.POINTER(ctypes.c_int64))
            array[i].ndim = len(e.shape)
            array[i].kind = int(e.kind)
            array[i].nbytes = e.nbytes
            array[i].data = e.address or None
            array[i].length = e.length if e.kind == EntryKind.BLOB else e.nbytes
        _lib.check(
            self._lib.tessera_register(self._h(), job_id.encode("utf-8"), rank, world_size,
                                       array, len(checked)),
            "tessera_register",
        )
        self._entries = checked

    def _point_entry(self, index: int, address: int, length: int) -> None:
        """`update_entry` for a blob of the caller's own, without the argument checks (the C ABI
        still checks index and length): the per-snapshot path of `tessera.torch`."""
        _lib.check(self._fast.tessera_update_entry(self._h(), index, address, length),
                   "tessera_update_entry")
        e = self._entries[index]
        self._entries[index] = Entry(e.name, address, e.nbytes, e.dtype, e.shape, e.kind, length)

    def update_entry(self, index: int, address: Optional[int] = None,
                     length: Optional[int] = None) -> None:
        """Points entry `index` at new memory and/or sets a blob's valid length.

        Takes effect for the next `snapshot`; one already started keeps what it saw.

        Args:
            index: position of the entry in the registration.
            address: new memory of the same size, or None to keep the current one.
            length: the blob's valid bytes (<= its capacity); None keeps it. For a tensor it must
                be its nbytes.
        """
        index = _as_int(index, "index")
        if not 0 <= index < len(self._entries):
            raise InvalidArgumentError(
                f"entry index {index} must be below {len(self._entries)} (the registered entries)"
            )
        e = self._entries[index]
        new_address = e.address if address is None else _as_int(address, "address")
        if length is None:
            new_length = e.length if e.kind == EntryKind.BLOB else e.nbytes
        else:
            new_length = _as_int(length, "length")
        if new_length < 0 or new_address < 0:
            raise InvalidArgumentError("address and length must be >= 0")
        _lib.check(
            self._lib.tessera_update_entry(self._h(), index, new_address or None, new_length),
            "tessera_update_entry",
        )
        self._entries[index] = Entry(e.name, new_address, e.nbytes, e.dtype, e.shape, e.kind,
                                     new_length if e.kind == EntryKind.BLOB else 0)

    # -- snapshots -------------------------------------------------------------------------------

    def snapshot(self, step: int, stream: StreamLike = None) -> bool:
        """Starts a snapshot of `step` and returns at once.

        The copies run on the library's thread (on a GPU, on its copy stream after the point
        recorded on `stream`). Steps must increase.

        Returns:
            True when the snapshot started, False when it was skipped because the previous one
            is still in flight (when_busy="skip").
        """
        step = _as_int(step, "step")
        lib = self._fast if self.when_busy == "skip" else self._lib
        rc = _lib.check(
            lib.tessera_snapshot(self._h(), step, _stream_pointer(stream)),
            "tessera_snapshot",
        )
        return rc == _lib.SNAPSHOT_STARTED

    def fence(self, stream: StreamLike = None) -> None:
        """Orders `stream` after the copies of every started snapshot: a GPU-side wait on a GPU,
        a CPU wait for host copies. Call before overwriting registered memory."""
        _lib.check(self._fast.tessera_fence(self._h(), _stream_pointer(stream)), "tessera_fence")

    def wait(self) -> None:
        """Blocks until the last started snapshot is sealed, raising its error if it failed."""
        _lib.check(self._lib.tessera_wait(self._h()), "tessera_wait")

    def restore(self, step: int = -1) -> int:
        """Restores `step` (-1: the newest this daemon holds for the rank) into the registered
        memory and returns the step restored.

        Raises:
            NotFoundError: the daemon holds no snapshot (of that step) for this rank.
            FailedPreconditionError: the snapshot does not match the registered entries; the
                message lists the differences and nothing was written.
            DataLossError: the snapshot's checksum does not verify.
        """
        step = _as_int(step, "step")
        restored = ctypes.c_int64(-1)
        _lib.check(
            self._lib.tessera_restore(self._h(), step, ctypes.byref(restored)), "tessera_restore"
        )
        for i, e in enumerate(self._entries):
            if e.kind == EntryKind.BLOB:
                self._entries[i] = Entry(e.name, e.address, e.nbytes, e.dtype, e.shape, e.kind,
                                         self.entry_length(i))
        return restored.value

    def entry_length(self, index: int) -> int:
        """The valid bytes of entry `index`: a blob's length (as restored or updated), a tensor's
        nbytes."""
        index = _as_int(index, "index")
        if index < 0:
            raise InvalidArgumentError(f"entry index {index} must be >= 0")
        length = ctypes.c_uint64(0)
        _lib.check(
            self._lib.tessera_entry_length(self._h(), index, ctypes.byref(length)),
            "tessera_entry_length",
        )
        return length.value

    def stats(self) -> Stats:
        """The client's counters."""
        raw = _lib.CStats()
        _lib.check(self._lib.tessera_get_stats(self._h(), ctypes.byref(raw)), "tessera_get_stats")
        return Stats(
            started=raw.started,
            skipped=raw.skipped,
            busy_waits=raw.busy_waits,
            busy_wait_ns=raw.busy_wait_ns,
            sealed=raw.sealed,
            failed=raw.failed,
            bytes_copied=raw.bytes_copied,
            last_sealed_step=None if raw.last_sealed_step < 0 else raw.last_sealed_step,
            has_gpu=bool(raw.has_gpu),
            bytes_staged=raw.bytes_staged,
            plan_staged_bytes=raw.plan_staged_bytes,
            plan_device_to_host_bytes=raw.plan_device_to_host_bytes,
            plan_expected_stall_s=(None if raw.plan_expected_stall_ns < 0
                                   else raw.plan_expected_stall_ns / 1e9),
            window_s=None if raw.window_ns < 0 else raw.window_ns / 1e9,
            d2h_bytes_per_s=None if raw.d2h_bytes_per_s <= 0 else raw.d2h_bytes_per_s,
            d2d_bytes_per_s=None if raw.d2d_bytes_per_s <= 0 else raw.d2d_bytes_per_s,
            staging_buffer_bytes=raw.staging_buffer_bytes,
            staging_budget_short=raw.staging_budget_short,
            staging_alloc_failures=raw.staging_alloc_failures,
            fence_cpu_waits=raw.fence_cpu_waits,
            dp_size=raw.dp_size,
            gathered_with_nccl=bool(raw.gathered_with_nccl),
            bytes_gathered=raw.bytes_gathered,
            gather_note=raw.gather_note.decode("utf-8", errors="replace"),
        )

    def list_versions(self, job_id: str = "") -> List[Version]:
        """The snapshots the daemon holds for `job_id`, sorted by rank and step.

        Args:
            job_id: the job to list. "" lists the job of the last `register` that reached the
                daemon (accepted or not) or, before one, every job on the daemon, sorted by job
                first (the versions do not say which job they belong to).

        Returns:
            One `Version` per snapshot, sealed or still being written; [] for a job the daemon
            holds nothing of.

        Raises:
            TypeError: `job_id` is not a str.
            InvalidArgumentError: a job id the daemon does not accept (1..128 bytes of letters,
                digits, '.', '_' and '-', not starting with '.').
            UnavailableError: the daemon did not answer.
        """
        encoded = _as_c_string(job_id, "job_id")
        capacity = 16  # enough for most jobs on one daemon: one call
        while True:
            array = (_lib.CVersionInfo * capacity)()
            count = ctypes.c_size_t(0)
            rc = self._lib.tessera_list_versions(self._h(), encoded, array, capacity,
                                                 ctypes.byref(count))
            if rc != -OutOfRangeError.code or count.value <= capacity:
                break
            capacity = count.value  # more than fitted; the listing may grow again meanwhile
        _lib.check(rc, "tessera_list_versions")
        return [Version(v.rank, v.step, v.payload_bytes, v.payload_crc32c, bool(v.sealed))
                for v in array[:count.value]]

    # -- reading any rank's snapshot without registering it ---------------------------------------

    def read_manifest(self, job_id: str, rank: int, step: int = -1) -> SnapshotManifest:
        """The manifest of the sealed snapshot `step` (-1: the newest) of (`job_id`, `rank`):
        what it holds, entry by entry, for `read_range`.

        Works on any connected client, registered or not, and claims nothing: the rank's trainer
        may keep running and snapshotting. The daemon makes a shard held only by other nodes
        local first. The manifest is checked against the snapshot's sealed checksum (which reads
        no entry bytes) and for sane bounds before it is returned.

        Raises:
            TypeError, InvalidArgumentError: a bad argument.
            NotFoundError: the daemon holds no such step.
            PermissionDeniedError: the job belongs to another uid.
            FailedPreconditionError: for a caller other than root, this daemon holds no
                snapshot of the job of its uid, nor a rank of it registered under its uid.
            DataLossError: the snapshot does not verify, here nor on the daemon.
            UnimplementedError: a snapshot without block checksums (from an older agent).
        """
        encoded = _as_c_string(job_id, "job_id")
        rank = _as_bounded_int(rank, "rank", 0, 2**32 - 1)
        step = _as_bounded_int(step, "step", -1, 2**63 - 1)
        capacity = 1 << 16
        while True:
            buffer = ctypes.create_string_buffer(capacity)
            needed = ctypes.c_size_t(0)
            rc = self._lib.tessera_read_manifest(self._h(), encoded, rank, step, buffer, capacity,
                                                 ctypes.byref(needed))
            if rc != -OutOfRangeError.code or needed.value <= capacity:
                break
            if needed.value > _MAX_MANIFEST_JSON_BYTES:
                raise InternalError(
                    f"job '{job_id}' rank {rank}: the manifest takes {needed.value} bytes as "
                    f"JSON, more than the {_MAX_MANIFEST_JSON_BYTES} read")
            capacity = needed.value  # a newer step (step -1) may need more again
        _lib.check(rc, "tessera_read_manifest")
        try:
            text = buffer.value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _ManifestJson.error(f"is not UTF-8 ({e})") from None
        return _ManifestJson(text).manifest()

    def read_range(self, job_id: str, rank: int, step: int, name: str, offset: int = 0,
                   length: Optional[int] = None, out: Any = None) -> Union[bytearray, memoryview]:
        """Bytes [offset, offset + length) of entry `name`'s stored bytes in the sealed snapshot
        `step` of (`job_id`, `rank`), verified.

        Claims nothing (see `read_manifest`). The stored bytes are the entry's
        `SnapshotEntry.length` bytes: of a tensor that a DP-sharded snapshot stores as a
        `SnapshotEntry.slice`, that slice only (offset 0 is the slice's first byte). The bytes are
        copied, then every CRC32C block they overlap is checked on the copy, so a snapshot that
        its trainer overwrites meanwhile raises instead of returning other bytes; the daemon is
        then asked once to check the snapshot itself and the range read again. The opened
        snapshot is kept for the next reads of the same step.

        Args:
            job_id, rank: whose snapshot.
            step: the step (>= 0), e.g. `SnapshotManifest.step`.
            name: the entry.
            offset: the first byte, within the stored bytes.
            length: how many bytes; None: to the end of the stored bytes (which costs a
                `read_manifest` first).
            out: a writable, contiguous buffer of at least `length` bytes to read into; None: a
                new bytearray.

        Returns:
            The new bytearray, or a memoryview of the first `length` bytes of `out`.

        Raises:
            TypeError: a bad argument type, or an `out` that is not a writable buffer.
            InvalidArgumentError: a negative value, a range outside the stored bytes, or an `out`
                too small or not contiguous.
            NotFoundError: no such entry (the message names some), or no such step (any more).
            DataLossError: the bytes do not verify, here nor on the daemon (names job, rank,
                step, entry and block); `out` then holds unverified bytes.
            PermissionDeniedError, FailedPreconditionError: as for `read_manifest`.
        """
        encoded_job = _as_c_string(job_id, "job_id")
        rank = _as_bounded_int(rank, "rank", 0, 2**32 - 1)
        step = _as_bounded_int(step, "step", 0, 2**63 - 1)
        encoded_name = _as_c_string(name, "name")
        offset = _as_bounded_int(offset, "offset", 0, _UINT64_MAX)
        if length is None:
            known = {e.name: e for e in self.read_manifest(job_id, rank, step).entries}.get(name)
            # An unknown entry is left to the library, which names some that exist.
            length = 0 if known is None else known.length - offset
            if length < 0:
                raise InvalidArgumentError(
                    f"job '{job_id}' rank {rank} step {step} entry '{name}' holds "
                    f"{known.length} valid bytes: offset {offset} is past them")
        length = _as_bounded_int(length, "length", 0, _UINT64_MAX)
        if out is None:
            try:
                result: Union[bytearray, memoryview] = bytearray(length)
            except (OverflowError, MemoryError):
                # Only a range the entry cannot hold is the caller's mistake; say so.
                known = self.read_manifest(job_id, rank, step).entry(name)
                if offset > known.length or length > known.length - offset:
                    raise InvalidArgumentError(
                        f"job '{job_id}' rank {rank} step {step} entry '{name}' holds "
                        f"{known.length} valid bytes: the range [{offset}, +{length}) must lie "
                        f"within [0, {known.length})") from None
                raise
            view = memoryview(result)
        else:
            try:
                view = memoryview(out)
            except TypeError:
                raise TypeError(f"out must be a writable buffer (bytearray, mmap, array, numpy "
                                f"array, ...), got {type(out).__name__}") from None
            if view.readonly:
                raise TypeError(f"out ({type(out).__name__}) is read-only")
            if not view.c_contiguous:
                raise InvalidArgumentError("out must be C-contiguous")
            view = view.cast("B") if (view.format, view.ndim) != ("B", 1) else view
            if view.nbytes < length:
                raise InvalidArgumentError(f"out holds {view.nbytes} bytes, {length} are read")
            view = view[:length]
            result = view
        address = (ctypes.addressof((ctypes.c_char * length).from_buffer(view)) if length
                   else None)
        _lib.check(self._lib.tessera_read_range(self._h(), encoded_job, rank, step, encoded_name,
                                                offset, length, address),
                   "tessera_read_range")
        return result

    def set_data_parallel(self, members: Sequence[int], replicated: Sequence[bool]) -> None:
        """Makes the snapshots DP-sharded from the next `register` on.

        Args:
            members: the job ranks of this rank's data-parallel group, in DP-rank order (this
                rank among them). Empty turns sharding off.
            replicated: one flag per entry about to be registered: True for a tensor every member
                holds identically (parameters, optimizer state under plain data parallelism).

        Each member then copies a disjoint, balanced slice of the replicated bytes; `restore`,
        called by every member together, restores its own slice and gathers the others' (over
        NCCL for GPU tensors, through the daemon otherwise).

        Raises:
            InvalidArgumentError: a negative rank (the group itself: a rank listed twice, a rank
                outside the world or a group without this rank, is checked by
                `register`).
        """
        members = [_as_int(m, "members[]") for m in members]
        if any(m < 0 or m >= 2**32 for m in members):
            raise InvalidArgumentError(f"data-parallel members must be job ranks, got {members}")
        flags = [bool(r) for r in replicated]
        c_members = (ctypes.c_uint32 * max(1, len(members)))(*members)
        c_flags = (ctypes.c_uint8 * max(1, len(flags)))(*[1 if f else 0 for f in flags])
        _lib.check(self._lib.tessera_set_data_parallel(self._h(), c_members, len(members),
                                                       c_flags, len(flags)),
                   "tessera_set_data_parallel")

    def set_staging(self, mode: str = "adaptive", budget_bytes: int = 0,
                    budget_free_fraction: float = 0.5) -> None:
        """GPU staging of the snapshots started from now on.

        Args:
            mode: "off" (the fence before the optimizer step waits for the whole device-to-host
                copy), "full" (copy every byte the budget allows device-to-device first, so the
                fence waits only for that) or "adaptive" (the default: stage the fewest bytes that
                keep the fence from stalling, from the measured window and copy rate).
            budget_bytes: GPU memory the staging buffer may take; 0: `budget_free_fraction` of
                the device's free memory.
            budget_free_fraction: in (0, 1].

        Raises:
            InvalidArgumentError: a bad mode or fraction.
        """
        if mode not in ("off", "full", "adaptive"):
            raise InvalidArgumentError(
                f"staging mode must be 'off', 'full' or 'adaptive', got {mode!r}")
        budget_bytes = _as_int(budget_bytes, "budget_bytes")
        if budget_bytes < 0:
            raise InvalidArgumentError(f"budget_bytes must be >= 0, got {budget_bytes}")
        if not isinstance(budget_free_fraction, (int, float)) or isinstance(budget_free_fraction,
                                                                           bool):
            raise TypeError("budget_free_fraction must be a float, got "
                            f"{type(budget_free_fraction).__name__}")
        _lib.check(self._lib.tessera_set_staging(self._h(), mode.encode(), budget_bytes,
                                                 float(budget_free_fraction)),
                   "tessera_set_staging")


# -- reading a rank's snapshot without its trainer ------------------------------------------------

_CLAIM_HELD = "which is still running"
"""What the daemon says when another live process has registered the rank (Register)."""


def _register_when_free(client: Client, job_id: str, rank: int, world_size: int,
                        entries: Sequence[Entry], claim_timeout_s: float) -> None:
    """`Client.register`, retried for up to `claim_timeout_s` while another live process holds
    the rank (the daemon lets one process register a rank at a time)."""
    deadline = time.monotonic() + claim_timeout_s
    pause_s = 0.005
    while True:
        try:
            client.register(job_id, rank, world_size, entries)
            return
        except FailedPreconditionError as e:
            if _CLAIM_HELD not in str(e) or time.monotonic() >= deadline:
                if _CLAIM_HELD in str(e):
                    raise FailedPreconditionError(
                        f"{e}; still held after waiting {claim_timeout_s:g} s for it") from e
                raise
        time.sleep(pause_s)
        pause_s = min(pause_s * 2, 0.1)


class SnapshotCopy:
    """The entries of one rank's snapshot, copied out of the daemon into memory of this process
    (`read_snapshot`).

    Attributes:
        job_id, rank, step: which snapshot it is.
    """

    def __init__(self, job_id: str, rank: int, step: int, buffer: mmap.mmap,
                 views: Dict[str, memoryview]) -> None:
        self.job_id = job_id
        self.rank = rank
        self.step = step
        self._buffer = buffer
        self._views = views

    @property
    def names(self) -> Tuple[str, ...]:
        """The entries' names, in registration order."""
        return tuple(self._views)

    def entry(self, name: str) -> memoryview:
        """The valid bytes of entry `name` (a tensor's nbytes, a blob's length), writable, valid
        while this object lives.

        Raises:
            NotFoundError: no entry of that name.
        """
        try:
            return self._views[name]
        except KeyError:
            shown = ", ".join(repr(n) for n in list(self._views)[:8])
            raise NotFoundError(
                f"job '{self.job_id}' rank {self.rank} step {self.step} has no entry {name!r} "
                f"(it has {len(self._views)}: {shown}{', ...' if len(self._views) > 8 else ''})"
            ) from None


_COPY_ALIGNMENT = 64


def read_snapshot(socket_path: str, job_id: str, rank: int, world_size: int, step: int,
                  layout: Sequence[Entry], *, claim_timeout_s: float = 60.0,
                  max_bytes: Optional[int] = None) -> SnapshotCopy:
    """Copies step `step` of (`job_id`, `rank`) out of the daemon into memory of this process,
    by entry name, without the trainer that took it.

    `Client.read_manifest` and `Client.read_range` read a snapshot without any of what follows
    (no layout needed, nothing claimed, only the bytes asked for). A restore needs a
    registration that matches the snapshot's manifest exactly, so this registers the rank
    itself, with `layout` (the snapshot's entries in registration order: names, dtypes, shapes,
    kinds, sizes; the addresses are ignored) over buffers it allocates, restores `step` (the
    daemon copies the shard from the node that holds it, or rebuilds it from fragments, as for
    any restore), and unregisters again, keeping the snapshots. What that costs, and what it
    needs:

    * the rank is claimed while it is read: a live process that has it registered (its trainer)
      blocks the read, which waits up to `claim_timeout_s` for it to unregister;
    * the whole shard is copied, whatever part of it the caller needs;
    * a rank whose slots are not on this daemon gets two slots of its layout here (as any
      registration does), which stay, empty, until the daemon reclaims them;
    * a `layout` other than the snapshot's restores nothing (FailedPreconditionError listing the
      differences), but this daemon then keeps the snapshot apart and makes new slots for the
      next registration of the rank.

    Args:
        socket_path: the daemon's agent socket.
        job_id, rank, world_size: the snapshot's job, rank and the job's world size.
        step: the step to read (>= 0).
        layout: the snapshot's entries; see above.
        claim_timeout_s: how long to wait while another live process holds the rank.
        max_bytes: refuse a layout of more bytes than this before allocating (a layout read from
            a snapshot is not trusted); None: this machine's physical memory.

    Returns:
        The entries' valid bytes, by name.

    Raises:
        InvalidArgumentError: a bad step, a layout entry with an address-independent problem (a
            duplicate name, a tensor whose size does not match its shape, ...), or more bytes
            than `max_bytes`.
        NotFoundError: the daemon holds no such step for the rank.
        FailedPreconditionError: `layout` does not match the snapshot; or the rank stayed held
            by another process for `claim_timeout_s`.
        DataLossError: the snapshot's checksums do not verify, here or on the nodes asked.
    """
    rank = _as_int(rank, "rank")
    world_size = _as_int(world_size, "world_size")
    step = _as_int(step, "step")
    if step < 0:
        raise InvalidArgumentError(f"step must be >= 0 to read a snapshot, got {step}")
    if isinstance(layout, (str, bytes)) or not isinstance(layout, Sequence) or not layout:
        raise InvalidArgumentError(
            f"layout must be a non-empty sequence of tessera.Entry, got {layout!r:.80}")
    offsets: List[int] = []
    total = 0
    for i, e in enumerate(layout):
        if not isinstance(e, Entry):
            raise TypeError(f"layout[{i}] must be a tessera.Entry, got {type(e).__name__}")
        nbytes = _as_int(e.nbytes, f"layout[{i}] ('{e.name}'): nbytes")
        if nbytes < 0:
            raise InvalidArgumentError(f"layout[{i}] ('{e.name}'): nbytes {nbytes} is negative")
        if e.kind == EntryKind.TENSOR:
            want = Entry.tensor(e.name, 0, e.dtype, e.shape).nbytes
            if want != nbytes:
                raise InvalidArgumentError(
                    f"layout[{i}] ('{e.name}'): {e.dtype}{list(e.shape)} is {want} bytes, not "
                    f"{nbytes}")
        offsets.append(total)
        total += (nbytes + _COPY_ALIGNMENT - 1) // _COPY_ALIGNMENT * _COPY_ALIGNMENT
    if max_bytes is None:
        max_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if total > max_bytes:
        raise InvalidArgumentError(
            f"job '{job_id}' rank {rank}: the layout's {len(layout)} entries take {total} bytes, "
            f"more than the {max_bytes} bytes allowed (max_bytes)")
    # Anonymous memory: pages are zeroed as the restore first writes them, not all up front.
    buffer = mmap.mmap(-1, max(total, mmap.PAGESIZE))
    base = ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))
    entries = [Entry(e.name, base + offset if e.nbytes else 0, e.nbytes, e.dtype,
                     tuple(e.shape), e.kind, 0)
               for e, offset in zip(layout, offsets)]
    client = Client(socket_path, when_busy="wait", use_gpu=False)
    try:
        _register_when_free(client, job_id, rank, world_size, entries, claim_timeout_s)
        restored = client.restore(step)
        whole = memoryview(buffer)
        views = {}
        for i, (e, offset) in enumerate(zip(entries, offsets)):
            length = client.entry_length(i) if e.kind == EntryKind.BLOB else e.nbytes
            if length > e.nbytes:  # the library bounds it; checked again, it sizes a view
                raise InvalidArgumentError(
                    f"job '{job_id}' rank {rank} step {restored}: entry '{e.name}' reports "
                    f"{length} valid bytes of a capacity of {e.nbytes}")
            views[e.name] = whole[offset:offset + length]
    finally:
        client.close()
    return SnapshotCopy(job_id, rank, restored, buffer, views)
