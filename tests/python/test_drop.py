"""`tessera drop JOB` against a real tesserad: it deletes every snapshot of a job that has ended,
says what it freed, refuses a job whose trainer still runs (unless --force) or that belongs to
another uid, and the next launch with the job id starts afresh."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest

import tessera
from conftest import LIBRARY, PYTHON_PACKAGE, Daemon
from tessera import Entry


def _seed() -> int:
    seed = int(os.environ.get("TESSERA_TEST_SEED", random.randrange(1 << 30)))
    print(f"TESSERA_TEST_SEED={seed}")
    return seed


def _tessera(cli: Path, daemon: Daemon, *args: str,
             prefix: Tuple[str, ...] = ()) -> Tuple[int, str, str]:
    """Runs the CLI with the daemon's socket in TESSERA_SOCKET (no --socket)."""
    env = dict(os.environ, TESSERA_SOCKET=str(daemon.socket))
    result = subprocess.run([*prefix, str(cli), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, timeout=60)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def _acl_users(path: Path) -> tuple:
    """The uids a file's POSIX access ACL names (Linux's system.posix_acl_access: a 4-byte version,
    then 8-byte entries of tag, permissions and id; tag 2 names a user)."""
    acl = os.getxattr(path, "system.posix_acl_access")
    entries = [struct.unpack_from("<HHI", acl, at) for at in range(4, len(acl), 8)]
    return tuple(uid for tag, _, uid in entries if tag == 2)


def _slot_files(daemon: Daemon, job: str) -> Dict[str, int]:
    """The job's slot segment files in the daemon's store, with their sizes."""
    node = daemon.store / "n0"
    return {p.name: p.stat().st_size for p in node.iterdir()
            if p.name.startswith(f"{job}.r") and p.name.endswith(".slot")}


def _train(daemon: Daemon, job: str, rank: int, world: int, steps: int,
           rng: np.random.Generator) -> tessera.Client:
    """Registers a rank of `job` holding random bytes and seals `steps` snapshots; returns the
    client, still registered."""
    state = rng.integers(0, 256, size=(1 << 16) + 37 * rank, dtype=np.uint8)
    client = tessera.Client(str(daemon.socket), when_busy="wait", use_gpu=False)
    client.register(job, rank, world, [Entry.tensor("state", state.ctypes.data, "uint8",
                                                    state.shape)])
    client._keep = state  # the registered memory must outlive the client
    for step in range(steps):
        state[:] = rng.integers(0, 256, size=state.shape, dtype=np.uint8)
        assert client.snapshot(step)
    client.wait()
    return client


def test_drop_deletes_the_snapshots_of_a_job_that_ended(daemon, cli_path) -> None:
    rng = np.random.default_rng(_seed())
    for rank in range(2):
        _train(daemon, "ended", rank, 2, 4, rng).close()  # unregistered, snapshots kept
    _train(daemon, "other", 0, 1, 2, rng).close()
    files = _slot_files(daemon, "ended")
    assert len(files) == 4, files
    with tessera.Client(str(daemon.socket)) as client:
        assert {(v.rank, v.step) for v in client.list_versions("ended") if v.sealed} == \
            {(0, 3), (1, 3)}

    code, out, err = _tessera(cli_path, daemon, "drop", "ended", "--json")
    assert code == 0, err
    answer = json.loads(out)
    assert answer["ok"] and answer["exit_code"] == 0, answer
    assert answer["result"] == {
        "node": "n0", "job": "ended", "ranks": [0, 1], "slots_deleted": 4,
        "bytes_deleted": sum(files.values()), "newest_sealed_step": 3,
        "running_ranks": [], "running_pids": [],
    }, answer
    assert _slot_files(daemon, "ended") == {}
    with tessera.Client(str(daemon.socket)) as client:
        assert client.list_versions("ended") == []
        assert len(client.list_versions("other")) == 1, "another job stays"

    # Dropped: a new run of the job, of another world size, starts over at step 0.
    _train(daemon, "ended", 0, 1, 1, rng).close()
    code, out, err = _tessera(cli_path, daemon, "drop", "ended")
    assert code == 0, err
    assert out.startswith("dropped job ended on n0: 1 rank, 2 slots, ") and \
        "freed (its newest sealed step was 0)" in out, out

    code, out, err = _tessera(cli_path, daemon, "drop", "ended")
    assert code == 4, (code, out, err)
    assert "job 'ended' has no snapshot and no registered rank on this daemon; jobs here: " \
           "'other'" in err, err
    code, out, err = _tessera(cli_path, daemon, "drop", "../x")
    assert code == 2, (code, out, err)
    assert "job" in err, err


def test_a_dropped_job_is_not_resumed(daemon, cli_path) -> None:
    rng = np.random.default_rng(_seed())
    _train(daemon, "relaunch", 0, 1, 3, rng).close()
    code, _, err = _tessera(cli_path, daemon, "drop", "relaunch")
    assert code == 0, err
    state = rng.integers(0, 256, size=1 << 16, dtype=np.uint8)
    before = state.copy()
    with tessera.Client(str(daemon.socket), when_busy="wait", use_gpu=False) as client:
        client.register("relaunch", 0, 1, [Entry.tensor("state", state.ctypes.data, "uint8",
                                                        state.shape)])
        with pytest.raises(tessera.NotFoundError):
            client.restore(-1)
        assert np.array_equal(state, before), "a refused restore wrote nothing"
        assert client.snapshot(0)  # steps start over
        client.wait()
        assert client.restore(-1) == 0


def test_drop_refuses_a_job_still_training_unless_forced(daemon, cli_path) -> None:
    rng = np.random.default_rng(_seed())
    client = _train(daemon, "live", 0, 1, 2, rng)  # this process is its trainer: alive
    try:
        files = _slot_files(daemon, "live")
        code, out, err = _tessera(cli_path, daemon, "drop", "live")
        assert code == 4, (code, out, err)
        assert (f"job 'live' is still being trained here: rank 0 (pid {os.getpid()}) is "
                "registered and running; nothing was dropped") in err, err
        assert "(here: tessera drop live --force)" in err, err
        assert _slot_files(daemon, "live") == files
        assert client.restore(-1) == 1, "the refused drop changed nothing"

        code, out, err = _tessera(cli_path, daemon, "drop", "live", "--force")
        assert code == 0, err
        assert f"forced while still running: rank 0 (pid {os.getpid()}); a trainer that still " \
               "runs registers again at its next snapshot" in out, out
        assert _slot_files(daemon, "live") == {}
        with tessera.Client(str(daemon.socket)) as other:
            assert other.list_versions("live") == []
            # The trainer still runs: its agent registers again and goes on, in new slots.
            assert client.snapshot(5)
            client.wait()
            assert [(v.step, v.sealed) for v in other.list_versions("live")] == [(5, True)]
    finally:
        client.close()


_NOBODY_TRAINER = """
import sys
import numpy as np
import tessera
state = np.arange(4096, dtype=np.uint8)
with tessera.Client(sys.argv[1], when_busy="wait", use_gpu=False) as client:
    client.register("nobody-job", 0, 1, [tessera.Entry.tensor("s", state.ctypes.data, "uint8",
                                                              state.shape)])
    client.snapshot(0)
    client.wait()
print("sealed")
"""


def test_only_root_the_daemons_uid_or_the_jobs_uid_may_drop_it(tmp_path, cli_path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root, to run the CLI as another uid")
    setpriv = ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    try:
        check = subprocess.run([*setpriv, "/bin/true"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, timeout=30)
    except FileNotFoundError:
        pytest.skip("no /usr/bin/setpriv here")
    if check.returncode != 0:
        pytest.skip(f"cannot run a process as uid 65534 here: {check.stdout.decode()}")

    daemon = Daemon(tmp_path, ["--set", "agent.socket_mode=0666"])
    # uid 65534 reaches the socket, its own slots, and copies of the binaries.
    shared = Path(tempfile.mkdtemp(prefix="tessera-drop-"))
    try:
        for directory in (daemon.socket_dir, daemon.store, shared):
            directory.chmod(0o755)
        cli = shared / "tessera"
        library = shared / "libtessera.so"
        shutil.copy(cli_path, cli)
        shutil.copy(LIBRARY, library)
        for binary in (cli, library):
            binary.chmod(0o755)
        daemon.start()
        rng = np.random.default_rng(_seed())
        _train(daemon, "root-job", 0, 1, 2, rng).close()
        env = dict(os.environ, TESSERA_LIBRARY=str(library), PYTHONPATH=str(PYTHON_PACKAGE),
                   HOME=str(shared))
        trainer = subprocess.run([*setpriv, sys.executable, "-c", _NOBODY_TRAINER,
                                  str(daemon.socket)], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, timeout=120)
        assert trainer.returncode == 0 and b"sealed" in trainer.stdout, trainer.stdout.decode()
        # The slots stay the daemon's, and their POSIX ACLs let uid 65534 in (and no other).
        slots = list((daemon.store / "n0").glob("nobody-job.*"))
        assert slots and {p.stat().st_uid for p in slots} == {os.geteuid()}
        assert {_acl_users(p) for p in slots} == {(65534,)}

        root_files = _slot_files(daemon, "root-job")
        code, out, err = _tessera(cli, daemon, "drop", "root-job", "--force", prefix=tuple(setpriv))
        assert code == 4, (code, out, err)
        assert "PERMISSION_DENIED" in err or "belongs to uid 0" in err, err
        assert ("job 'root-job' belongs to uid 0 here (job 'root-job' rank 0); the caller is uid "
                "65534: only root, the daemon's uid or the uid that registered the job may drop "
                "it") in err, err
        assert _slot_files(daemon, "root-job") == root_files

        code, out, err = _tessera(cli, daemon, "drop", "nobody-job", prefix=tuple(setpriv))
        assert code == 0, (code, out, err)
        assert out.startswith("dropped job nobody-job on n0: 1 rank, 2 slots, "), out
        assert _slot_files(daemon, "nobody-job") == {}
        # Root may drop any job.
        code, out, err = _tessera(cli, daemon, "drop", "root-job")
        assert code == 0, (code, out, err)
    finally:
        code = daemon.stop()
        daemon.cleanup()
        shutil.rmtree(shared, ignore_errors=True)
    assert code == 0, daemon.log()


def test_close_with_drop_on_every_rank_drops_the_job_across_a_cluster(tmp_path) -> None:
    """Three daemons, RS(1, 1); ranks 0 and 1 of a job snapshot on nodes 0 and 1 until a step is
    committed (node 2 and each other owner hold fragments). Each rank ends its run with
    Snapshotter.close(drop=True): the last to close drops the job on every member, and a relaunch
    with the same job id restores nothing on either rank."""
    import time
    import torch
    import tessera.torch as tt
    from conftest import cluster_daemons

    seed = _seed()
    torch.manual_seed(seed)
    daemons = cluster_daemons(tmp_path, 3, "drop-test-token-0123456789", 1, 1)

    def launch(rank: int) -> "tt.Snapshotter":
        model = torch.nn.Linear(32 + rank, 16)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return tt.Snapshotter(model, optimizer, job_id="cluster-end", rank=rank, world_size=2,
                              socket_path=str(daemons[rank].socket), when_busy="wait")

    try:
        for d in daemons:
            d.start()
        time.sleep(0.6)  # every daemon hears every other before the first snapshot
        snaps = [launch(0), launch(1)]
        for step in range(3):
            for snap in snaps:
                assert snap.snapshot(step)
            for snap in snaps:
                snap.wait()
        deadline = time.monotonic() + 60
        while not any("job 'cluster-end' committed step 2" in d.log() for d in daemons):
            assert time.monotonic() < deadline, daemons[0].log()[-3000:]
            time.sleep(0.1)
        for snap in snaps:
            snap.close(drop=True)
        assert any("job 'cluster-end' dropped at epoch" in d.log() for d in daemons), \
            "\n".join(d.log()[-2000:] for d in daemons)
        relaunched = [launch(0), launch(1)]
        try:
            assert [s.restore_latest() for s in relaunched] == [None, None]
        finally:
            for snap in relaunched:
                snap.close(drop=True)
    finally:
        for d in daemons:
            d.stop()
            d.cleanup()
