"""The raw ctypes client against a real tesserad: round trips, and clear errors on bad input."""

from __future__ import annotations

import ctypes
import re
import urllib.request
from typing import List

import numpy as np
import pytest

import tessera
from tessera import Entry, EntryKind
from conftest import Daemon, free_port


def _random_array(seed: int, n: int, dtype: str = "float32") -> np.ndarray:
    # Random data, never zeros: zeros would hide bytes that were never written.
    return np.random.default_rng(seed).standard_normal(n).astype(dtype)


def test_round_trip_tensors_and_blob(daemon) -> None:
    weights = _random_array(1, 1000)
    counts = np.random.default_rng(2).integers(1, 1 << 40, size=(3, 7), dtype=np.int64)
    blob = ctypes.create_string_buffer(256)
    payload = b"loader position 1234"
    ctypes.memmove(blob, payload, len(payload))
    with tessera.Client(str(daemon.socket), when_busy="wait") as client:
        client.register("client-roundtrip", 0, 1, [
            Entry.tensor("weights", weights.ctypes.data, "float32", weights.shape),
            Entry.tensor("counts", counts.ctypes.data, "int64", counts.shape),
            Entry.blob("position", ctypes.addressof(blob), 256, len(payload)),
        ])
        assert client.snapshot(7) is True
        client.wait()
        stats = client.stats()
        assert (stats.started, stats.sealed, stats.failed, stats.last_sealed_step) == (1, 1, 0, 7)
        assert stats.bytes_copied == weights.nbytes + counts.nbytes + len(payload)

        saved_weights, saved_counts = weights.copy(), counts.copy()
        weights[:] = -1.0
        counts[:] = 0
        ctypes.memset(blob, 0x55, 256)
        assert client.restore() == 7
        assert weights.tobytes() == saved_weights.tobytes()
        assert counts.tobytes() == saved_counts.tobytes()
        assert client.entry_length(2) == len(payload)
        assert client.entry_length(0) == weights.nbytes
        assert blob.raw[: len(payload)] == payload
        assert client.stats().gather_note == ""  # not a DP-sharded restore


def test_blob_length_follows_update_entry(daemon) -> None:
    blob = ctypes.create_string_buffer(64)
    other = ctypes.create_string_buffer(64)
    ctypes.memmove(other, b"0123456789", 10)
    with tessera.Client(str(daemon.socket), when_busy="wait") as client:
        client.register("client-blob", 0, 1, [Entry.blob("b", ctypes.addressof(blob), 64, 0)])
        client.update_entry(0, ctypes.addressof(other), 10)
        assert client.snapshot(1)
        client.wait()
        ctypes.memset(other, 0, 64)
        assert client.restore(1) == 1
        assert client.entry_length(0) == 10
        assert other.raw[:10] == b"0123456789"
        with pytest.raises(tessera.InvalidArgumentError, match="exceeds its capacity 64"):
            client.update_entry(0, None, 65)


def test_restore_with_nothing_held_is_not_found(daemon) -> None:
    data = _random_array(3, 16)
    with tessera.Client(str(daemon.socket)) as client:
        client.register("client-empty", 0, 1,
                        [Entry.tensor("x", data.ctypes.data, "float32", data.shape)])
        with pytest.raises(tessera.NotFoundError, match="no sealed snapshot") as info:
            client.restore()
        assert info.value.code == 5 and info.value.code_name == "NOT_FOUND"
        assert isinstance(info.value, LookupError)


def test_steps_must_increase_error_surfaces_in_wait(daemon) -> None:
    data = _random_array(4, 16)
    with tessera.Client(str(daemon.socket), when_busy="wait") as client:
        client.register("client-steps", 0, 1,
                        [Entry.tensor("x", data.ctypes.data, "float32", data.shape)])
        client.snapshot(5)
        client.wait()
        client.snapshot(3)  # asynchronous: the daemon refuses it on the library's thread
        with pytest.raises(tessera.FailedPreconditionError, match="not after the newest sealed"):
            client.wait()
        assert client.stats().failed == 1
        # The sealed step is intact.
        assert client.restore() == 5


def test_no_daemon_is_unavailable(tmp_path, library_path) -> None:
    with pytest.raises(tessera.UnavailableError, match="no tesserad answers"):
        tessera.Client(str(tmp_path / "nothing.sock"))


