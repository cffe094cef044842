"""Snapshots the `tessera.torch.Snapshotter` took, read as DCP checkpoints (`tessera.dcp`).

A Snapshotter stores each rank's tensors as entries named ``model.<state_dict key>`` and
``optim.<param index>.<key>`` (a DTensor's local shard in its place), its optimizer's
hyperparameters and non-tensor state in the pickled blob ``blob.meta``, and, once per
registration, a JSON blob ``blob.layout`` that names each entry's fully qualified name (FQN) and
places each DTensor shard in its global tensor (`tessera.torch.Snapshotter.layout`). That is what
DCP's planner needs to load the snapshot into any layout, so `SnapshotCheckpoint` presents it as
the checkpoint ``torch.distributed.checkpoint.state_dict.get_state_dict`` would have saved under
``{"model": ..., "optim": ...}`` (prefixes configurable):

* ``model.<fqn>``: each model tensor, whole or as the chunks the saving ranks' DTensor shards
  form; a plain tensor that several ranks hold (data parallelism, a replicated placement) is
  read from one of them, as DCP deduplicates replicas when it saves;
* ``optim.state.<param fqn>.<key>``: each optimizer state tensor, likewise, and each non-tensor
  state value as bytes;
* ``optim.param_groups``: the param groups with their parameters' FQNs, as bytes.

The model's non-tensor state (``model.state_dict()`` values that are not tensors: each module's
``get_extra_state``) is served as ``model.<fqn>`` items too, as DCP saves a non-tensor value: its
``torch.save`` bytes, rank 0's (DCP saves non-tensor values from its coordinator). A Snapshotter
pickles those values together, as a pickle nested in its meta blob: their keys are read without
loading any class the pickle names (each stands in as an opaque object), and a value of plain
values only is served as is; a value that names a class (any object but dicts, lists, tuples,
sets, strings, bytes, numbers and None) is only unpickled with ``allow_pickle=True``, which runs
what it names, and its read is refused with a clear error otherwise.

The bytes come through the reader calls of the C ABI (`tessera.client.Client.read_manifest`
and `read_range`), as `CheckpointReader` reads them: the daemon serves a rank's shard from its
own memory, copies it from the node that holds it or rebuilds it from fragments; the reader
checks every block it reads against the snapshot's checksums after copying it out, reads only
the ranges the reads need, does not register or claim the rank, and so reads while the job's
trainers run. A data-parallel snapshot (``dp_group``), whose members each store a slice of the
replicated tensors, is read from every member's slice.

Everything read is untrusted: the layout is JSON, every name, shape and offset in it is checked
against the manifest, and the meta blob is unpickled allowing no class at all (its top level is
plain values by construction; the model's extra state is the nested pickle above).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import pickle
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

from .client import DTYPE_BYTES, EntryKind
from .dcp import (BytesItem, CheckpointIndex, CheckpointReader, RankIndex, Shape, TensorChunk,
                  _Fields, _message, _Piece, _shard_limit, _volume, _MAX_DIM, _MAX_DIMS,
                  _MAX_FQN_BYTES)
from .errors import DataLossError, FailedPreconditionError, InvalidArgumentError, NotFoundError

_log = logging.getLogger("tessera.dcp")

LAYOUT_ENTRY = "blob.layout"
META_ENTRY = "blob.meta"
LAYOUT_FORMAT = "tessera.snapshot-layout/1"
_MAX_BLOB_BYTES = 1 << 30
_MAX_ITEMS = 1_000_000


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain values only (dicts, lists, tuples, sets, strings, bytes, numbers, None):
    any class or function a pickle names is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it names {module}.{name}, and only plain values are read")


def _plain_loads(data: bytes, what: str) -> Any:
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except Exception as e:
        raise DataLossError(f"{what} does not unpickle as plain values: {e}") from e


@dataclass(frozen=True)
class _Layout:
    """One rank's ``blob.layout``, checked."""

    fqns: Dict[str, str]
    param_fqns: Tuple[str, ...]
    group_sizes: Tuple[int, ...]
    aliases: Dict[str, str]
    dtensors: Dict[str, Tuple[Shape, Shape, Shape, str]]  # global shape, offsets, lengths, dtype

    @classmethod
    def parse(cls, data: bytes, what: str) -> "_Layout":
        try:
            value = json.loads(bytes(data).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise DataLossError(f"{what}: the layout blob is not JSON: {e}") from e
        fields = _Fields(what, value)
        if value.get("format") != LAYOUT_FORMAT:
            raise DataLossError(f"{what}: layout format {value.get('format')!r:.40}, not "
                                f"{LAYOUT_FORMAT!r}")
        fqns = cls._names(value.get("fqns"), f"{what}: 'fqns'")
        param_fqns = fields.items("param_fqns", _MAX_ITEMS)
        for f in param_fqns:
            if not isinstance(f, str) or not 0 < len(f) <= _MAX_FQN_BYTES:
                raise DataLossError(f"{what}: a parameter FQN is {f!r:.60}")
        sizes = fields.items("group_sizes", _MAX_ITEMS)
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in sizes) or \
                sum(sizes) != len(param_fqns):
            raise DataLossError(f"{what}: group sizes {sizes[:8]} do not add up to its "
                                f"{len(param_fqns)} parameters")
        aliases = cls._names(value.get("aliases"), f"{what}: 'aliases'")
        dtensors: Dict[str, Tuple[Shape, Shape, Shape, str]] = {}
        raw = value.get("dtensors")
        if not isinstance(raw, dict) or len(raw) > _MAX_ITEMS:
            raise DataLossError(f"{what}: 'dtensors' must be an object")
        for name, place in raw.items():
            f = _Fields(f"{what}: DTensor {name!r:.80}", place)
            shape, offsets, lengths = f.dims("global_shape"), f.dims("offsets"), f.dims("lengths")
            if not len(shape) == len(offsets) == len(lengths) or any(
                    o + n > d for o, n, d in zip(offsets, lengths, shape)):
                raise DataLossError(f"{what}: DTensor {name!r:.80}: its chunk at {list(offsets)} "
                                    f"of {list(lengths)} is not inside {list(shape)}")
            dtensors[name] = (shape, offsets, lengths, f.string("dtype", 32))
        return cls(fqns, tuple(param_fqns), tuple(sizes), aliases, dtensors)

    @staticmethod
    def _names(value: Any, what: str) -> Dict[str, str]:
        if not isinstance(value, dict) or len(value) > _MAX_ITEMS or not all(
                isinstance(k, str) and isinstance(v, str) and 0 < len(v) <= _MAX_FQN_BYTES
                for k, v in value.items()):
            raise DataLossError(f"{what} must be an object of names")
        return value


