"""Exceptions raised by the tessera package.

Every error that comes back from ``libtessera.so`` is raised as a subclass of `TesseraError` chosen
by its canonical status code, carrying the library's (usually the daemon's) message verbatim.
Errors found in Python before anything reaches the library use the same classes, so one
``except tessera.FailedPreconditionError`` covers both. Wrong Python types raise ``TypeError``.

The classes whose meaning matches a built-in exception also derive from it:
`InvalidArgumentError` and `OutOfRangeError` are ``ValueError``\\ s, `NotFoundError` is a
``LookupError``.
"""

from __future__ import annotations

from typing import Dict, Optional, Type

# absl / gRPC canonical codes, as the C ABI returns them (negated).
CANONICAL_CODE_NAMES: Dict[int, str] = {
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}


class TesseraError(Exception):
    """Base class of every Tessera error.

    Attributes:
        code: the canonical status code (3 for INVALID_ARGUMENT, ...), or None for errors that
            have none (the library could not be loaded).
        message: the message, without the code's name.
    """

    code: Optional[int] = None

    def __init__(self, message: str, code: Optional[int] = None) -> None:
        if code is not None:
            self.code = code
        self.message = message
        super().__init__(message)

    @property
    def code_name(self) -> str:
        """The canonical code's name, e.g. ``"NOT_FOUND"`` ("" when there is no code)."""
        if self.code is None:
            return ""
        return CANONICAL_CODE_NAMES.get(self.code, f"CODE_{self.code}")

    def __str__(self) -> str:
        name = self.code_name
        # The C ABI's messages already start with "CODE_NAME: " (absl::Status::ToString()).
        if not name or self.message.startswith(name + ":"):
            return self.message
        return f"{name}: {self.message}"


class CancelledError(TesseraError):
    """The operation was cancelled."""

    code = 1


class UnknownError(TesseraError):
    """An error without a more specific code."""

    code = 2


class InvalidArgumentError(TesseraError, ValueError):
    """A request was malformed: bad entry, dtype, shape, job id, step, ..."""

    code = 3


class DeadlineExceededError(TesseraError):
    """A call to the daemon timed out."""

    code = 4


class NotFoundError(TesseraError, LookupError):
    """Nothing to restore, or the daemon does not know the job or rank."""

    code = 5


class AlreadyExistsError(TesseraError):
    """The object already exists."""

    code = 6


class PermissionDeniedError(TesseraError):
    """The snapshots belong to another user."""

    code = 7


class ResourceExhaustedError(TesseraError):
    """The daemon's shared memory is full (the message has the bytes asked and free)."""

    code = 8


class FailedPreconditionError(TesseraError):
    """The call does not fit the current state: a snapshot that does not match the registered
    model (the message lists the differences; nothing was restored), a rank held by another
    live process, steps that do not increase, a closed client, ..."""

    code = 9


class AbortedError(TesseraError):
    """The operation was abandoned; restart the snapshot."""

    code = 10


class OutOfRangeError(TesseraError, ValueError):
    """A value is outside its valid range."""

    code = 11


class UnimplementedError(TesseraError):
    """The library or daemon does not implement this."""

    code = 12


class InternalError(TesseraError):
    """An internal invariant failed: a bug to report."""

    code = 13


class UnavailableError(TesseraError):
    """No daemon answers on the socket; retrying later may succeed."""

    code = 14


class DataLossError(TesseraError):
    """A checksum failed or stored data does not parse."""

    code = 15


class UnauthenticatedError(TesseraError):
    """The caller could not be identified (connect through the agent Unix socket)."""

    code = 16


class LibraryNotFoundError(TesseraError, OSError):
    """``libtessera.so`` could not be found or loaded; the message lists where it was looked for."""


class BlobTooLargeError(InvalidArgumentError):
    """A blob (pickled user state, RNG state, optimizer metadata) outgrew the capacity it was
    registered with."""


_BY_CODE: Dict[int, Type[TesseraError]] = {
    cls.code: cls  # type: ignore[misc]
    for cls in (
        CancelledError,
        UnknownError,
        InvalidArgumentError,
        DeadlineExceededError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        ResourceExhaustedError,
        FailedPreconditionError,
        AbortedError,
        OutOfRangeError,
        UnimplementedError,
        InternalError,
        UnavailableError,
        DataLossError,
        UnauthenticatedError,
    )
}


def error_for_code(code: int, message: str) -> TesseraError:
    """Returns the exception for canonical `code` (a positive number) with `message`."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return TesseraError(message, code=code)
    return cls(message)