def test_wrong_types_raise_type_error(daemon) -> None:
    data = _random_array(5, 4)
    good = Entry.tensor("x", data.ctypes.data, "float32", data.shape)
    with tessera.Client(str(daemon.socket)) as client:
        with pytest.raises(TypeError, match="job_id must be a str"):
            client.register(17, 0, 1, [good])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="rank must be an int"):
            client.register("j", "0", 1, [good])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"entries\[0\] must be a tessera.Entry"):
            client.register("j", 0, 1, [{"name": "x"}])  # type: ignore[list-item]
        with pytest.raises(TypeError, match="address must be an int"):
            client.register("j", 0, 1, [Entry("x", "0x10", 16, "float32", (4,))])  # type: ignore
        with pytest.raises(TypeError, match="shape must be a sequence of ints"):
            client.register("j", 0, 1,
                            [Entry("x", data.ctypes.data, 16, "float32", "4")])  # type: ignore
        with pytest.raises(TypeError, match="step must be an int"):
            client.snapshot(1.5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="socket_path must be a str"):
            tessera.Client(42)  # type: ignore[arg-type]


def test_bad_values_raise_invalid_argument(daemon) -> None:
    data = _random_array(6, 4)
    address = data.ctypes.data
    with tessera.Client(str(daemon.socket)) as client:
        with pytest.raises(tessera.InvalidArgumentError, match="when_busy"):
            tessera.Client(str(daemon.socket), when_busy="sometimes")
        with pytest.raises(tessera.InvalidArgumentError, match="need 0 <= rank < world_size"):
            client.register("j", 2, 2, [Entry.tensor("x", address, "float32", (4,))])
        with pytest.raises(tessera.InvalidArgumentError, match="dtype 'float128' is not one of"):
            Entry.tensor("x", address, "float128", (2,))
        # The daemon's own validation comes back with its message.
        with pytest.raises(tessera.InvalidArgumentError, match="dtype 'float128' is not one of"):
            client.register("j", 0, 1, [Entry("x", address, 16, "float128", (1,))])
        with pytest.raises(tessera.InvalidArgumentError, match="does not match shape"):
            client.register("j", 0, 1, [Entry("x", address, 12, "float32", (4,))])
        with pytest.raises(tessera.InvalidArgumentError, match="has the character 0x20"):
            client.register("bad job", 0, 1, [Entry.tensor("x", address, "float32", (4,))])
        with pytest.raises(tessera.InvalidArgumentError, match="registered twice"):
            client.register("j", 0, 1, [Entry.tensor("x", address, "float32", (4,))] * 2)
        with pytest.raises(tessera.InvalidArgumentError, match="exceeds its capacity"):
            client.register("j", 0, 1, [Entry.blob("b", address, 8, 9)])
        with pytest.raises(tessera.InvalidArgumentError, match="address is 0"):
            client.register("j", 0, 1, [Entry.tensor("x", 0, "float32", (4,))])
        with pytest.raises(tessera.InvalidArgumentError, match="must be EntryKind"):
            bad_kind = Entry("x", address, 16, "float32", (4,), 7)  # type: ignore[arg-type]
            client.register("j", 0, 1, [bad_kind])
        with pytest.raises(tessera.FailedPreconditionError, match="Snapshot before Register"):
            client.snapshot(1)
    closed = tessera.Client(str(daemon.socket))
    closed.close()
    closed.close()  # idempotent
    with pytest.raises(tessera.FailedPreconditionError, match="closed"):
        closed.snapshot(1)


def _register_ranks(daemon: Daemon, job_id: str, arrays: List[np.ndarray]) -> List[tessera.Client]:
    """One host-copying client per array, registered as the ranks of `job_id`."""
    clients = []
    for rank, array in enumerate(arrays):
        client = tessera.Client(str(daemon.socket), when_busy="wait", use_gpu=False)
        client.register(job_id, rank, len(arrays),
                        [Entry.tensor("w", array.ctypes.data, "float32", array.shape)])
        clients.append(client)
    return clients