class SnapshotCheckpoint(CheckpointReader):
    """A step of a Snapshotter job, as a DCP checkpoint: its merged index (`index`, built once
    from every rank's manifest and layout) and reads of chunk ranges (`serve`, `read_region`,
    `read_tensor`, `read_bytes`), as `CheckpointReader` offers for checkpoints a
    `tessera.dcp.Writer` stored, and reads them.

    Args:
        job_id: the Snapshotter's job.
        step: the step; None: the newest step every rank of the job has sealed on this daemon
            (on a cluster, where other nodes hold some ranks, pass it).
        socket_path: the daemon's agent socket; default ``TESSERA_SOCKET``, else the default.
        model_prefix, optim_prefix: the FQN prefixes of the model's and the optimizer's state
            (``"model."`` and ``"optim."``: the state dict ``{"model": model_sd, "optim":
            optim_sd}``; ``""`` for a model state dict at the top level).
        max_shard_bytes, read_threads: as `CheckpointReader`: the most bytes one read holds
            (chunks are read in pieces of at most this, default `READ_PIECE_BYTES`), and the
            reads run at once.
        allow_pickle: unpickle the model's extra state with ``pickle`` when it names classes,
            which runs what the snapshot names: only for snapshots you trust (the trainer's own
            restore trusts them so). False: such a value is not read (its read fails with
            FailedPreconditionError); plain values are served either way.
        source: where manifests and bytes come from (tests); default a `DaemonSource`.
        max_chunk_bytes: deprecated name of `max_shard_bytes`; warns once.

    Raises (from `index`):
        NotFoundError: no such job or step.
        DataLossError: a rank's manifest or layout is damaged, or the ranks disagree (a tensor's
            shape or dtype, chunks that overlap or leave part of a tensor uncovered).
    """

    def __init__(self, job_id: str, step: Optional[int] = None, *,
                 socket_path: Optional[str] = None, model_prefix: str = "model.",
                 optim_prefix: str = "optim.", max_shard_bytes: Optional[int] = None,
                 read_threads: Optional[int] = None, allow_pickle: bool = False,
                 source: Optional[Any] = None, max_chunk_bytes: Optional[int] = None) -> None:
        for name, prefix in (("model_prefix", model_prefix), ("optim_prefix", optim_prefix)):
            if not isinstance(prefix, str) or len(prefix) > 1024:
                raise InvalidArgumentError(f"{name} must be a string (e.g. 'model.'), got "
                                           f"{prefix!r:.60}")
        super().__init__(job_id, step, socket_path=socket_path,
                         max_shard_bytes=_shard_limit(type(self).__name__, max_shard_bytes,
                                                      max_chunk_bytes),
                         read_threads=read_threads, source=source)
        self.model_prefix = model_prefix
        self.optim_prefix = optim_prefix
        self.allow_pickle = bool(allow_pickle)
        self._chunk_pieces: Dict[Tuple[str, Shape], Tuple[_Piece, ...]] = {}
        # Non-tensor items by FQN: their bytes, or why they are not read (a str).
        self._bytes: Dict[str, Union[bytes, str]] = {}

    # -- the index -------------------------------------------------------------------------------

    def _what(self, step: int, rank: Optional[int] = None) -> str:
        return (f"snapshot of job '{self.job_id}'" + (f" rank {rank}" if rank is not None else "")
                + f" step {step}")

    def _read_blob(self, rank: int, step: int, manifest: Any, name: str) -> bytes:
        entry = next((e for e in manifest.entries if e.name == name), None)
        if entry is None:
            raise DataLossError(
                f"{self._what(step, rank)} has no entry {name!r}: it was not taken by a "
                "tessera.torch.Snapshotter of this version (tessera.dcp.Reader reads checkpoints "
                "a tessera.dcp.Writer stored)")
        if entry.length > _MAX_BLOB_BYTES:
            raise DataLossError(f"{self._what(step, rank)}: {name} holds {entry.length} bytes")
        out = bytearray(entry.length)
        self._read(self.job_id, rank, step, name, 0, entry.length, memoryview(out))
        return bytes(out)

    def _pick_step(self) -> Tuple[int, Any]:
        """The step to read and rank 0's manifest of it."""
        listed: Dict[int, set] = {}
        for rank, step in self._listed(self.job_id):
            listed.setdefault(step, set()).add(rank)
        if self.step is not None:
            return self.step, self._manifest(self.job_id, 0, self.step)
        tried = []
        for step in sorted(listed, reverse=True):
            if 0 not in listed[step]:
                continue
            first = self._manifest(self.job_id, 0, step)
            if listed[step] >= set(range(first.world_size)):
                return step, first
            tried.append(f"step {step}: ranks {sorted(listed[step])[:8]} of {first.world_size}")
        raise NotFoundError(
            f"this daemon holds no step of job '{self.job_id}' that every rank sealed"
            f"{': ' + '; '.join(tried) if tried else ' (it holds none at all)'}; on a cluster a "
            "job's ranks may be held by other nodes: pass step= explicitly")

    def _build(self) -> CheckpointIndex:
        step, first = self._pick_step()
        world = first.world_size
        meta_of: Dict[int, Any] = {}
        # (fqn, offsets) -> (sizes, global size, dtype) and, per group of ranks that together
        # hold the chunk's bytes (a DP group, else one rank), its pieces.
        shapes: Dict[Tuple[str, Shape], Tuple[Shape, Shape, str]] = {}
        pieces: Dict[Tuple[str, Shape], Dict[Any, List[_Piece]]] = {}
        layouts: List[_Layout] = []
        for rank in range(world):
            manifest = first if rank == 0 else self._manifest(self.job_id, rank, step)
            self._manifests[rank] = manifest
            what = self._what(step, rank)
            if (manifest.world_size, manifest.step) != (world, step):
                raise DataLossError(f"{what}: its manifest is of step {manifest.step} in a world "
                                    f"of {manifest.world_size}, rank 0's of {world}")
            layout = _Layout.parse(self._read_blob(rank, step, manifest, LAYOUT_ENTRY), what)
            layouts.append(layout)
            meta_of[rank] = _plain_loads(self._read_blob(rank, step, manifest, META_ENTRY),
                                         f"{what}: the meta blob")
            dp = manifest.data_parallel
            group = ("dp", dp.members_fingerprint) if dp is not None else ("rank", rank)
            placed: Dict[str, Tuple[Tuple[str, Shape], _Piece]] = {}
            for e in manifest.entries:
                if e.kind != EntryKind.TENSOR:
                    continue
                fqn = self._fqn(e.name, layout, what)
                if fqn is None:
                    continue
                key, piece = self._place(e, rank, layout, what, fqn, shapes)
                pieces.setdefault(key, {}).setdefault(group, []).append(piece)
                placed[e.name] = (key, piece)
            for alias, target in layout.aliases.items():
                fqn = self._fqn(alias, layout, what)
                if fqn is None or target not in placed:
                    raise DataLossError(f"{what}: tied entry {alias!r:.80} names {target!r:.80}, "
                                        "which the snapshot does not hold")
                (t_fqn, offsets), piece = placed[target]
                key = (fqn, offsets)
                shapes.setdefault(key, shapes[(t_fqn, offsets)])
                pieces.setdefault(key, {}).setdefault(group, []).append(piece)
        chunks_by_rank: Dict[int, List[TensorChunk]] = {r: [] for r in range(world)}
        for key, by_group in pieces.items():
            fqn, offsets = key
            sizes, size, dtype = shapes[key]
            itemsize = DTYPE_BYTES[dtype]
            nbytes = _volume(sizes) * itemsize
            chosen = self._complete(by_group, nbytes)
            if chosen is None:
                raise DataLossError(
                    f"{self._what(step)}: the bytes of {fqn!r:.80} at {list(offsets)} are not "
                    f"all held: no rank (or data-parallel group) stores all {nbytes} of them")
            self._chunk_pieces[key] = chosen
            chunks_by_rank[chosen[0].rank].append(TensorChunk(
                fqn, offsets, sizes, size, dtype, itemsize, chosen[0].rank, chosen[0].entry))
        self._bytes = self._byte_items(layouts[0], meta_of[0], self._what(step, 0))
        byte_items = tuple(BytesItem(fqn, 0, "", len(data) if isinstance(data, bytes) else 0)
                           for fqn, data in self._bytes.items())
        ranks = [RankIndex(self.job_id, step, r, world, (), tuple(chunks_by_rank[r]),
                           byte_items if r == 0 else ()) for r in range(world)]
        index = CheckpointIndex(ranks)
        self.step = step
        _log.info("snapshot of job '%s' step %d as a DCP checkpoint: %d ranks, %d tensors in %d "
                  "chunks, %d other items", self.job_id, step, world, len(index.tensors),
                  sum(len(t.chunks) for t in index.tensors.values()), len(index.byte_items))
        return index

    def _fqn(self, entry: str, layout: _Layout, what: str) -> Optional[str]:
        """The DCP FQN of Snapshotter entry `entry` (None: not model or optimizer state)."""
        if entry.startswith("model."):
            return self.model_prefix + layout.fqns.get(entry, entry[len("model."):])
        if entry.startswith("optim."):
            index, _, key = entry[len("optim."):].partition(".")
            if not index.isdigit() or not key or int(index) >= len(layout.param_fqns):
                raise DataLossError(f"{what}: optimizer entry {entry!r:.80} names no parameter "
                                    f"of the {len(layout.param_fqns)} its layout lists")
            return f"{self.optim_prefix}state.{layout.param_fqns[int(index)]}.{key}"
        return None

    @staticmethod
    def _place(e: Any, rank: int, layout: _Layout, what: str, fqn: str,
               shapes: Dict[Tuple[str, Shape], Tuple[Shape, Shape, str]]
               ) -> Tuple[Tuple[str, Shape], _Piece]:
        """The chunk entry `e` of `rank` is (or is a slice of), and its piece."""
        shape = tuple(int(d) for d in e.shape)
        if e.dtype not in DTYPE_BYTES or e.dtype == "bytes":
            raise DataLossError(f"{what}: tensor entry {e.name!r:.80} has dtype {e.dtype!r:.32}")
        if len(shape) > _MAX_DIMS or any(not 0 <= d <= _MAX_DIM for d in shape):
            raise DataLossError(f"{what}: tensor entry {e.name!r:.80} has shape {list(shape)[:8]}")
        nbytes = _volume(shape) * DTYPE_BYTES[e.dtype]
        place = layout.dtensors.get(e.name)
        if place is None:
            size, offsets = shape, (0,) * len(shape)
        else:
            size, offsets, lengths, dtype = place
            if lengths != shape or dtype != e.dtype:
                raise DataLossError(
                    f"{what}: DTensor {e.name!r:.80} is {e.dtype}{list(shape)} in the manifest "
                    f"but placed as {dtype}{list(lengths)}")
        key = (fqn, offsets)
        known = shapes.setdefault(key, (shape, size, e.dtype))
        if known != (shape, size, e.dtype):
            raise DataLossError(
                f"{what}: {fqn!r:.80} at {list(offsets)} is {e.dtype}{list(shape)} of "
                f"{list(size)} here but {known[2]}{list(known[0])} of {list(known[1])} on "
                "another rank")
        at, length = 0, nbytes
        if e.slice is not None:
            at, length = int(e.slice.offset), int(e.slice.length)
            if at + length > nbytes:
                raise DataLossError(f"{what}: slice [{at}, +{length}) of {e.name!r:.80} is "
                                    f"outside its {nbytes} bytes")
        return key, _Piece(rank, e.name, at, length)

    @staticmethod
    def _complete(by_group: Dict[Any, List[_Piece]], nbytes: int) -> Optional[Tuple[_Piece, ...]]:
        """The pieces of the first group (lowest rank first) that hold every byte exactly
        once."""
        for _, group in sorted(by_group.items(), key=lambda g: min(p.rank for p in g[1])):
            runs = sorted((p for p in group if p.length > 0), key=lambda p: p.at)
            at = 0
            for p in runs:
                if p.at != at:
                    break
                at += p.length
            else:
                if at == nbytes:
                    return tuple(runs) or tuple(group[:1])
        return None

    def _byte_items(self, layout: _Layout, meta: Any, what: str) -> Dict[str, Union[bytes, str]]:
        """The model's extra state, the optimizer's param groups and its non-tensor state,
        serialised as DCP loads bytes (``torch.save``); for an extra state value that names a
        class, without `allow_pickle`, why it is not read."""
        import torch

        f = _Fields(f"{what}: the meta blob", meta)
        groups = f.items("param_groups", _MAX_ITEMS)
        if len(groups) != len(layout.group_sizes):
            raise DataLossError(f"{what}: {len(groups)} param groups in the meta blob, "
                                f"{len(layout.group_sizes)} in the layout")
        items: Dict[str, Union[bytes, str]] = {}

        def save(fqn: str, value: Any) -> None:
            buffer = io.BytesIO()
            torch.save(value, buffer)
            items[fqn] = buffer.getvalue()

        for fqn, value in self._extra_state(layout, meta.get("model_other"), what).items():
            if isinstance(value, _Refused):
                items[fqn] = value.reason
            else:
                save(fqn, value)
        if not layout.param_fqns:
            return items
        fqns = iter(layout.param_fqns)
        save(self.optim_prefix + "param_groups",
             [dict(g, params=list(itertools.islice(fqns, n)))
              for g, n in zip(groups, layout.group_sizes)])
        state = meta.get("optimizer_state")
        if not isinstance(state, dict):
            raise DataLossError(f"{what}: the meta blob's optimizer_state is not a dict")
        for key, value in state.items():
            if (not isinstance(key, tuple) or len(key) != 2 or not isinstance(key[0], int)
                    or not 0 <= key[0] < len(layout.param_fqns)):
                raise DataLossError(f"{what}: optimizer state key {key!r:.60}")
            save(f"{self.optim_prefix}state.{layout.param_fqns[key[0]]}.{key[1]}", value)
        return items

    def _extra_state(self, layout: _Layout, pickled: Any, what: str) -> Dict[str, Any]:
        """The model's non-tensor state_dict values by DCP FQN (`_Refused` for one that names a
        class, without `allow_pickle`), from the meta blob's ``model_other``: a nested pickle
        of them (a dict of plain values in snapshots of meta format 1)."""
        if not pickled:
            return {}
        snapshot = what
        what = f"{snapshot}: the model's extra state (the meta blob's model_other)"
        if isinstance(pickled, dict):
            outline = pickled
        elif isinstance(pickled, bytes):
            outline = _outline_loads(pickled, what)
        else:
            raise DataLossError(f"{what} is a {type(pickled).__name__}, not a pickle")
        if not isinstance(outline, dict) or not all(isinstance(k, str) for k in outline):
            raise DataLossError(f"{what} is not a dict of state_dict keys")
        from .torch import _clean_fqn

        unwrap_ddp = _unwraps_ddp(layout)
        trusted: Optional[Dict[str, Any]] = None
        values: Dict[str, Any] = {}
        for key, value in outline.items():
            fqn = self.model_prefix + _clean_fqn(key, unwrap_ddp)
            named = _class_named(value)
            if named is None:
                values[fqn] = value
            elif not self.allow_pickle:
                values[fqn] = _Refused(
                    f"{fqn!r:.120} is the model's extra state (a non-tensor state_dict value) in "
                    f"the {snapshot}, and it names {named}: reading it means "
                    "unpickling it with pickle, which runs what a pickle names. Pass "
                    "allow_pickle=True to SnapshotReader (or SnapshotCheckpoint) for a snapshot "
                    f"you trust, as the trainer's own restore trusts it, or leave {fqn!r:.120} "
                    "out of the state dict you load")
            else:
                if trusted is None:
                    assert isinstance(pickled, bytes)
                    try:
                        trusted = pickle.loads(pickled)
                    except Exception as e:
                        raise DataLossError(f"{what} does not unpickle: {e!r:.200}") from e
                    if not isinstance(trusted, dict) or set(trusted) != set(outline):
                        raise DataLossError(f"{what} unpickles to other keys than it lists")
                values[fqn] = trusted[key]
        return values

    # -- where the bytes are ---------------------------------------------------------------------

    def _pieces(self, where: Union[TensorChunk, BytesItem]) -> Tuple[_Piece, ...]:
        assert isinstance(where, TensorChunk), "non-tensor items are held in memory"
        return self._chunk_pieces[(where.fqn, where.offsets)]

    def _held(self, item: BytesItem) -> Optional[memoryview]:
        data = self._bytes[item.fqn]
        if isinstance(data, str):
            raise FailedPreconditionError(data)
        return memoryview(data)

    def _gone(self, rank: int, error: NotFoundError) -> NotFoundError:
        assert self.step is not None, "the index is read first"
        return NotFoundError(
            f"{self._what(self.step, rank)} is no longer held ({_message(error)}): the job's "
            "ranks sealed newer steps, which release it; read the newest")


