"""Tessera: a training job's state kept in a daemon's shared memory, so a crashed trainer resumes
from its last snapshot in seconds.

This package is pure Python: it loads ``libtessera.so`` through ctypes (see `tessera._lib` for
where it is looked for). `Client` is the raw, framework-free API; ``tessera.torch`` (imported
separately, it needs PyTorch) protects a PyTorch training loop::

    import tessera.torch
    snapshotter = tessera.torch.Snapshotter(model, optimizer, every=100)

``tessera.dcp`` (imported separately) stores ``torch.distributed.checkpoint`` checkpoints in the
daemons and loads them into the same or another parallel layout.
"""

from ._lib import library_path
from ._lib import version as library_version
from .client import (DTYPE_BYTES, Client, DataParallelGroup, Entry, EntryKind, EntrySlice,
                     SnapshotCopy, SnapshotEntry, SnapshotManifest, Stats, Version,
                     read_snapshot)
from .errors import (
    AbortedError,
    AlreadyExistsError,
    BlobTooLargeError,
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LibraryNotFoundError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    TesseraError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
)

__version__ = "0.1.0"

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "BlobTooLargeError",
    "CancelledError",
    "Client",
    "DTYPE_BYTES",
    "DataLossError",
    "DataParallelGroup",
    "DeadlineExceededError",
    "Entry",
    "EntryKind",
    "EntrySlice",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "LibraryNotFoundError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "SnapshotCopy",
    "SnapshotEntry",
    "SnapshotManifest",
    "Stats",
    "TesseraError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "Version",
    "library_path",
    "library_version",
    "read_snapshot",
]