def _snapshot_every_rank(clients: List[tessera.Client], arrays: List[np.ndarray],
                         rng: np.random.Generator, step: int) -> None:
    for client, array in zip(clients, arrays):
        array[:] = rng.standard_normal(array.size) + 3.0  # new bytes every step, never zeros
        assert client.snapshot(step)
        client.wait()


def test_list_versions_returns_the_sealed_steps_of_each_rank(daemon) -> None:
    """Two ranks of very different sizes snapshot random data. The daemon holds each rank's
    committed step (sealed by every rank) and a newer one sealed by that rank alone; a commit
    releases the step before it. list_versions says exactly that."""
    seed = 8
    rng = np.random.default_rng(seed)
    arrays = [_random_array(seed, 4_000), _random_array(seed + 1, 100_000)]
    clients = _register_ranks(daemon, "lv-job", arrays)
    other_data = _random_array(seed + 2, 64)
    other = _register_ranks(daemon, "lv-other", [other_data])[0]
    unregistered = tessera.Client(str(daemon.socket))

    def listed(client: tessera.Client, job_id: str = "") -> List[tuple]:
        return [(v.rank, v.step, v.sealed) for v in client.list_versions(job_id)]

    try:
        _snapshot_every_rank(clients, arrays, rng, 3)
        assert listed(clients[0]) == [(0, 3, True), (1, 3, True)]
        _snapshot_every_rank(clients, arrays, rng, 5)
        assert listed(clients[0]) == [(0, 5, True), (1, 5, True)]
        _snapshot_every_rank(clients[:1], arrays[:1], rng, 8)
        _snapshot_every_rank([other], [other_data], rng, 40)

        versions = clients[0].list_versions()
        assert [(v.rank, v.step, v.sealed) for v in versions] == [
            (0, 5, True), (0, 8, True), (1, 5, True)], (versions, seed)
        for v in versions:
            # The payload is the entry's slot, page-aligned, then a manifest of well under a page.
            data_bytes = arrays[v.rank].nbytes
            assert data_bytes < v.payload_bytes <= data_bytes + 2 * 4096, (v, data_bytes, seed)
        crcs = [v.payload_crc32c for v in versions]
        assert 0 not in crcs and len(set(crcs)) == len(crcs), (versions, seed)
        # The same answer again, from the other rank, and with the job named.
        assert clients[1].list_versions() == versions
        assert clients[0].list_versions("lv-job") == versions
        listed_other = other.list_versions()
        assert [(v.rank, v.step, v.sealed) for v in listed_other] == [(0, 40, True)]
        assert listed_other[0].payload_bytes > other_data.nbytes
        # A client that never registered lists every job, sorted by job id.
        assert unregistered.list_versions() == versions + listed_other
        assert isinstance(versions[0], tessera.Version)

        _snapshot_every_rank(clients[1:], arrays[1:], rng, 8)
        assert listed(unregistered, "lv-job") == [(0, 8, True), (1, 8, True)]
    finally:
        for client in clients + [other, unregistered]:
            client.close()


def test_list_versions_of_an_empty_job_is_empty_and_bad_job_ids_are_clear(daemon) -> None:
    with tessera.Client(str(daemon.socket)) as client:
        assert client.list_versions() == []
        assert client.list_versions("lv-nothing-here") == []
        with pytest.raises(tessera.InvalidArgumentError, match="has the character 0x2f; allowed"):
            client.list_versions("team/job")
        with pytest.raises(tessera.InvalidArgumentError, match=r"must be 1\.\.128 bytes, got 129"):
            client.list_versions("j" * 129)
        with pytest.raises(tessera.InvalidArgumentError, match="must not start with '.'"):
            client.list_versions(".job")
        with pytest.raises(tessera.InvalidArgumentError, match="has a NUL character"):
            client.list_versions("job\0other")
        with pytest.raises(TypeError, match="job_id must be a str"):
            client.list_versions(b"job")  # type: ignore[arg-type]