@dataclass(frozen=True)
class _Refused:
    """An item this reader does not read, and why."""

    reason: str


class _StandIn:
    """An object of a class a pickle names, unpickled without loading the class: it takes any
    arguments, state and items, and keeps none."""

    pickled_as = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_StandIn":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def add(self, value: Any) -> None:
        pass


class _OutlineUnpickler(pickle.Unpickler):
    """Unpickles a pickle's plain values, with a stand-in class (`_StandIn`) for each class or
    function it names: nothing it names is loaded or run."""

    def find_class(self, module: str, name: str) -> Any:
        return type("stand_in", (_StandIn,), {"pickled_as": f"{module}.{name}"[:200]})


def _outline_loads(data: bytes, what: str) -> Any:
    try:
        return _OutlineUnpickler(io.BytesIO(data)).load()
    except Exception as e:
        raise DataLossError(f"{what} does not unpickle, even with stand-ins for the classes it "
                            f"names: {e!r:.200}") from e


def _class_named(value: Any) -> Optional[str]:
    """The first class or function (as "module.name") that `value`, an outline
    (`_OutlineUnpickler`), holds a stand-in of; None when it is plain values only."""
    stack = [value]
    seen = set()
    while stack:
        v = stack.pop()
        if isinstance(v, _StandIn) or (isinstance(v, type) and issubclass(v, _StandIn)):
            return v.pickled_as
        if id(v) in seen:
            continue
        seen.add(id(v))
        if isinstance(v, dict):
            stack += v.keys()
            stack += v.values()
        elif isinstance(v, (list, tuple, set, frozenset)):
            stack += v
    return None


def _unwraps_ddp(layout: _Layout) -> bool:
    """Whether the layout's FQNs leave out a DistributedDataParallel wrapper's ``module``."""
    from .torch import _clean_fqn

    return any(_clean_fqn(key[len("model."):], True) == fqn != _clean_fqn(key[len("model."):],
                                                                         False)
               for key, fqn in layout.fqns.items())
