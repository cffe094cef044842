"""PyTorch integration: protect a training loop with a few added lines.

::

    import tessera.torch
    snapshotter = tessera.torch.Snapshotter(model, optimizer, every=100)
    restored = snapshotter.restore_latest()            # None on a fresh start
    for step in range(0 if restored is None else restored + 1, num_steps):
        ...forward, backward, optimizer.step()...
        snapshotter.step(step)                         # snapshots every 100 steps, never blocks

What a snapshot holds, per rank:

* every tensor of ``model.state_dict()`` and of the optimizer's state (what
  ``optimizer.state_dict()["state"]`` holds: Adam's ``exp_avg``, ``exp_avg_sq``, ``step``, ...),
  registered by address, so a snapshot copies them without any Python work per tensor;
* a pickled metadata blob: the optimizer's non-tensor state values and ``param_groups``
  hyperparameters (lr, betas, weight decay, ...), and non-tensor ``state_dict`` entries of the
  model (extra state);
* the RNG states: torch's CPU generator, the CUDA generators of the devices that hold the
  model, Python's `random` and NumPy's global ``np.random``;
* the ``state_dict()`` of every object passed in ``stateful={"name": obj}`` (pickled, one blob
  each): a GradScaler, LR schedulers, a stateful sampler or data loader; loaded back with their
  ``load_state_dict`` after the optimizer, so that a scheduler's ``last_epoch`` matches the
  restored learning rates;
* a user dict (pickled): e.g. the data loader position, or a batch drawn before the snapshot
  point. Through a callable (``user_state=lambda: {...}``) it is read only when a snapshot is
  taken, never before the loop has run.

**Registered memory is read at snapshot time.** A snapshot copies tensors on the library's thread
(or GPU copy stream) after `Snapshotter.step` returns; an optimizer step pre-hook makes the next
``optimizer.step()`` wait (a GPU-side wait on CUDA) until those copies are done. Tensors must keep
their memory: ``load_state_dict`` on the model copies in place and is fine, but replacing a
parameter or an optimizer state tensor moves it. Each snapshot checks the addresses of the
model's parameters and buffers and the identity of the optimizer's state tensors and registers
again when they moved;
call `Snapshotter.refresh` after other replacements (a buffer assigned anew, say).

**Optimizer state is created lazily** by PyTorch, on the first ``optimizer.step()``. The
Snapshotter registers as soon as the state exists (at construction, or at the first snapshot).
`Snapshotter.restore_latest` needs it before any step has run, so when it is missing it creates
it the way ``torch.distributed.checkpoint`` does: one optimizer step with zero gradients and the
learning rates set to 0, after which the parameters and gradients are put back exactly. If there
is nothing to restore, that state is dropped again, so training proceeds exactly as it would
without Tessera (Adam's step count starts at 0); so it is when the snapshot was taken before the
optimizer's first step (a GradScaler skips the steps whose gradients overflow), which is then
restored without optimizer state. Optimizers whose ``step`` needs a closure (LBFGS)
cannot be primed this way: create the Snapshotter after their first step.

**Several ranks.** Call `Snapshotter.restore_latest` on every rank: when ``torch.distributed`` is
initialized the ranks agree on one step, or all raise.

**The end of a run.** ``Snapshotter.close(drop=True)`` deletes this rank's snapshots, so that the
next launch with the same job id starts afresh instead of resuming the finished run (operators:
``tessera drop JOB``).
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import json
import logging
import operator
import os
import pickle
import random
import struct
import time
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, MutableMapping, Optional, Tuple, Union

import torch

from . import _dtensor
from .client import DTYPE_BYTES, Client, Entry, Stats
from .errors import (
    BlobTooLargeError,
    DataLossError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    TesseraError,
)

try:  # NumPy is optional: its RNG state is saved when it is importable.
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None

__all__ = ["Snapshotter", "DEFAULT_SOCKET_PATH", "MIN_BLOB_CAPACITY"]

_log = logging.getLogger("tessera.torch")

DEFAULT_SOCKET_PATH = "/run/tessera/agent.sock"
"""The daemon's default ``agent.socket_path``; the environment variable ``TESSERA_SOCKET``
overrides it."""

MIN_BLOB_CAPACITY = 64 << 10
"""The smallest capacity a blob gets: max(this, 4x its first size), rounded up to a power of two,
so a restarted trainer computes the same capacity and so the same layout."""

CALLABLE_USER_STATE_CAPACITY = 1 << 20
"""The capacity of the user dict when `user_state` is a callable and no ``user_state_capacity``
is given: the callable is not evaluated before the first snapshot, so its size is not known at
registration, and the capacity must not depend on it for a restarted trainer to register the
same layout."""

_STATEFUL_NAME_CHARACTERS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
_STATEFUL_NAME_MAX = 64
_STATEFUL_HINT = ("pass LR schedulers, GradScalers, stateful samplers and data loaders by name "
                  "in the keyword argument stateful=, e.g. stateful={'scheduler': scheduler, "
                  "'scaler': scaler}")

_PICKLE_PROTOCOL = 4
_META_FORMAT = 2  # 1: "model_other" a dict and "dtensors" pickled bytes; 2: see `_meta`
_LAYOUT_FORMAT = "tessera.snapshot-layout/1"
_EMPTY_USER_STATE = pickle.dumps({}, _PICKLE_PROTOCOL)
_BLOB_DESCRIPTIONS = {
    "rng.torch_cpu": "torch's CPU RNG state",
    "rng.torch_cuda": "the CUDA RNG states",
    "rng.python": "Python's random state",
    "rng.numpy": "NumPy's RNG state",
    "user": "the pickled user_state",
    "meta": "the optimizer's non-tensor state and param_groups",
    "layout": "the JSON layout (FQNs and DTensor placements) of the registered tensors",
}
_DOUBLE = struct.Struct("<d")

UserState = Union[MutableMapping[str, Any], Callable[[], Mapping[str, Any]]]


def _torch_dtype_names() -> Dict[torch.dtype, str]:
    names = {}
    for name in DTYPE_BYTES:
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype):
            names[dtype] = name
    return names


_DTYPE_NAMES = _torch_dtype_names()


def _blob_capacity(size: int) -> int:
    capacity = max(MIN_BLOB_CAPACITY, 4 * size)
    return 1 << (capacity - 1).bit_length()


_WRAPPER_COMPONENTS = frozenset(("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"))


def _clean_fqn(key: str, unwrap_ddp: bool) -> str:
    """A state_dict key as ``torch.distributed.checkpoint.state_dict`` names it: without the path
    components that torch.compile, FSDP1 and activation checkpointing wrappers add, nor DDP's
    leading ``module``."""
    parts = key.split(".")
    if unwrap_ddp and parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(p for p in parts if p not in _WRAPPER_COMPONENTS)


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name, "")
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidArgumentError(
            f"environment variable {name}={value!r} is not an integer") from None


def _staging_budget(budget: Optional[Union[int, float]]) -> Tuple[int, float]:
    """(budget_bytes, budget_free_fraction) for `Client.set_staging`."""
    if budget is None:
        return 0, 0.5
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError("staging_budget must be bytes (an int) or a fraction of the free GPU "
                        f"memory (a float), got {type(budget).__name__}")
    if isinstance(budget, int):
        if budget <= 0:
            raise InvalidArgumentError(f"staging_budget must be > 0 bytes, got {budget}")
        return budget, 0.5
    if not 0 < budget <= 1:
        raise InvalidArgumentError(
            f"staging_budget as a fraction of free GPU memory must be in (0, 1], got {budget}")
    return 0, float(budget)


def _has_state_dict(value: Any) -> bool:
    """Whether `value` saves and loads its state the PyTorch way (a scheduler, a GradScaler, a
    stateful sampler or loader, a module, an optimizer). Classes themselves do not count."""
    return (not isinstance(value, type) and callable(getattr(value, "state_dict", None))
            and callable(getattr(value, "load_state_dict", None)))


def _misplaced_stateful(value: Any, where: str) -> None:
    """TypeError when `where` got an object that belongs in ``stateful=`` (the usual mistake:
    ``Snapshotter(model, optimizer, scheduler)``)."""
    if _has_state_dict(value) or (isinstance(value, (list, tuple)) and value
                                  and all(_has_state_dict(v) for v in value)):
        raise TypeError(f"{where} got a {type(value).__name__}, an object with state_dict() and "
                        f"load_state_dict(): {_STATEFUL_HINT}")


def _check_int(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise InvalidArgumentError(f"{what} must be >= {minimum}, got {value}")
    return value


def _exact(value: Any) -> Any:
    """A key that two scalars share only when they are the same state: a float's bits (0.0 ==
    -0.0, yet they differ; NaN != NaN, yet equal bits are one state), and the type of anything
    else (True == 1 == 1.0, yet random.gauss() would return each as it is)."""
    if type(value) is float:
        return _DOUBLE.pack(value)
    return type(value), value


def _python_rng_fingerprint(state: Any) -> Any:
    """All of `random.getstate()` (version, the generator's 625 ints, gauss_next), exactly."""
    if type(state) is tuple and len(state) == 3 and type(state[1]) is tuple:
        return _exact(state[0]), state[1], _exact(state[2])
    return object()  # a shape not known here: equal to nothing, so always pickled


def _numpy_rng_fingerprint(state: Any) -> Any:
    """All of ``np.random.get_state()`` ('MT19937', key, pos, has_gauss, cached_gaussian),
    exactly (the key is always the generator's uint32[624]: its bytes say it all)."""
    if (type(state) is tuple and len(state) == 5 and _np is not None
            and type(state[1]) is _np.ndarray):
        return (_exact(state[0]), state[1].tobytes(), _exact(state[2]), _exact(state[3]),
                _exact(state[4]))
    return object()


class _PickleCache:
    """The pickles of states that often stay the same from one snapshot to the next (Python's
    and NumPy's RNG, when the loop does not draw from them). A state is pickled again unless its
    fingerprint, which holds all of it exactly, equals the one of the state pickled last: then
    that pickle is this state's, and it is the very bytes object the blob holds already, which
    `Snapshotter._snapshot` then need not stage again."""

    def __init__(self) -> None:
        self._last: Dict[str, Tuple[Any, bytes]] = {}

    def dumps(self, name: str, state: Any, fingerprint: Any) -> bytes:
        last = self._last.get(name)
        if last is not None and last[0] == fingerprint:
            return last[1]
        data = pickle.dumps(state, _PICKLE_PROTOCOL)
        self._last[name] = (fingerprint, data)
        return data


class _Blob:
    """A blob entry backed by two buffers: a new snapshot's bytes go to the buffer that the
    snapshot in flight (if any) is not copying from."""

    def __init__(self, name: str, capacity: int, describe: str, enlarge: str) -> None:
        self.name = name
        self.capacity = capacity
        self.describe = describe
        self.enlarge = enlarge  # the argument that sets this capacity, for messages
        self.buffers = (ctypes.create_string_buffer(capacity),
                        ctypes.create_string_buffer(capacity))
        # Byte views to stage through: a slice assignment copies with the GIL held. ctypes.memmove
        # is a CFUNCTYPE call, which releases the GIL: it wakes a Python thread waiting for it (a
        # DataLoader's pin-memory thread, a logger), which may take it, and the training thread
        # then waits to get it back, up to the switch interval (5 ms).
        self._views = tuple(memoryview(b).cast("B") for b in self.buffers)
        self.in_flight = 0   # buffer of the last started snapshot
        self.registered = 0  # buffer the library's entry points at
        self.index = -1      # position in the registration
        # What the registered buffer holds, with the entry's length set to it; None: unknown
        # (after a registration or a restore). An unchanged blob is not staged again.
        self.current: Optional[bytes] = None

    def address(self, buffer: int) -> int:
        return ctypes.addressof(self.buffers[buffer])

    def check_fits(self, data: bytes) -> None:
        if len(data) > self.capacity:
            fix = (f"pass a larger capacity ({self.enlarge}) when creating the Snapshotter, "
                   "the same in every run of the job" if self.enlarge else
                   "it was sized at 4x its first size: create the Snapshotter once that state "
                   "has its full size (after the first optimizer step)")
            raise BlobTooLargeError(
                f"{self.describe} is {len(data)} bytes, over the capacity of {self.capacity} "
                f"bytes its blob '{self.name}' was registered with; {fix}"
            )

    def stage(self, data: bytes) -> int:
        spare = 1 - self.in_flight
        self._views[spare][:len(data)] = data
        return spare

    def read(self, length: int) -> bytes:
        return ctypes.string_at(self.address(self.registered), length)


@dataclass
class _Registered:
    """What the current registration covers."""

    tensor_names: List[str]
    # (state_dict key, tensor, address): checked at each snapshot
    model_tensors: List[Tuple[str, torch.Tensor, int]]
    # (param index, key, tensor): checked by identity at each snapshot
    optimizer_tensors: List[Tuple[int, Any, torch.Tensor]]
    aliases: Dict[str, str]  # tied tensors: name -> the registered name with the same memory
    cuda_devices: List[int]  # whose RNG states are saved
    stream_device: Optional[torch.device]  # whose current stream snapshots and fences use
    has_model_other: bool  # the model's state_dict has non-tensor entries
    # What `Snapshotter._changed` compares, flattened so that each check is one C-level map:
    optimizer_state: Any  # the optimizer's `state` mapping itself
    params: List[torch.Tensor]  # the optimizer's parameters, in state_dict order
    state_keys: List[Any]  # optimizer.state's keys and values (per-parameter dicts), in order
    state_values: List[Dict[Any, Any]]
    state_sizes: List[int]  # the values' lengths
    # Every value of those dicts, in order, when all of them are tensors (else None)
    state_tensors: Optional[List[torch.Tensor]]
    tensor_dicts: List[Dict[Any, Any]]  # for each optimizer tensor: its state dict, key, tensor
    tensor_keys: List[Any]
    tensor_values: List[torch.Tensor]
    model_list: List[torch.Tensor]  # the model's tensors and their addresses
    model_addresses: List[int]
    # (param index, key, state dict) of the optimizer's non-tensor state values
    other_refs: List[Tuple[int, Any, Dict[Any, Any]]]


class Snapshotter:
    """Snapshots a model, its optimizer, the RNG states, the loop's stateful objects and a user
    dict into tesserad.

    Args:
        model: the module (a DistributedDataParallel wrapper is fine).
        optimizer: its optimizer, or None.
        job_id: the job's id (letters, digits, '.', '_', '-'); default: the environment variable
            ``TESSERA_JOB_ID``, else ``TORCHELASTIC_RUN_ID`` (set by torchrun; note that
            ``torchrun --standalone`` draws a new one per launch, while its own restarts keep it).
        rank: default ``RANK`` from the environment, else torch.distributed's rank, else 0.
        world_size: default ``WORLD_SIZE``, else torch.distributed's world size, else 1.
        every: `step` snapshots the steps that are multiples of this.
        socket_path: the daemon's agent socket; default ``TESSERA_SOCKET``, else
            `DEFAULT_SOCKET_PATH`.
        user_state: the loop's own state that no object below holds (a batch drawn before the
            snapshot point, the best validation loss, ...). Values must pickle. Either a dict,
            captured at each snapshot and updated in place by `restore_latest`; or a callable
            returning a dict, called only when a snapshot is taken (never by the constructor or
            `restore_latest`, so it may name variables the loop has not created yet), whose
            restored value `restore_latest` passes to `load_user_state` and keeps in
            `restored_user_state`. Objects with state_dict/load_state_dict do not belong here
            (they would be restored as copies): pass them in `stateful`.
        load_user_state: called by `restore_latest` with the restored user dict (optional), e.g.
            ``lambda state: globals().update(state)`` in a script whose loop runs at module level.
        user_state_capacity: bytes reserved for the pickled user dict. Default for a dict: max(64
            KiB, 4x its size at registration) rounded up to a power of two; for a callable:
            `CALLABLE_USER_STATE_CAPACITY` (1 MiB). A user dict that outgrows it raises
            `BlobTooLargeError` at the snapshot. Every run of a job must use the same capacity.
        when_busy: "skip" (default) or "wait": what a snapshot does while the previous one is
            still being copied or sealed.
        use_gpu: False forces host copies. A model without CUDA tensors always gets them.
        fence_forward: also fence before the model's forward pass. Default: only when the model's
            state_dict has buffers, which a forward may update (batch-norm statistics). On a GPU
            this makes the forward wait for the snapshot's copies.
        staging: on a GPU, how the optimizer step is kept from waiting for a device-to-host copy
            that outlasts forward and backward: "adaptive" (default) measures that window and the
            copy rate and first copies device-to-device, into a staging buffer, just the bytes
            that would not fit; "full" stages everything; "off" lets the fence wait for the
            whole copy. See `stats` for the plan.
        staging_budget: GPU memory the staging buffer may take: bytes (an int), or a fraction of
            the device's free memory (a float in (0, 1]). Default 0.5 of the free memory.
        dp_group: the data-parallel group this rank belongs to: a torch.distributed process
            group, or the job ranks of the group in DP-rank order. The model's parameters and the
            optimizer's state are then taken as replicated across it, and each member snapshots
            only its 1/dp slice of their bytes (buffers, RNG and the user dict stay whole).
            `restore_latest` must then be called by every member together: each restores its
            slice and gathers the others' over NCCL (CUDA tensors) or through the daemon.
        stateful: keyword only: the loop's other objects that have ``state_dict()`` and
            ``load_state_dict()``, by name: a GradScaler (``torch.cuda.amp.GradScaler``,
            ``torch.amp.GradScaler``), LR schedulers, a stateful sampler or data loader, an EMA
            of the weights... Each one's ``state_dict()`` is pickled at every snapshot, and
            `restore_latest` calls each one's ``load_state_dict()``, in the order given, after
            the model and the optimizer are restored (a scheduler then sees the restored learning
            rates, and its ``last_epoch`` makes the next decay come on time) and before the RNG
            states are. Names: 1 to 64 of ``[A-Za-z0-9._-]``; every run of a job must pass the
            same names. On a GPU, a GradScaler's ``state_dict()`` reads its scale back to the
            host: one device synchronisation per snapshot.
        stateful_capacity: keyword only: bytes reserved for each pickled ``state_dict()`` (an
            int for all, or a dict name -> bytes); default max(64 KiB, 4x its size at
            registration) rounded up to a power of two.

    Raises:
        TypeError, InvalidArgumentError: bad arguments.
        UnavailableError: no daemon answers on the socket.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Optional[torch.optim.Optimizer],
        job_id: Optional[str] = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        every: int = 1,
        socket_path: Optional[str] = None,
        user_state: Optional[UserState] = None,
        load_user_state: Optional[Callable[[Dict[str, Any]], None]] = None,
        user_state_capacity: Optional[int] = None,
        when_busy: str = "skip",
        use_gpu: bool = True,
        fence_forward: Optional[bool] = None,
        staging: str = "adaptive",
        staging_budget: Optional[Union[int, float]] = None,
        dp_group: Optional[Any] = None,
        *,
        stateful: Optional[Mapping[str, Any]] = None,
        stateful_capacity: Optional[Union[int, Mapping[str, int]]] = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            if not isinstance(optimizer, torch.nn.Module):
                _misplaced_stateful(optimizer, "optimizer (a torch.optim.Optimizer or None)")
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
            )
        for value, where in ((job_id, "job_id"), (rank, "rank"), (world_size, "world_size"),
                             (every, "every"), (socket_path, "socket_path"),
                             (user_state, "user_state"), (load_user_state, "load_user_state"),
                             (user_state_capacity, "user_state_capacity"),
                             (when_busy, "when_busy"), (use_gpu, "use_gpu"),
                             (fence_forward, "fence_forward"), (staging, "staging"),
                             (staging_budget, "staging_budget"), (dp_group, "dp_group")):
            _misplaced_stateful(value, where)
        if user_state is not None and not (isinstance(user_state, MutableMapping)
                                           or callable(user_state)):
            raise TypeError(
                "user_state must be a dict or a callable returning a dict, got "
                f"{type(user_state).__name__}"
            )
        if isinstance(user_state, Mapping):
            self._check_user_values(user_state)
        if load_user_state is not None and not callable(load_user_state):
            raise TypeError("load_user_state must be callable (it is given the restored user "
                            f"dict), got {type(load_user_state).__name__}")
        self.every = _check_int(every, "every", 1)
        if user_state_capacity is not None:
            _check_int(user_state_capacity, "user_state_capacity", 1)
        self._stateful = self._check_stateful(stateful, model, optimizer)
        self._stateful_capacity = self._check_stateful_capacity(stateful_capacity, self._stateful)
        self.model = model
        self.optimizer = optimizer
        self.job_id = self._resolve_job_id(job_id)
        self.rank, self.world_size = self._resolve_rank(rank, world_size)
        self.local_rank: Optional[int] = _env_int("LOCAL_RANK")
        self.socket_path = socket_path or os.environ.get("TESSERA_SOCKET", DEFAULT_SOCKET_PATH)
        self._user_state = user_state
        self._load_user_state = load_user_state
        self._user_state_capacity = user_state_capacity
        self.restored_user_state: Optional[Dict[str, Any]] = None
        self.restored_step: Optional[int] = None
        self.last_snapshot_seconds = 0.0
        """Time the last `snapshot` call blocked the training thread."""
        self.max_snapshot_seconds = 0.0
        """The longest any `snapshot` call blocked the training thread."""

        self.dp_members: Optional[List[int]] = self._resolve_dp_group(dp_group, self.rank)
        self._blobs: Dict[str, _Blob] = {}
        self._layout_json = b""
        # False only while restoring a snapshot taken before snapshots carried a layout blob.
        self._with_layout = True
        self._rng_pickles = _PickleCache()
        self._registered: Optional[_Registered] = None
        self._fence_pending = False
        self._hook_handles: List[Any] = []
        self._wrapped_step: Optional[Any] = None

        devices = {t.device for t in self._model_state(model)[0].values()}
        cuda = sorted(d.index if d.index is not None else torch.cuda.current_device()
                      for d in devices if d.type == "cuda")
        if staging not in ("off", "full", "adaptive"):
            raise InvalidArgumentError(
                f"staging must be 'off', 'full' or 'adaptive', got {staging!r}")
        budget_bytes, budget_fraction = _staging_budget(staging_budget)
        if cuda:
            with torch.cuda.device(cuda[0]):  # the library's copy engine uses the current device
                self._client = Client(self.socket_path, when_busy=when_busy, use_gpu=use_gpu)
            try:
                self._client.set_staging(staging, budget_bytes, budget_fraction)
            except BaseException:
                self.close()
                raise
        else:
            # A model on the CPU needs no CUDA context, even where a GPU exists.
            self._client = Client(self.socket_path, when_busy=when_busy, use_gpu=False)
        try:
            if self.optimizer is None or self._has_optimizer_state():
                self._register()
            self._install_hooks(fence_forward)
        except BaseException:
            self.close()
            raise

    # -- identity --------------------------------------------------------------------------------

    @staticmethod
    def _resolve_dp_group(dp_group: Any, rank: int) -> Optional[List[int]]:
        if dp_group is None:
            return None
        if isinstance(dp_group, (list, tuple)):
            members = [_check_int(m, "dp_group[]", 0) for m in dp_group]
        else:
            import torch.distributed as dist
            if not dist.is_available() or not dist.is_initialized():
                raise InvalidArgumentError(
                    "dp_group is a process group, but torch.distributed is not initialized")
            members = list(dist.get_process_group_ranks(dp_group))
        if rank not in members:
            raise InvalidArgumentError(
                f"rank {rank} is not in its dp_group {members}: pass the data-parallel group "
                "this rank belongs to")
        if len(set(members)) != len(members):
            raise InvalidArgumentError(f"dp_group lists a rank twice: {members}")
        return members

    @staticmethod
    def _resolve_job_id(job_id: Optional[str]) -> str:
        if job_id is not None:
            if not isinstance(job_id, str):
                raise TypeError(f"job_id must be a str, got {type(job_id).__name__}")
            return job_id
        for variable in ("TESSERA_JOB_ID", "TORCHELASTIC_RUN_ID"):
            value = os.environ.get(variable, "")
            if value and value != "none":
                return value
        raise InvalidArgumentError(
            "no job id: pass job_id=..., set TESSERA_JOB_ID, or launch with torchrun "
            "(TORCHELASTIC_RUN_ID; give --rdzv-id so a relaunch keeps it)"
        )

    @staticmethod
    def _resolve_rank(rank: Optional[int], world_size: Optional[int]) -> Tuple[int, int]:
        dist = torch.distributed
        initialized = dist.is_available() and dist.is_initialized()
        if rank is None:
            rank = _env_int("RANK")
            if rank is None:
                rank = dist.get_rank() if initialized else 0
        if world_size is None:
            world_size = _env_int("WORLD_SIZE")
            if world_size is None:
                world_size = dist.get_world_size() if initialized else 1
        _check_int(rank, "rank", 0)
        _check_int(world_size, "world_size", 1)
        if rank >= world_size:
            raise InvalidArgumentError(f"rank {rank} must be below world_size {world_size}")
        return rank, world_size

    @staticmethod
    def _check_stateful(stateful: Any, model: torch.nn.Module,
                        optimizer: Optional[torch.optim.Optimizer]) -> Dict[str, Any]:
        if stateful is None:
            return {}
        if not isinstance(stateful, Mapping):
            raise TypeError(
                "stateful must be a dict of name -> object with state_dict() and "
                f"load_state_dict(), e.g. stateful={{'scheduler': scheduler}}; got "
                f"{type(stateful).__name__}")
        checked: Dict[str, Any] = {}
        seen: Dict[int, str] = {}
        for name, obj in stateful.items():
            if not isinstance(name, str):
                raise TypeError(f"stateful's names must be str, got {type(name).__name__} "
                                f"{name!r}")
            if (not 1 <= len(name) <= _STATEFUL_NAME_MAX
                    or not set(name) <= _STATEFUL_NAME_CHARACTERS):
                raise InvalidArgumentError(
                    f"stateful name {name!r} must be 1 to {_STATEFUL_NAME_MAX} characters of "
                    "[A-Za-z0-9._-]")
            if obj is model or obj is optimizer:
                raise InvalidArgumentError(
                    f"stateful[{name!r}] is the {'model' if obj is model else 'optimizer'} the "
                    "Snapshotter was given, whose state is snapshotted already (its tensors by "
                    "address); leave it out of stateful")
            if not _has_state_dict(obj):
                loader = isinstance(obj, torch.utils.data.DataLoader)
                raise TypeError(
                    f"stateful[{name!r}] is a {type(obj).__name__}, which has no state_dict() "
                    "and load_state_dict()" + (
                        ": a plain torch DataLoader cannot resume its position; pass a stateful "
                        "sampler (or a stateful loader such as torchdata's StatefulDataLoader), "
                        "or keep the position in user_state" if loader else
                        "; keep plain values in user_state"))
            if id(obj) in seen:
                raise InvalidArgumentError(
                    f"stateful[{name!r}] is the same object as stateful[{seen[id(obj)]!r}]: "
                    "its state would be loaded twice; pass it once")
            seen[id(obj)] = name
            checked[name] = obj
        return checked

    @staticmethod
    def _check_stateful_capacity(capacity: Any, stateful: Dict[str, Any]) -> Dict[str, int]:
        if capacity is None:
            return {}
        if isinstance(capacity, Mapping):
            unknown = [n for n in capacity if n not in stateful]
            if unknown:
                raise InvalidArgumentError(
                    f"stateful_capacity names {unknown}, which stateful= does not; its names: "
                    f"{list(stateful)}")
            return {name: _check_int(value, f"stateful_capacity[{name!r}]", 1)
                    for name, value in capacity.items()}
        _check_int(capacity, "stateful_capacity (bytes for each, or a dict name -> bytes)", 1)
        return {name: capacity for name in stateful}

    @staticmethod
    def _check_user_values(user: Mapping[str, Any]) -> None:
        for key, value in user.items():
            if _has_state_dict(value):
                raise TypeError(
                    f"user_state[{key!r}] is a {type(value).__name__}, an object with "
                    "state_dict() and load_state_dict(): pickled in the user dict it would be "
                    f"restored as a copy, not into your object; {_STATEFUL_HINT}")

    # -- state collection ------------------------------------------------------------------------

    @staticmethod
    def _model_state(model: torch.nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """The model's tensors by state_dict key (a DTensor's local shard in its place: the memory
        that holds this rank's bytes), and its other state_dict values."""
        tensors: Dict[str, torch.Tensor] = {}
        other: Dict[str, Any] = {}
        for key, value in model.state_dict(keep_vars=True).items():
            if isinstance(value, torch.Tensor):
                tensors[key] = _dtensor.local(value)
            else:
                other[key] = value
        return tensors, other

    def _params(self) -> List[torch.Tensor]:
        assert self.optimizer is not None
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _has_optimizer_state(self) -> bool:
        assert self.optimizer is not None
        return any(self.optimizer.state.get(p) for p in self._params())

    def _optimizer_state(
        self,
    ) -> Tuple[List[Tuple[int, Any, torch.Tensor]], Dict[Tuple[int, Any], Any]]:
        """The optimizer's state as state_dict() numbers it: (param index, key) -> value."""
        tensors: List[Tuple[int, Any, torch.Tensor]] = []
        other: Dict[Tuple[int, Any], Any] = {}
        if self.optimizer is None:
            return tensors, other
        for i, p in enumerate(self._params()):
            for key, value in self.optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors.append((i, key, value))
                else:
                    other[(i, key)] = value
        return tensors, other

    def _meta(self, optimizer_other: Dict[Tuple[int, Any], Any],
              with_model_other: bool) -> Dict[str, Any]:
        """The meta blob: only plain Python values at its top level (readers of a snapshot
        unpickle it allowing no classes); the model's non-tensor state, which may hold any
        object, nested as its own pickle."""
        groups = []
        if self.optimizer is not None:
            groups = [{k: v for k, v in g.items() if k not in ("params", "param_names")}
                      for g in self.optimizer.param_groups]
        # model.state_dict() costs a walk over every module: only when there is extra state.
        model_other = (pickle.dumps(self._model_state(self.model)[1], _PICKLE_PROTOCOL)
                       if with_model_other else b"")
        return {
            "format": _META_FORMAT,
            "optimizer_state": optimizer_other,
            "param_groups": groups,
            "model_other": model_other,
        }

    def dtensor_layout(self) -> Dict[str, Dict[str, Any]]:
        """Where the local shard of each registered DTensor lies in its global tensor, by entry
        name ("model.<state_dict key>", "optim.<param index>.<key>"): global_shape, offsets,
        lengths, dtype, mesh_shape, mesh_dim_names, placements. Every snapshot records it (in its
        layout blob, see `layout`), for readers that place the shards in another layout. Empty
        for a model without DTensors."""
        return dict(self.layout().get("dtensors", {}))

    def layout(self) -> Dict[str, Any]:
        """What the snapshots of the current registration record about their tensors (the JSON
        blob "layout", written once per registration), for readers that need no model to read
        them (`tessera.dcp.SnapshotReader`):

        * "fqns": entry name -> the tensor's fully qualified name in the model's state dict
          (wrappers' path components such as ``_orig_mod`` and DDP's ``module`` left out, as
          ``torch.distributed.checkpoint.state_dict`` names them);
        * "param_fqns": the FQN of each optimizer parameter, in ``state_dict`` order;
        * "group_sizes": how many parameters each param group holds;
        * "aliases": entry name -> the registered entry that holds its bytes (tied weights);
        * "dtensors": as `dtensor_layout`.
        """
        return json.loads(self._layout_json) if self._layout_json else {}

    def _user_is_callable(self) -> bool:
        state = self._user_state
        return state is not None and callable(state) and not isinstance(state, Mapping)

    def _user_dict(self) -> Dict[str, Any]:
        state = self._user_state
        if state is None:
            return {}
        value = state() if self._user_is_callable() else state
        if not isinstance(value, Mapping):
            raise TypeError(f"user_state() must return a dict, got {type(value).__name__}")
        self._check_user_values(value)
        return dict(value)

    def _stateful_bytes(self, name: str, obj: Any) -> bytes:
        state = obj.state_dict()
        if not isinstance(state, Mapping):
            raise TypeError(f"stateful[{name!r}].state_dict() must return a dict, got "
                            f"{type(state).__name__}")
        try:
            return pickle.dumps(state, _PICKLE_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            raise InvalidArgumentError(
                f"the state_dict() of stateful[{name!r}] ({type(obj).__name__}) does not "
                f"pickle: {e}") from e

    def _blob_payloads(self, cuda_devices: List[int], with_model_other: bool,
                       optimizer_other: Dict[Tuple[int, Any], Any],
                       registering: bool = False) -> Dict[str, Optional[bytes]]:
        """name -> bytes of every blob, as of now. Registering, the bytes are only needed to size
        new blobs: None where they are not read (a callable user_state is never called before a
        snapshot; a stateful blob already sized keeps its capacity)."""
        payloads: Dict[str, Optional[bytes]] = {}
        cpu = torch.get_rng_state()
        payloads["rng.torch_cpu"] = ctypes.string_at(cpu.data_ptr(), cpu.numel())
        if cuda_devices:
            cuda_states = {}
            generators = getattr(torch.cuda, "default_generators", ())
            for d in cuda_devices:
                # The generator itself, without get_rng_state's per-call device resolution.
                t = (generators[d].get_state() if d < len(generators)
                     else torch.cuda.get_rng_state(d))
                cuda_states[d] = ctypes.string_at(t.data_ptr(), t.numel())
            payloads["rng.torch_cuda"] = pickle.dumps(cuda_states, _PICKLE_PROTOCOL)
        state = random.getstate()
        payloads["rng.python"] = self._rng_pickles.dumps("rng.python", state,
                                                         _python_rng_fingerprint(state))
        if _np is not None:
            state = _np.random.get_state()
            payloads["rng.numpy"] = self._rng_pickles.dumps("rng.numpy", state,
                                                            _numpy_rng_fingerprint(state))
        user: Optional[bytes] = None
        if self._user_state is None:
            user = _EMPTY_USER_STATE
        elif not (registering and self._user_is_callable()):
            values = self._user_dict()
            try:
                user = pickle.dumps(values, _PICKLE_PROTOCOL)
            except (pickle.PicklingError, TypeError, AttributeError) as e:
                raise InvalidArgumentError(f"user_state does not pickle: {e}") from e
        payloads["user"] = user
        for name, obj in self._stateful.items():
            blob = f"state.{name}"
            payloads[blob] = (None if registering and blob in self._blobs
                              else self._stateful_bytes(name, obj))
        try:
            meta = pickle.dumps(self._meta(optimizer_other, with_model_other), _PICKLE_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            raise InvalidArgumentError(
                f"the optimizer's or model's non-tensor state does not pickle: {e}"
            ) from e
        payloads["meta"] = meta
        if self._with_layout:
            payloads["layout"] = self._layout_json  # the same object until the next registration
        return payloads

    def _blob_description(self, name: str) -> str:
        """What blob `name` holds, for messages."""
        if name.startswith("state."):
            key = name[len("state."):]
            return (f"the pickled state_dict() of stateful[{key!r}] "
                    f"({type(self._stateful[key]).__name__})")
        return _BLOB_DESCRIPTIONS[name]

    def _cuda_devices(self) -> List[int]:
        """The CUDA devices whose RNG states are saved: those holding the model's tensors. Not
        "every device CUDA has initialized": the registered layout must not depend on what else
        the process happened to touch before registering, or a restarted trainer would not match
        its snapshot."""
        devices = set()
        for t in self._model_state(self.model)[0].values():
            if t.device.type == "cuda":
                devices.add(t.device.index if t.device.index is not None
                            else torch.cuda.current_device())
        return sorted(devices)

    # -- registration ----------------------------------------------------------------------------

    @staticmethod
    def _tensor_entry(name: str, t: torch.Tensor) -> Entry:
        if t.layout != torch.strided:
            raise InvalidArgumentError(f"tensor '{name}' has layout {t.layout}; only dense "
                                       "(strided) tensors can be registered")
        if not t.is_contiguous():
            raise InvalidArgumentError(
                f"tensor '{name}' (shape {tuple(t.shape)}, strides {t.stride()}) is not "
                "contiguous; registered memory is copied as one block, so make it contiguous "
                "where it is created (e.g. param.data = param.data.contiguous()) before creating "
                "the Snapshotter"
            )
        if t.device.type not in ("cpu", "cuda"):
            raise InvalidArgumentError(f"tensor '{name}' is on {t.device}; only CPU and CUDA "
                                       "tensors can be registered")
        dtype = _DTYPE_NAMES.get(t.dtype)
        if dtype is None:
            raise InvalidArgumentError(
                f"tensor '{name}' has dtype {t.dtype}, which Tessera does not store; supported: "
                + ", ".join(str(d) for d in _DTYPE_NAMES)
            )
        return Entry.tensor(name, t.data_ptr(), dtype, tuple(t.shape))

    def _place_dtensors(self, optimizer_tensors: List[Tuple[int, Any, torch.Tensor]]
                        ) -> Dict[str, Dict[str, Any]]:
        """Where the model's and the optimizer's DTensors lie (`dtensor_layout`)."""
        if not _dtensor.available():
            return {}
        named = [(f"model.{k}", t) for k, t in self.model.state_dict(keep_vars=True).items()
                 if _dtensor.is_dtensor(t)]
        named += [(f"optim.{i}.{key}", t) for i, key, t in optimizer_tensors
                  if _dtensor.is_dtensor(t)]
        layout = {}
        for name, t in named:
            try:
                place = _dtensor.placement(name, t)
            except ValueError as e:
                raise InvalidArgumentError(str(e)) from e
            assert place is not None
            layout[name] = place.as_dict()
        return layout

    def _layout_of(self, model_keys: List[str], aliases: Dict[str, str],
                   dtensors: Dict[str, Dict[str, Any]]) -> bytes:
        """The JSON of `layout`."""
        unwrap_ddp = isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
        fqns = {f"model.{k}": _clean_fqn(k, unwrap_ddp) for k in model_keys}
        param_fqns: List[str] = []
        group_sizes: List[int] = []
        if self.optimizer is not None:
            names = {id(p): _clean_fqn(n, unwrap_ddp) for n, p in self.model.named_parameters()}
            for group in self.optimizer.param_groups:
                group_sizes.append(len(group["params"]))
                # A parameter the model does not hold has no FQN: its index stands in.
                param_fqns += [names.get(id(p), f"param.{len(param_fqns) + i}")
                               for i, p in enumerate(group["params"])]
        return json.dumps({"format": _LAYOUT_FORMAT, "fqns": fqns, "param_fqns": param_fqns,
                           "group_sizes": group_sizes, "aliases": aliases,
                           "dtensors": dtensors}, separators=(",", ":")).encode("utf-8")

    def _register(self) -> None:
        model_tensors, model_other = self._model_state(self.model)
        optimizer_tensors, optimizer_other = self._optimizer_state()
        named: List[Tuple[str, torch.Tensor]] = [
            (f"model.{k}", t) for k, t in model_tensors.items()]
        named += [(f"optim.{i}.{key}", t) for i, key, t in optimizer_tensors]
        dtensors = self._place_dtensors(optimizer_tensors)

        parameter_names = {f"model.{k}" for k, _ in self.model.named_parameters()}
        entries: List[Entry] = []
        names: List[str] = []
        replicated: List[bool] = []
        aliases: Dict[str, str] = {}
        seen: Dict[Tuple[int, str, Tuple[int, ...], str], str] = {}
        for name, t in named:
            # An optimizer's DTensor state stays itself in `named` (it is found again by
            # identity); its local shard is what is registered.
            t = _dtensor.local(t)
            entry = self._tensor_entry(name, t)
            if entry.nbytes > 0:
                identity = (entry.address, entry.dtype, entry.shape, str(t.device))
                if identity in seen:  # tied weights: one copy is enough
                    aliases[name] = seen[identity]
                    continue
                seen[identity] = name
            entries.append(entry)
            names.append(name)
            # Under data parallelism the parameters and the optimizer state are the same on every
            # member; buffers (batch-norm statistics) may drift per rank, so they stay whole.
            replicated.append(name in parameter_names or name.startswith("optim."))

        self._layout_json = self._layout_of(list(model_tensors), aliases, dtensors)
        cuda_devices = self._cuda_devices()
        stream_device = None
        for t in model_tensors.values():
            if t.device.type == "cuda":
                stream_device = t.device
                break
        # Blob capacities are fixed by their first size (or kept from an earlier registration) so
        # that every registration of this job, in this run or a restarted one, has one layout.
        payloads = self._blob_payloads(cuda_devices, bool(model_other), optimizer_other,
                                       registering=True)
        for name, data in payloads.items():
            blob = self._blobs.get(name)
            if blob is None:
                enlarge = ""
                if name == "user":
                    enlarge = "user_state_capacity="
                    if self._user_state_capacity is not None:
                        capacity = self._user_state_capacity
                    elif data is None:
                        capacity = CALLABLE_USER_STATE_CAPACITY
                    else:
                        capacity = _blob_capacity(len(data))
                elif name.startswith("state."):
                    key = name[len("state."):]
                    enlarge = f"stateful_capacity={{{key!r}: bytes}}"
                    assert data is not None
                    capacity = self._stateful_capacity.get(key) or _blob_capacity(len(data))
                else:
                    assert data is not None
                    capacity = _blob_capacity(len(data))
                blob = _Blob(name, capacity, self._blob_description(name), enlarge)
                self._blobs[name] = blob
            blob.index = len(entries)
            blob.registered = blob.in_flight
            blob.current = None
            entries.append(Entry.blob(f"blob.{name}", blob.address(blob.registered),
                                      blob.capacity, 0))
            replicated.append(False)
        for name in list(self._blobs):
            if name not in payloads:
                del self._blobs[name]

        self._registered = None
        if self.dp_members is not None:
            self._client.set_data_parallel(self.dp_members, replicated)
        self._client.register(self.job_id, self.rank, self.world_size, entries)
        params = self._params() if self.optimizer is not None else []
        state = self.optimizer.state if self.optimizer is not None else {}
        state_dicts = [state.get(p) for p in params]
        self._registered = _Registered(
            tensor_names=names,
            model_tensors=[(k, t, t.data_ptr()) for k, t in model_tensors.items()],
            optimizer_tensors=optimizer_tensors,
            aliases=aliases,
            cuda_devices=cuda_devices,
            stream_device=stream_device,
            has_model_other=bool(model_other),
            optimizer_state=state,
            params=params,
            state_keys=list(state.keys()),
            state_values=list(state.values()),
            state_sizes=[len(d) for d in state.values()],
            state_tensors=(None if optimizer_other else
                           list(itertools.chain.from_iterable(map(dict.values, state.values())))),
            tensor_dicts=[state_dicts[i] for i, _, _ in optimizer_tensors],
            tensor_keys=[key for _, key, _ in optimizer_tensors],
            tensor_values=[t for _, _, t in optimizer_tensors],
            model_list=list(model_tensors.values()),
            model_addresses=[t.data_ptr() for t in model_tensors.values()],
            other_refs=[(i, key, state_dicts[i]) for i, key in optimizer_other],
        )
        self._fence_pending = False
        _log.info("registered job %s rank %d/%d: %d tensors (%d bytes), %d blobs", self.job_id,
                  self.rank, self.world_size, len(names),
                  sum(e.nbytes for e in entries[: len(names)]), len(self._blobs))

    def _changed(self) -> Optional[str]:
        """Why the registration no longer matches the live model and optimizer, or None when it
        does. The same verdict as `_moved` on the optimizer's state, in a few C-level passes
        instead of a Python loop over every tensor: it runs at every snapshot.

        Every snapshot checks every tensor, since a snapshot must never copy from memory a
        tensor has left (freed and reused, or alive with bytes nothing updates any more): the
        model's tensors by address (``param.data = ...`` keeps the object and moves its memory),
        the optimizer's by identity, with the parameters and ``optimizer.state``'s keys and
        values. No cheaper signal covers it all (a dict gives no sign that one of its values was
        replaced), and a check of some tensors per snapshot would let the others' moves through.
        """
        reg = self._registered
        if reg is None:
            return "nothing is registered yet"
        if list(map(torch.Tensor.data_ptr, reg.model_list)) != reg.model_addresses:
            return self._moved(self._optimizer_state()[0]) or "a model tensor moved"
        optimizer = self.optimizer
        if optimizer is None:
            return None
        if optimizer.state is not reg.optimizer_state:
            return "the optimizer's state was replaced (load_state_dict)"
        params = self._params()
        if len(params) != len(reg.params) or not all(map(operator.is_, params, reg.params)):
            return "the optimizer's parameters changed"
        # optimizer.state's keys and values as lists: no tensor is hashed (Tensor.__hash__ is
        # Python code).
        keys, values = list(optimizer.state.keys()), list(optimizer.state.values())
        if reg.state_tensors is not None:  # every state value a tensor: compare them in order
            same_tensors = all(map(operator.is_,
                                   itertools.chain.from_iterable(map(dict.values, values)),
                                   reg.state_tensors))
        else:
            same_tensors = all(map(operator.is_, map(dict.get, reg.tensor_dicts, reg.tensor_keys),
                                   reg.tensor_values))
        if (len(keys) != len(reg.state_keys) or not all(map(operator.is_, keys, reg.state_keys))
                or not all(map(operator.is_, values, reg.state_values))
                or list(map(len, values)) != reg.state_sizes or not same_tensors):
            return self._moved(self._optimizer_state()[0]) or "the optimizer's state changed"
        return None

    def _moved(self, optimizer_tensors: List[Tuple[int, Any, torch.Tensor]]) -> Optional[str]:
        """Why the registration no longer matches the live tensors (`optimizer_tensors` are the
        optimizer's now), or None when it does."""
        reg = self._registered
        if reg is None:
            return "nothing is registered yet"
        for key, t, address in reg.model_tensors:
            if t.data_ptr() != address:
                return f"model tensor '{key}' moved"
        if self.optimizer is not None:
            registered = reg.optimizer_tensors
            current = optimizer_tensors
            if len(current) != len(registered):
                return (f"the optimizer holds {len(current)} state tensors, "
                        f"{len(registered)} are registered")
            for (i, key, t), (ri, rkey, rt) in zip(current, registered):
                if t is not rt or i != ri or key != rkey:
                    return f"optimizer state tensor {i}.{key} was replaced"
        return None

    def refresh(self) -> None:
        """Registers the model's and optimizer's tensors again (waits for a snapshot in flight).
        Needed after a tensor was replaced in a way a snapshot does not detect (see the module
        docstring)."""
        self._register()

    # -- hooks -----------------------------------------------------------------------------------

    def _stream(self) -> Optional[int]:
        reg = self._registered
        if reg is None or reg.stream_device is None:
            return None
        return torch.cuda.current_stream(reg.stream_device).cuda_stream

    def fence(self) -> None:
        """Makes the current stream (the CPU on host memory) wait for the copies of the snapshot
        in flight. The optimizer hook calls it; call it yourself before changing registered
        tensors any other way."""
        if self._fence_pending and self._client is not None and not self._client.closed:
            self._client.fence(self._stream())
            self._fence_pending = False

    def _install_hooks(self, fence_forward: Optional[bool]) -> None:
        if self.optimizer is not None:
            if hasattr(self.optimizer, "register_step_pre_hook"):  # PyTorch >= 2.0
                self._hook_handles.append(
                    self.optimizer.register_step_pre_hook(lambda *_: self.fence()))
            else:
                # PyTorch < 2.0: wrap the bound method. It stays a bound method so that the LR
                # schedulers of these versions, which wrap optimizer.step again, keep working.
                original = self.optimizer.step
                snapshotter = self

                def step(optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
                    snapshotter.fence()
                    return original(*args, **kwargs)

                step.__doc__ = getattr(original, "__doc__", None)
                # An LR scheduler created earlier marked its own wrapper; keep the mark (the
                # counting still happens inside `original`) so that it does not warn.
                if getattr(original, "_with_counter", False):
                    step._with_counter = True  # type: ignore[attr-defined]
                wrapped = types.MethodType(step, self.optimizer)
                self.optimizer.step = wrapped  # type: ignore[method-assign]
                self._wrapped_step = (wrapped, original)
        if fence_forward is None:
            # Registered buffers (persistent ones, in state_dict) may change in a forward pass.
            parameters = {id(_dtensor.local(p)) for p in self.model.parameters()}
            fence_forward = any(id(t) not in parameters
                                for t in self._model_state(self.model)[0].values())
        if fence_forward:
            self._hook_handles.append(
                self.model.register_forward_pre_hook(lambda *_: self.fence()))

    # -- snapshots -------------------------------------------------------------------------------

    def step(self, step: int) -> bool:
        """Snapshots `step` if it is a multiple of `every`. Call it after the optimizer step.

        Returns:
            Whether a snapshot started.
        """
        return self.maybe_snapshot(step)

    def maybe_snapshot(self, step: int) -> bool:
        """Same as `step`."""
        _check_int(step, "step", 0)
        if step % self.every != 0:
            return False
        return self.snapshot(step)

    def snapshot(self, step: int) -> bool:
        """Starts a snapshot of `step` now, whatever `every` says, and returns at once.

        Steps must increase. The tensors are copied in the background; the blobs (RNG states,
        user dict, optimizer metadata) are pickled here (Python's and NumPy's RNG states only
        when they changed since the last snapshot).

        Returns:
            True when it started, False when it was skipped because the previous snapshot is
            still in flight (when_busy="skip").

        Raises:
            BlobTooLargeError: the user dict (or other blob) outgrew its capacity; nothing was
                snapshotted.
        """
        _check_int(step, "step", 0)
        start = time.perf_counter()
        # The blobs' pickles allocate containers that can trigger a collection of every
        # generation inside this call (milliseconds with a large model): collections wait until
        # it returns, where the loop's own allocations trigger them as they would have anyway.
        collecting = gc.isenabled()
        if collecting:
            gc.disable()
        try:
            return self._snapshot(step, start)
        finally:
            if collecting:
                gc.enable()

    def _snapshot(self, step: int, start: float) -> bool:
        why = self._changed()
        if why is not None:
            if self._registered is not None:
                _log.info("registering again before step %d: %s", step, why)
            self._register()
        reg = self._registered
        assert reg is not None
        optimizer_other = {(i, key): d[key] for i, key, d in reg.other_refs}
        payloads = self._blob_payloads(reg.cuda_devices, reg.has_model_other, optimizer_other)
        blobs = self._blobs
        for name, data in payloads.items():
            assert data is not None
            blobs[name].check_fits(data)
        staged = []
        for name, data in payloads.items():
            blob = blobs[name]
            if data == blob.current:  # often the very object (an unchanged RNG state's pickle)
                continue  # the registered buffer holds it already, and nothing writes there
            assert data is not None
            spare = blob.stage(data)
            self._client._point_entry(blob.index, blob.address(spare), len(data))
            blob.registered = spare
            blob.current = data
            staged.append((blob, spare))
        started = self._client.snapshot(step, self._stream())
        if started:
            for blob, spare in staged:
                blob.in_flight = spare
            self._fence_pending = True
        self.last_snapshot_seconds = time.perf_counter() - start
        self.max_snapshot_seconds = max(self.max_snapshot_seconds, self.last_snapshot_seconds)
        return started

    def set_staging(self, staging: str,
                    staging_budget: Optional[Union[int, float]] = None) -> None:
        """Changes the GPU staging of the snapshots started from now on (see the constructor's
        `staging` and `staging_budget`). No effect on a model without CUDA tensors."""
        if staging not in ("off", "full", "adaptive"):
            raise InvalidArgumentError(
                f"staging must be 'off', 'full' or 'adaptive', got {staging!r}")
        budget_bytes, budget_fraction = _staging_budget(staging_budget)
        self._client.set_staging(staging, budget_bytes, budget_fraction)

    def wait(self) -> None:
        """Blocks until the last started snapshot is sealed; raises its error if it failed."""
        self._client.wait()

    def stats(self) -> Stats:
        """The client's counters (started, skipped, sealed, ...)."""
        return self._client.stats()

    # -- restore ---------------------------------------------------------------------------------

    def _prime_optimizer_state(self) -> Optional[Callable[[], None]]:
        """Creates the optimizer state with one zero-gradient, zero-lr step (as
        torch.distributed.checkpoint does) and puts parameters and gradients back. Returns the
        function that drops that state again, or None when the state existed already."""
        optimizer = self.optimizer
        if optimizer is None or self._has_optimizer_state():
            return None
        params = self._params()
        grads = [p.grad for p in params]
        values = [p.detach().clone() for p in params]
        lrs = [g.get("lr") for g in optimizer.param_groups]
        step_count = optimizer.__dict__.get("_step_count")
        try:
            for p in params:
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
            for g in optimizer.param_groups:
                if "lr" in g:
                    g["lr"] = 0.0
            # The class's step, not the instance's: an LR scheduler's counter must not move.
            type(optimizer).step(optimizer)
        except Exception as e:
            optimizer.state.clear()
            raise FailedPreconditionError(
                f"could not create the state of {type(optimizer).__name__} by a zero-gradient "
                f"step ({e!r}); create the Snapshotter after the first optimizer.step()"
            ) from e
        finally:
            for g, lr in zip(optimizer.param_groups, lrs):
                if lr is not None:
                    g["lr"] = lr
            with torch.no_grad():
                for p, value in zip(params, values):
                    p.copy_(value)
            for p, grad in zip(params, grads):
                p.grad = grad
            if step_count is not None:
                optimizer._step_count = step_count  # type: ignore[attr-defined]

        def drop() -> None:
            optimizer.state.clear()
            self._registered = None

        return drop

    def restore_latest(self) -> Optional[int]:
        """Restores the newest snapshot this rank's daemon holds, in place, and returns its step
        (the loop continues at step + 1); None when there is nothing to restore.

        Everything is restored, in this order: model and optimizer tensors, the optimizer's
        non-tensor state and hyperparameters, each object of `stateful` (its
        ``load_state_dict``), the user dict (a dict updated in place; `restored_user_state`; then
        `load_user_state`), and last the RNG states. A `user_state` callable is not called. When
        torch.distributed is initialized, every rank must call this: the ranks agree on one step
        or all raise.

        Raises:
            FailedPreconditionError: the snapshot does not match the model and optimizer (a
                shape, dtype or tensor changed); the message lists the differences, and nothing
                was restored.
            DataLossError: the snapshot is damaged.
        """
        drop = self._prime_optimizer_state()
        if not self._snapshot_has_layout():
            _log.info("job %s rank %d: the snapshot predates the layout blob; it is restored "
                      "without, and the next snapshot registers with it", self.job_id, self.rank)
            self._with_layout = False
            self._registered = None
        try:
            if self._moved(self._optimizer_state()[0]) is not None:
                self._register()
            error: Optional[TesseraError] = None
            step: Optional[int] = None
            try:
                step = self._client.restore(-1)
            except NotFoundError as e:
                _log.info("nothing to restore for job %s rank %d: %s", self.job_id, self.rank, e)
            except FailedPreconditionError as e:
                error = e
                if drop is not None:
                    # The snapshot may predate the optimizer's first step (a GradScaler skips the
                    # steps whose gradients overflow, often the first ones): try it without the
                    # state primed for it. It is dropped either way, as an optimizer that has
                    # not stepped has none. In a DP group every member does the same, together:
                    # their models and optimizers are replicated, so each primed the same state
                    # and each is refused alike, before any member's slice is gathered.
                    drop()
                    drop = None
                    self._register()
                    try:
                        step = self._client.restore(-1)
                        error = None
                    except FailedPreconditionError:
                        pass  # the first error says what differs, with the optimizer state
                    except TesseraError as retry_error:
                        error = retry_error
                if error is not None and ("'blob.state." in str(e) or "'blob.user'" in str(e)):
                    error = FailedPreconditionError(
                        f"{e}. stateful= must name the same objects, and user_state_capacity= and "
                        "stateful_capacity= (or their defaults) must give the same capacities, "
                        "as in the run that took the snapshot")
            except TesseraError as e:
                error = e  # raised after the other ranks heard of it, so none waits forever
            step = self._agree(step, error)
        except BaseException:
            if drop is not None:
                drop()
            raise
        finally:
            if not self._with_layout:
                self._with_layout = True
                self._registered = None  # the next snapshot registers with the layout blob
        if step is None:
            if drop is not None:
                drop()
            return None
        self._apply_blobs(step)
        self.restored_step = step
        _log.info("restored job %s rank %d from step %d", self.job_id, self.rank, step)
        return step

    def _snapshot_has_layout(self) -> bool:
        """Whether this rank's newest snapshot here carries the layout blob (False for one a
        Snapshotter of an earlier version took, which is then restored without it). True when
        there is none to look at."""
        try:
            manifest = self._client.read_manifest(self.job_id, self.rank, -1)
        except TesseraError:
            return True
        return any(e.name == "blob.layout" for e in manifest.entries)

    def _agree(self, step: Optional[int], error: Optional[TesseraError]) -> Optional[int]:
        """Makes every rank hold the same step (torch.distributed only); raises `error` here, and
        an error on every other rank, when one rank failed."""
        dist = torch.distributed
        if self.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            if error is not None:
                raise error
            return step
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())

        def gather(value: int) -> List[int]:
            mine = torch.tensor([value], dtype=torch.int64, device=device)
            out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(out, mine)
            return [int(t.item()) for t in out]

        errors = gather(0 if error is None else 1)
        if error is not None:
            raise error
        if any(errors):
            failed_ranks = [r for r, e in enumerate(errors) if e]
            raise FailedPreconditionError(
                f"restore failed on rank(s) {failed_ranks} (their exceptions say why), so the "
                "job cannot resume from a snapshot; this rank's state may already hold one and "
                "is not usable on its own"
            )
        steps = gather(-1 if step is None else step)
        if len(set(steps)) == 1:
            return step
        held = ", ".join(f"rank {r}: {'none' if s < 0 else s}" for r, s in enumerate(steps))
        problem = ""
        target = min(steps)
        if target >= 0 and step != target:
            try:
                self._client.restore(target)
            except TesseraError as e:
                problem = str(e)
        failed = gather(1 if problem or target < 0 else 0)
        if any(failed):
            raise FailedPreconditionError(
                f"the ranks hold different newest steps ({held}) and step {target} cannot be "
                f"restored on every rank" + (f" (here: {problem})" if problem else "") +
                ". Ranks whose daemons are not members of one cluster restore independently "
                "and can disagree; resume from your persistent checkpoint "
                "under a new job id, or drop these snapshots first (Snapshotter.close(drop=True) "
                "on every rank)"
            )
        return target

    def _apply_blobs(self, step: int) -> None:
        values: Dict[str, bytes] = {}
        for name, blob in self._blobs.items():
            values[name] = blob.read(self._client.entry_length(blob.index))
            blob.current = None  # the restore wrote the registered buffer
        try:
            meta = pickle.loads(values["meta"])
            if meta.get("format") not in (1, _META_FORMAT):
                raise ValueError(f"metadata format {meta.get('format')!r}")
            model_other = meta["model_other"]
            if isinstance(model_other, bytes):  # format 2
                model_other = pickle.loads(model_other) if model_other else {}
            user = pickle.loads(values["user"])
            python_rng = pickle.loads(values["rng.python"])
            numpy_rng = pickle.loads(values["rng.numpy"]) if "rng.numpy" in values else None
            cuda_rng = pickle.loads(values["rng.torch_cuda"]) if "rng.torch_cuda" in values else {}
            stateful = {name: pickle.loads(values[f"state.{name}"]) for name in self._stateful}
        except Exception as e:
            raise DataLossError(f"step {step}: a restored blob does not unpickle: {e!r}") from e

        # The optimizer first: a scheduler loaded after it sees the restored learning rates.
        if self.optimizer is not None:
            params = self._params()
            for (i, key), value in meta["optimizer_state"].items():
                self.optimizer.state[params[i]][key] = value
            for group, saved in zip(self.optimizer.param_groups, meta["param_groups"]):
                group.update(saved)
        if model_other:
            self.model.load_state_dict(model_other, strict=False)

        for name, obj in self._stateful.items():
            try:
                obj.load_state_dict(stateful[name])
            except Exception as e:
                raise FailedPreconditionError(
                    f"step {step}: stateful[{name!r}] ({type(obj).__name__}) does not load the "
                    f"state it saved: {e!r}. The model, the optimizer and the stateful objects "
                    f"before it are restored already; pass the same kind of object under this "
                    "name as the run that took the snapshot (e.g. a GradScaler enabled in both)"
                ) from e

        self.restored_user_state = user
        if isinstance(self._user_state, MutableMapping):
            self._user_state.clear()
            self._user_state.update(user)
        if self._load_user_state is not None:
            self._load_user_state(user)

        # The RNG states last, so that nothing a load_state_dict or load_user_state draws moves
        # them.
        torch.set_rng_state(torch.frombuffer(bytearray(values["rng.torch_cpu"]), dtype=torch.uint8))
        for device, state in cuda_rng.items():
            torch.cuda.set_rng_state(torch.frombuffer(bytearray(state), dtype=torch.uint8), device)
        random.setstate(python_rng)
        if numpy_rng is not None and _np is not None:
            _np.random.set_state(numpy_rng)

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self, drop: bool = False) -> None:
        """Waits for a snapshot in flight, removes the hooks and unregisters. Idempotent.

        Args:
            drop: also delete this rank's snapshots from the daemon. Call ``close(drop=True)`` on
                every rank when the run has finished, so that the next launch with the same job
                id starts afresh instead of resuming it (``with Snapshotter(...)`` keeps them;
                operators can drop a job with ``tessera drop JOB``).
        """
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        if self._wrapped_step is not None and self.optimizer is not None:
            wrapped, original = self._wrapped_step
            if self.optimizer.__dict__.get("step") is wrapped:
                self.optimizer.step = original  # type: ignore[method-assign]
            self._wrapped_step = None
        client = getattr(self, "_client", None)
        if client is not None:
            client.close(drop=drop)

    def __enter__(self) -> "Snapshotter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