def test_list_versions_c_abi_counts_and_fills_only_what_fits(daemon) -> None:
    """tessera_list_versions itself: counting, a short array, NULL arguments. 9 ranks holding 17
    versions are more than Client.list_versions asks for at first, so it asks again."""
    seed = 9
    rng = np.random.default_rng(seed)
    arrays = [_random_array(seed + rank, 32 + rank) for rank in range(9)]
    clients = _register_ranks(daemon, "lv-abi", arrays)
    try:
        _snapshot_every_rank(clients, arrays, rng, 1)  # committed: every rank sealed it
        _snapshot_every_rank(clients, arrays, rng, 2)  # committed too, releasing step 1
        _snapshot_every_rank(clients[:-1], arrays[:-1], rng, 3)  # not rank 8: not committed
        versions = clients[0].list_versions()
        assert [(v.rank, v.step) for v in versions] == \
            [(r, s) for r in range(8) for s in (2, 3)] + [(8, 2)]

        lib = tessera._lib.library()
        handle = clients[0]._h()
        count = ctypes.c_size_t(12345)
        assert lib.tessera_list_versions(handle, None, None, 0, ctypes.byref(count)) == 0
        assert count.value == 17

        array = (tessera._lib.CVersionInfo * 6)()
        array[5].step = -77  # past the capacity given: must stay as it is
        count = ctypes.c_size_t(0)
        rc = lib.tessera_list_versions(handle, b"lv-abi", array, 5, ctypes.byref(count))
        assert rc == -tessera.OutOfRangeError.code and count.value == 17
        assert "call again with capacity >= 17" in tessera._lib.last_error()
        got = [tessera.Version(v.rank, v.step, v.payload_bytes, v.payload_crc32c, bool(v.sealed))
               for v in array[:5]]
        assert got == versions[:5], seed
        assert array[5].step == -77

        rc = lib.tessera_list_versions(handle, b"", None, 0, None)
        assert rc == -tessera.InvalidArgumentError.code
        assert "count is NULL" in tessera._lib.last_error()
        rc = lib.tessera_list_versions(handle, b"", None, 2, ctypes.byref(count))
        assert rc == -tessera.InvalidArgumentError.code
        assert "out is NULL with capacity 2" in tessera._lib.last_error()
        rc = lib.tessera_list_versions(None, b"", array, 6, ctypes.byref(count))
        assert rc == -tessera.InvalidArgumentError.code
        assert "client is NULL" in tessera._lib.last_error()
    finally:
        for client in clients:
            client.close()


def test_errors_map_to_canonical_codes() -> None:
    from tessera.errors import error_for_code

    assert isinstance(error_for_code(9, "x"), tessera.FailedPreconditionError)
    assert isinstance(error_for_code(15, "x"), tessera.DataLossError)
    assert isinstance(error_for_code(8, "x"), tessera.ResourceExhaustedError)
    assert isinstance(error_for_code(3, "x"), ValueError)
    unknown = error_for_code(99, "strange")
    assert type(unknown) is tessera.TesseraError and unknown.code == 99
    assert str(error_for_code(5, "NOT_FOUND: gone")) == "NOT_FOUND: gone"
    assert str(error_for_code(5, "gone")) == "NOT_FOUND: gone"
    assert EntryKind.BLOB == 2


def test_skipped_snapshots_reach_the_daemons_metrics(tmp_path, library_path) -> None:
    """A snapshot asked for while the previous one is in flight is skipped and counted; the
    agent reports the count with its next snapshot and the daemon exports it on /metrics."""
    port = free_port()
    daemon = Daemon(tmp_path, ["--set", f"metrics.listen_address=127.0.0.1:{port}"])
    daemon.start()
    try:
        state = _random_array(7, 16 << 20)  # 64 MiB: the first snapshot takes a while
        with tessera.Client(str(daemon.socket), when_busy="skip", use_gpu=False) as client:
            client.register("skips", 0, 1, [Entry.tensor("state", state.ctypes.data, "float32",
                                                        state.shape)])
            assert client.snapshot(0)
            skipped = sum(not client.snapshot(step) for step in range(1, 200))
            client.wait()
            assert client.snapshot(1000)  # reports the skips
            client.wait()
            assert skipped >= 1, "no snapshot was asked for while the first was in flight"
            assert client.stats().skipped == skipped
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        found = re.search(rb"^tessera_snapshot_skips_total(?:\{[^}]*\})? (\d+)", text, re.M)
        assert found is not None, text.decode()[:2000]
        assert int(found.group(1)) == skipped
    finally:
        assert daemon.stop() == 0, daemon.log()
        daemon.cleanup()
