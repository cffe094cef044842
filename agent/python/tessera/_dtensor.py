"""DTensor state (FSDP2 ``fully_shard``, tensor parallelism, HSDP on torch >= 2.4).

A DTensor has no storage of its own: each rank holds a local shard (``_local_tensor``), and the
DTensor's mesh and placements say where that shard lies in the global tensor. The Snapshotter
registers the local shard by address, exactly as it registers a plain tensor, so a snapshot and a
restore in place cost the same; this module finds the shard and describes its place, which the
snapshot records (its ``layout`` blob, key ``"dtensors"``) for readers that reshard (DCP's planner
needs the fully qualified name, the global shape, the dtype, and the local chunk's offsets and
lengths).

Without DTensor (torch < 2.4, or torch 1.13 as Debian ships it) every function here treats every
tensor as plain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

try:  # torch >= 2.5
    from torch.distributed.tensor import DTensor as _DTensor  # type: ignore[attr-defined]
except Exception:  # pragma: no cover - depends on the torch version
    try:  # torch 2.4
        from torch.distributed._tensor import DTensor as _DTensor  # type: ignore
    except Exception:
        _DTensor = None

_compute_local: Any = None
if _DTensor is not None:  # pragma: no cover - torch 2.x only
    try:
        from torch.distributed.tensor._utils import (  # type: ignore
            compute_local_shape_and_global_offset as _compute_local)
    except Exception:
        try:
            from torch.distributed._tensor._utils import (  # type: ignore
                compute_local_shape_and_global_offset as _compute_local)
        except Exception:
            _compute_local = None


def available() -> bool:
    """Whether this torch has DTensor."""
    return _DTensor is not None


def is_dtensor(value: Any) -> bool:
    return _DTensor is not None and isinstance(value, _DTensor)


@dataclass(frozen=True)
class Placement:
    """Where one rank's local shard of a DTensor lies in the global tensor."""

    global_shape: Tuple[int, ...]
    offsets: Tuple[int, ...]   # of the local chunk, per dimension
    lengths: Tuple[int, ...]   # of the local chunk (its shape)
    dtype: str
    mesh_shape: Tuple[int, ...]
    mesh_dim_names: Tuple[str, ...]
    placements: Tuple[str, ...]  # e.g. ("Shard(dim=0)", "Replicate()")

    def as_dict(self) -> Dict[str, Any]:
        return {
            "global_shape": list(self.global_shape),
            "offsets": list(self.offsets),
            "lengths": list(self.lengths),
            "dtype": self.dtype,
            "mesh_shape": list(self.mesh_shape),
            "mesh_dim_names": list(self.mesh_dim_names),
            "placements": list(self.placements),
        }


def local(value: torch.Tensor) -> torch.Tensor:
    """The tensor whose memory holds `value`'s bytes on this rank: a DTensor's local shard, or
    `value` itself."""
    if is_dtensor(value):
        return value._local_tensor  # the shard itself, not a view: its address is stable
    return value


def placement(name: str, value: torch.Tensor) -> Optional[Placement]:
    """The place of this rank's shard of DTensor `value` (None for a plain tensor).

    Raises ValueError naming the tensor when the local shard does not match what its mesh and
    placements say (a DTensor built with a wrong shape): a snapshot of it could not be placed
    by a reader.
    """
    if not is_dtensor(value):
        return None
    shard = value._local_tensor
    mesh = value.device_mesh
    placements = tuple(value.placements)
    global_shape = tuple(int(d) for d in value.shape)
    if _compute_local is not None:
        lengths, offsets = _compute_local(value.shape, mesh, placements)
        lengths = tuple(int(d) for d in lengths)
        offsets = tuple(int(d) for d in offsets)
    else:  # pragma: no cover - every torch with DTensor has the helper
        lengths, offsets = tuple(int(d) for d in shard.shape), (0,) * len(global_shape)
    if lengths != tuple(int(d) for d in shard.shape):
        raise ValueError(
            f"DTensor '{name}': its local shard has shape {tuple(shard.shape)}, but its mesh "
            f"{tuple(mesh.shape)} and placements {placements} give this rank a chunk of "
            f"{lengths} at {offsets}; build it with DTensor.from_local(..., shape=, stride=)")
    names = getattr(mesh, "mesh_dim_names", None) or ()
    return Placement(
        global_shape=global_shape,
        offsets=offsets,
        lengths=lengths,
        dtype=str(value.dtype).replace("torch.", ""),
        mesh_shape=tuple(int(d) for d in mesh.shape),
        mesh_dim_names=tuple(str(n) for n in names),
        placements=tuple(repr(p) for p in placements),
    )
