"""free_port(): the Python side of tests/ports.h (the same lock files and range)."""

from __future__ import annotations

import subprocess
import sys

from conftest import PORT_LOCK_DIRECTORY, _ephemeral_port_range, free_port

# Another process tries to lock each port's file as tests/ports.cc does; prints those it got.
_TRY_LOCKS = """
import fcntl, os, sys
got = []
for port in sys.argv[2:]:
    fd = os.open(f"{sys.argv[1]}/{port}.lock", os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        got.append(port)
    except BlockingIOError:
        pass
print(" ".join(got))
"""


def test_free_ports_are_distinct_outside_the_ephemeral_range_and_held_against_other_processes():
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == len(ports), ports
    ephemeral = _ephemeral_port_range()
    assert not [p for p in ports if p in ephemeral], (ports, ephemeral)
    other = subprocess.run([sys.executable, "-c", _TRY_LOCKS, str(PORT_LOCK_DIRECTORY),
                            *map(str, ports)], stdout=subprocess.PIPE, check=True, timeout=60)
    assert other.stdout.decode().split() == [], "another process could lock a reserved port"
