"""Loads ``libtessera.so`` through ctypes and declares the C ABI of ``agent/tessera.h``.

The library is looked for, in order:

1. the path in the environment variable ``TESSERA_LIBRARY`` (an error if it does not load);
2. next to the package: ``tessera/libtessera.so`` and the folder that holds ``tessera/``;
3. a Bazel build of the source tree the package sits in: ``<repo>/bazel-bin/agent/libtessera.so``,
   found by walking up from the package, and ``./bazel-bin/agent/libtessera.so`` from the
   current directory;
4. the system loader (``libtessera.so`` on ``LD_LIBRARY_PATH`` or in the linker cache).

Nothing is loaded at import time: `library()` loads on first use and caches the handle.
Every C call goes through `check`, which turns a negative return into the `TesseraError`
subclass of its canonical code, with the message of ``tessera_last_error()``.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from typing import List, Optional

from .errors import LibraryNotFoundError, error_for_code

LIBRARY_NAME = "libtessera.so"
LIBRARY_ENV = "TESSERA_LIBRARY"

ENTRY_TENSOR = 1
ENTRY_BLOB = 2
WHEN_BUSY_SKIP = 0
WHEN_BUSY_WAIT = 1
SNAPSHOT_STARTED = 0
SNAPSHOT_SKIPPED = 1
GATHER_NOTE_BYTES = 256


class CEntry(ctypes.Structure):
    """``tessera_entry``."""

    _fields_ = [
        ("name", ctypes.c_char_p),
        ("dtype", ctypes.c_char_p),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("ndim", ctypes.c_int32),
        ("kind", ctypes.c_int32),
        ("nbytes", ctypes.c_uint64),
        ("data", ctypes.c_void_p),
        ("length", ctypes.c_uint64),
    ]


class CStats(ctypes.Structure):
    """``tessera_stats``."""

    _fields_ = [
        ("started", ctypes.c_uint64),
        ("skipped", ctypes.c_uint64),
        ("busy_waits", ctypes.c_uint64),
        ("busy_wait_ns", ctypes.c_uint64),
        ("sealed", ctypes.c_uint64),
        ("failed", ctypes.c_uint64),
        ("bytes_copied", ctypes.c_uint64),
        ("last_sealed_step", ctypes.c_int64),
        ("has_gpu", ctypes.c_int32),
        ("bytes_staged", ctypes.c_uint64),
        ("plan_staged_bytes", ctypes.c_uint64),
        ("plan_device_to_host_bytes", ctypes.c_uint64),
        ("plan_expected_stall_ns", ctypes.c_int64),
        ("window_ns", ctypes.c_int64),
        ("d2h_bytes_per_s", ctypes.c_double),
        ("d2d_bytes_per_s", ctypes.c_double),
        ("staging_buffer_bytes", ctypes.c_uint64),
        ("staging_budget_short", ctypes.c_uint64),
        ("staging_alloc_failures", ctypes.c_uint64),
        ("fence_cpu_waits", ctypes.c_uint64),
        ("dp_size", ctypes.c_uint32),
        ("gathered_with_nccl", ctypes.c_int32),
        ("bytes_gathered", ctypes.c_uint64),
        ("gather_note", ctypes.c_char * GATHER_NOTE_BYTES),
    ]


class CVersionInfo(ctypes.Structure):
    """``tessera_version_info``."""

    _fields_ = [
        ("rank", ctypes.c_uint32),
        ("step", ctypes.c_int64),
        ("payload_bytes", ctypes.c_uint64),
        ("payload_crc32c", ctypes.c_uint32),
        ("sealed", ctypes.c_int32),
    ]


_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_library_path: Optional[str] = None


def candidate_paths() -> List[str]:
    """The places `library()` tries after ``TESSERA_LIBRARY``, in order (they may not exist)."""
    package_dir = Path(__file__).resolve().parent
    candidates = [package_dir / LIBRARY_NAME, package_dir.parent / LIBRARY_NAME]
    # agent/python/tessera -> the repository root is three levels up; keep walking up a little in
    # case the package was copied somewhere deeper inside the tree.
    for parent in list(package_dir.parents)[:6]:
        candidates.append(parent / "bazel-bin" / "agent" / LIBRARY_NAME)
    candidates.append(Path.cwd() / "bazel-bin" / "agent" / LIBRARY_NAME)
    seen = set()
    out = []
    for path in candidates:
        text = str(path)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def _declare(lib: ctypes.CDLL) -> None:
    c_client_p = ctypes.c_void_p
    signatures = {
        "tessera_version": ([], ctypes.c_char_p),
        "tessera_last_error": ([], ctypes.c_char_p),
        "tessera_connect": (
            [ctypes.c_char_p, ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(c_client_p)],
            ctypes.c_int,
        ),
        "tessera_register": (
            [
                c_client_p,
                ctypes.c_char_p,
                ctypes.c_uint32,
                ctypes.c_uint32,
                ctypes.POINTER(CEntry),
                ctypes.c_size_t,
            ],
            ctypes.c_int,
        ),
        "tessera_update_entry": (
            [c_client_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_uint64],
            ctypes.c_int,
        ),
        "tessera_snapshot": ([c_client_p, ctypes.c_int64, ctypes.c_void_p], ctypes.c_int),
        "tessera_fence": ([c_client_p, ctypes.c_void_p], ctypes.c_int),
        "tessera_wait": ([c_client_p], ctypes.c_int),
        "tessera_restore": (
            [c_client_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)],
            ctypes.c_int,
        ),
        "tessera_entry_length": (
            [c_client_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_uint64)],
            ctypes.c_int,
        ),
        "tessera_get_stats": ([c_client_p, ctypes.POINTER(CStats)], ctypes.c_int),
        "tessera_list_versions": (
            [c_client_p, ctypes.c_char_p, ctypes.POINTER(CVersionInfo), ctypes.c_size_t,
             ctypes.POINTER(ctypes.c_size_t)],
            ctypes.c_int,
        ),
        "tessera_set_staging": (
            [c_client_p, ctypes.c_char_p, ctypes.c_uint64, ctypes.c_double],
            ctypes.c_int,
        ),
        "tessera_set_data_parallel": (
            [c_client_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_size_t,
             ctypes.POINTER(ctypes.c_uint8), ctypes.c_size_t],
            ctypes.c_int,
        ),
        "tessera_read_manifest": (
            [c_client_p, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_int64,
             ctypes.POINTER(ctypes.c_char), ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)],
            ctypes.c_int,
        ),
        "tessera_read_range": (
            [c_client_p, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_int64, ctypes.c_char_p,
             ctypes.c_uint64, ctypes.c_uint64, ctypes.c_void_p],
            ctypes.c_int,
        ),
        "tessera_close": ([c_client_p, ctypes.c_int32], ctypes.c_int),
    }
    for name, (argtypes, restype) in signatures.items():
        try:
            function = getattr(lib, name)
        except AttributeError as e:
            raise LibraryNotFoundError(
                f"{lib._name} does not export {name}: it is not a libtessera.so of this "
                "package's version"
            ) from e
        function.argtypes = argtypes
        function.restype = restype


def _load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    _declare(lib)
    return lib


def library() -> ctypes.CDLL:
    """Loads (once) and returns ``libtessera.so`` with its functions declared.

    Raises:
        LibraryNotFoundError: no candidate loads; the message lists every place tried and why.
    """
    global _library, _library_path
    with _lock:
        if _library is not None:
            return _library
        explicit = os.environ.get(LIBRARY_ENV, "")
        if explicit:
            try:
                _library = _load(explicit)
            except OSError as e:
                raise LibraryNotFoundError(
                    f"{LIBRARY_ENV}={explicit} does not load: {e}"
                ) from e
            _library_path = explicit
            return _library
        tried = []
        for path in candidate_paths():
            if not os.path.exists(path):
                tried.append(f"{path} (missing)")
                continue
            try:
                _library = _load(path)
            except OSError as e:
                tried.append(f"{path} ({e})")
                continue
            _library_path = path
            return _library
        try:
            _library = _load(LIBRARY_NAME)
            _library_path = LIBRARY_NAME
            return _library
        except OSError as e:
            tried.append(f"{LIBRARY_NAME} through the system loader ({e})")
        raise LibraryNotFoundError(
            "libtessera.so not found; build it with `bazel build //agent:libtessera.so` and set "
            f"{LIBRARY_ENV} to its path. Tried: " + "; ".join(tried)
        )


# The calls of the training loop that return at once (snapshot under when_busy="skip", fence,
# update_entry), through a handle that keeps the GIL: a ctypes.CDLL call releases it, and taking
# it back after another Python thread (a DataLoader's pin-memory thread, a logger) got it can wait
# out that thread's switch interval, 5 ms by default, on the training thread.
_FAST_SIGNATURES = ("tessera_snapshot", "tessera_fence", "tessera_update_entry")
_fast_library: Optional[ctypes.PyDLL] = None


def fast_library() -> ctypes.PyDLL:
    """The loaded library through a `ctypes.PyDLL` handle (the GIL held during calls), with the
    non-blocking calls of the training loop declared: ``tessera_snapshot``, ``tessera_fence``,
    ``tessera_update_entry``."""
    global _fast_library
    lib = library()
    with _lock:
        if _fast_library is None:
            fast = ctypes.PyDLL(_library_path or LIBRARY_NAME)
            for name in _FAST_SIGNATURES:
                function = getattr(fast, name)
                function.argtypes = getattr(lib, name).argtypes
                function.restype = getattr(lib, name).restype
            _fast_library = fast
        return _fast_library


def library_path() -> Optional[str]:
    """The path `library()` loaded, or None before it has."""
    return _library_path


def last_error() -> str:
    """The message of the last failed C call on this thread."""
    raw = library().tessera_last_error()
    return raw.decode("utf-8", errors="replace") if raw else ""


def check(rc: int, what: str = "") -> int:
    """Returns `rc` when it is >= 0; otherwise raises the error for ``-rc``.

    Args:
        rc: a C ABI return value.
        what: what was being done, prefixed to the message when the library gives none.
    """
    if rc >= 0:
        return rc
    message = last_error()
    if not message:
        message = f"{what} failed with code {-rc}" if what else f"failed with code {-rc}"
    raise error_for_code(-rc, message)


def version() -> str:
    """The version string of the loaded ``libtessera.so``."""
    raw = library().tessera_version()
    return raw.decode("utf-8", errors="replace") if raw else ""
