"""Fixtures for the Python tests: a real tesserad per test, and the paths the trainers need.

Binaries come from the environment, defaulting to a Bazel build of this tree:
  TESSERAD          tesserad        (default bazel-bin/daemon/tesserad)
  TESSERA_LIBRARY   libtessera.so   (default bazel-bin/agent/libtessera.so)
  TESSERA_CLI       tessera         (default bazel-bin/cli/tessera)
A missing binary fails the tests that need it; nothing is skipped for want of a build.
"""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON_PACKAGE = REPO / "agent" / "python"
TESSERAD = Path(os.environ.get("TESSERAD") or REPO / "bazel-bin" / "daemon" / "tesserad")
LIBRARY = Path(os.environ.get("TESSERA_LIBRARY") or REPO / "bazel-bin" / "agent" / "libtessera.so")
CLI = Path(os.environ.get("TESSERA_CLI") or REPO / "bazel-bin" / "cli" / "tessera")

# In-process tests import the package from the tree and load the library under test.
sys.path.insert(0, str(PYTHON_PACKAGE))
os.environ["TESSERA_LIBRARY"] = str(LIBRARY)


def _require(path: Path, what: str, build: str) -> None:
    if not path.is_file():
        pytest.fail(f"{what} not found at {path}: build it with `bazel build {build}` or set "
                    f"the environment variable {what}", pytrace=False)


@pytest.fixture(scope="session")
def library_path() -> Path:
    _require(LIBRARY, "TESSERA_LIBRARY", "//agent:libtessera.so")
    return LIBRARY


@pytest.fixture(scope="session")
def cli_path() -> Path:
    _require(CLI, "TESSERA_CLI", "//cli:tessera")
    return CLI


# Ports for test servers, reserved as tests/ports.h reserves them (the same lock files, so C++
# and Python tests running at once exclude each other): outside the kernel's ephemeral range,
# which binds to port 0 and outgoing connections draw from; an flock held on
# <PORT_LOCK_DIRECTORY>/<port>.lock for the life of this process; bindable when reserved.
PORT_LOCK_DIRECTORY = Path("/tmp/tessera-test-ports")
_reserved_port_locks: List[int] = []  # open lock files: closing one would release its port


def _ephemeral_port_range() -> range:
    try:
        first, last = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        first, last = 32768, 60999
    return range(first, last + 1)


def free_port() -> int:
    """A port (TCP and UDP) on 127.0.0.1 that no other test process can take while this one runs."""
    ephemeral = _ephemeral_port_range()
    candidates = [p for p in range(10000, 65536) if p not in ephemeral]
    try:
        PORT_LOCK_DIRECTORY.mkdir(mode=0o1777)
        PORT_LOCK_DIRECTORY.chmod(0o1777)  # past the umask: every user's tests share it
    except FileExistsError:
        pass
    start = random.randrange(len(candidates))
    for i in range(len(candidates)):
        port = candidates[(start + i) % len(candidates)]
        try:
            fd = os.open(PORT_LOCK_DIRECTORY / f"{port}.lock", os.O_RDONLY | os.O_CREAT, 0o666)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # No SO_REUSEADDR, as tests/ports.cc checks; UDP too (membership datagrams).
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                with socket.socket(socket.AF_INET, kind) as s:
                    s.bind(("127.0.0.1", port))
        except OSError:  # reserved by another process, or in use
            os.close(fd)
            continue
        _reserved_port_locks.append(fd)
        return port
    raise RuntimeError(f"no port left to reserve: all {len(candidates)} candidates outside the "
                       f"ephemeral range are reserved or in use (locks in {PORT_LOCK_DIRECTORY})")


class Daemon:
    """A tesserad process with its own store directory (under /dev/shm) and socket."""

    def __init__(self, workdir: Path, extra_args: Optional[List[str]] = None) -> None:
        self.extra_args = list(extra_args or [])  # more --set key=value for tesserad
        self.store = Path(tempfile.mkdtemp(prefix="tessera-test-", dir="/dev/shm"))
        # A short path: Unix socket paths are limited to 107 bytes.
        self.socket_dir = Path(tempfile.mkdtemp(prefix="tsr"))
        self.socket = self.socket_dir / "agent.sock"
        self.log_path = workdir / "tesserad.log"
        self.process: Optional[subprocess.Popen] = None

    def start(self, timeout_s: float = 20.0) -> None:
        """Starts tesserad (again, on the same store) and waits until it serves."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [str(TESSERAD), "--set", "node.id=n0", "--set", f"store.directory={self.store}",
             "--set", f"agent.socket_path={self.socket}", "--set", "store.capacity_bytes=1GiB",
             *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"tesserad exited with {self.process.returncode} at start:\n"
                            + self.log(), pytrace=False)
            if self.socket.exists() and b" ready" in self.log_path.read_bytes()[offset:]:
                return
            time.sleep(0.02)
        pytest.fail(f"tesserad did not get ready in {timeout_s} s:\n" + self.log(), pytrace=False)

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process is None:
            return 0
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def kill(self) -> None:
        """SIGKILL: the daemon dies at an arbitrary instant."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def slot_holding(self, pattern: bytes) -> Tuple[Path, int]:
        """The slot file of this daemon's store that holds `pattern`, and where in it (a test
        damages a snapshot there)."""
        for path in sorted(self.store.glob("*/*.slot")):
            at = path.read_bytes().find(pattern)
            if at >= 0:
                return path, at
        raise AssertionError("no slot holds the pattern")

    def env(self, job_id: str) -> Dict[str, str]:
        """The environment of a trainer that talks to this daemon as job `job_id`."""
        env = dict(os.environ)
        env.update({
            "TESSERA_SOCKET": str(self.socket),
            "TESSERA_JOB_ID": job_id,
            "TESSERA_LIBRARY": str(LIBRARY),
            "PYTHONPATH": os.pathsep.join(
                [str(PYTHON_PACKAGE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
            "OMP_NUM_THREADS": "1",
        })
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID",
                     "TORCHELASTIC_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)
        return env

    def cleanup(self) -> None:
        shutil.rmtree(self.store, ignore_errors=True)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def cluster_daemons(tmp_path: Path, count: int, token: str, k: int, m: int,
                    extra: Optional[List[str]] = None) -> List[Daemon]:
    """`count` daemons n0.. of one token cluster on free ports (RS(k, m), 100 ms heartbeats),
    each with a work directory under tmp_path; not started."""
    ports = [free_port() for _ in range(count)]
    members = ",".join(f"127.0.0.1:{p}" for p in ports)
    daemons = []
    for i, port in enumerate(ports):
        (tmp_path / f"n{i}").mkdir()
        daemons.append(Daemon(tmp_path / f"n{i}", [
            "--set", f"node.id=n{i}", "--set", f"peer.listen_address=127.0.0.1:{port}",
            "--set", f"cluster.members={members}", "--set", f"cluster.token={token}",
            "--set", f"ec.k={k}", "--set", f"ec.m={m}", "--set", "liveness.heartbeat_ms=100",
            "--set", "liveness.timeout_ms=1000", *(extra or [])]))
    return daemons


@pytest.fixture
def daemon(tmp_path: Path, library_path: Path) -> Iterator[Daemon]:
    """A running tesserad; after the test it must exit 0 on SIGTERM."""
    _require(TESSERAD, "TESSERAD", "//daemon:tesserad")
    d = Daemon(tmp_path)
    d.start()
    try:
        yield d
    finally:
        code = d.stop()
        d.cleanup()
    if code != 0:
        pytest.fail(f"tesserad exited with {code} on SIGTERM:\n{d.log()}", pytrace=False)
