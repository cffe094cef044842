"""Reading any rank's sealed snapshot without registering it (`Client.read_manifest`,
`Client.read_range`) against a real tesserad: a client that registers nothing reads manifests and
ranges bit-exact while the writer keeps its rank, a damaged block fails only the ranges over it,
bad arguments get clear errors, and a reader racing a trainer that keeps snapshotting gets either
the bytes of the step it asked for or an error, never other bytes."""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import threading
from typing import Dict, List, Tuple

import pytest

import tessera
from tessera import Entry, EntryKind

BLOCK = 8 << 20  # the agent's CRC32C block size
BIG = 2 * BLOCK + 12345  # three blocks, the last one short
ODD_NAME = 'odd "name" \\ ü→'  # quotes, a backslash and non-ASCII through the JSON


def _seed() -> int:
    seed = int(os.environ.get("TESSERA_TEST_SEED") or random.randrange(1 << 32))
    print(f"seed={seed} (set TESSERA_TEST_SEED to repeat)")
    return seed


class State:
    """A rank's memory: a float32 tensor, a uint8 tensor of three CRC blocks, an int64 tensor
    under an odd name, and a blob; `fill` writes the bytes of a step (random, never zeros)."""

    SHAPES = {"w": ("float32", (3, 1000)), "big": ("uint8", (BIG,)), ODD_NAME: ("int64", (77,))}

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.buffers = {name: ctypes.create_string_buffer(tessera.Entry.tensor(
            name, 1, dtype, shape).nbytes) for name, (dtype, shape) in self.SHAPES.items()}
        self.blob = ctypes.create_string_buffer(4096)
        self.blob_length = 0

    def entries(self) -> List[Entry]:
        out = [Entry.tensor(name, ctypes.addressof(self.buffers[name]), dtype, shape)
               for name, (dtype, shape) in self.SHAPES.items()]
        return out + [Entry.blob("user_state", ctypes.addressof(self.blob), 4096,
                                 self.blob_length)]

    def expected(self, step: int) -> Dict[str, bytes]:
        """The valid bytes of every entry at `step`."""
        rng = random.Random(self.seed * 1000003 + step)
        out = {name: rng.randbytes(len(buffer)) for name, buffer in self.buffers.items()}
        out["user_state"] = rng.randbytes(1 + rng.randrange(4000))
        return out

    def fill(self, client: tessera.Client, step: int) -> Dict[str, bytes]:
        want = self.expected(step)
        for name, buffer in self.buffers.items():
            ctypes.memmove(buffer, want[name], len(want[name]))
        ctypes.memmove(self.blob, want["user_state"], len(want["user_state"]))
        self.blob_length = len(want["user_state"])
        client.update_entry(len(self.buffers), length=self.blob_length)
        return want


def _snapshot(client: tessera.Client, state: State, step: int) -> Dict[str, bytes]:
    want = state.fill(client, step)
    assert client.snapshot(step)
    client.wait()
    return want


def _ranges(rng: random.Random, n: int) -> List[Tuple[int, int]]:
    ranges = [(0, n), (0, 1), (n - 1, 1), (n, 0)]
    for edge in range(BLOCK, n, BLOCK):
        ranges += [(edge - 3, min(7, n - edge + 3)), (edge, n - edge)]
    for _ in range(10):
        offset = rng.randrange(n)
        ranges.append((offset, rng.randrange(n - offset + 1)))
    return ranges


def test_unregistered_reader_gets_manifest_and_ranges_bit_exact(daemon) -> None:
    seed = _seed()
    rng = random.Random(seed)
    state = State(seed)
    with tessera.Client(str(daemon.socket), when_busy="wait", use_gpu=False) as writer, \
            tessera.Client(str(daemon.socket), use_gpu=False) as reader:
        writer.register("reader-live", 0, 1, state.entries())
        want = _snapshot(writer, state, 5)

        manifest = reader.read_manifest("reader-live", 0)
        assert isinstance(manifest, tessera.SnapshotManifest)
        assert (manifest.job_id, manifest.rank, manifest.world_size, manifest.step) == (
            "reader-live", 0, 1, 5)
        assert manifest.crc_block_bytes == BLOCK and manifest.data_parallel is None
        assert [e.name for e in manifest.entries] == [e.name for e in state.entries()]
        for registered, e in zip(state.entries(), manifest.entries):
            assert (e.dtype, e.shape, e.kind, e.nbytes, e.slice) == (
                registered.dtype, registered.shape, registered.kind, registered.nbytes, None)
            assert e.length == len(want[e.name])
        assert manifest.entry("user_state").kind == EntryKind.BLOB
        assert reader.read_manifest("reader-live", 0, 5) == manifest
        with pytest.raises(tessera.NotFoundError, match="has no entry 'nope'"):
            manifest.entry("nope")

        for name, data in want.items():
            assert reader.read_range("reader-live", 0, 5, name) == data  # to the end
            for offset, length in _ranges(rng, len(data)):
                got = reader.read_range("reader-live", 0, 5, name, offset, length)
                assert isinstance(got, bytearray)
                assert got == data[offset:offset + length], (seed, name, offset, length)
        # Into the caller's buffers: a bigger bytearray, an mmap, a ctypes array.
        out = bytearray(BIG + 10)
        view = reader.read_range("reader-live", 0, 5, "big", 3, BIG - 3, out=out)
        assert isinstance(view, memoryview) and view.nbytes == BIG - 3
        assert bytes(view) == want["big"][3:] and out[BIG - 3:] == bytes(13)
        with mmap.mmap(-1, 4096) as mapped:
            reader.read_range("reader-live", 0, 5, "w", 100, 4000, out=mapped)
            assert mapped[:4000] == want["w"][100:4100]
        target = (ctypes.c_int64 * 77)()
        reader.read_range("reader-live", 0, 5, ODD_NAME, out=target)
        assert bytes(target) == want[ODD_NAME]

        # The rank stayed the writer's all along.
        want = _snapshot(writer, state, 6)
        assert reader.read_manifest("reader-live", 0).step == 6
        assert reader.read_range("reader-live", 0, 6, "big") == want["big"]


def test_reader_arguments_and_missing_things_get_clear_errors(daemon) -> None:
    state = State(_seed())
    with tessera.Client(str(daemon.socket), when_busy="wait", use_gpu=False) as writer, \
            tessera.Client(str(daemon.socket), use_gpu=False) as reader:
        writer.register("reader-args", 0, 1, state.entries())
        want = _snapshot(writer, state, 2)
        blob = len(want["user_state"])
        with pytest.raises(TypeError, match="job_id must be a str"):
            reader.read_manifest(3, 0)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="rank must be an int"):
            reader.read_manifest("reader-args", 0.0)  # type: ignore[arg-type]
        with pytest.raises(tessera.InvalidArgumentError,
                           match=r"rank must be in \[0, 4294967295\]"):
            reader.read_manifest("reader-args", -1)
        with pytest.raises(tessera.InvalidArgumentError, match="step must be in"):
            reader.read_manifest("reader-args", 0, -2)
        with pytest.raises(tessera.InvalidArgumentError, match="step must be in"):
            reader.read_range("reader-args", 0, -1, "w")
        with pytest.raises(tessera.InvalidArgumentError, match="offset must be in"):
            reader.read_range("reader-args", 0, 2, "w", -1, 4)
        with pytest.raises(tessera.InvalidArgumentError, match="length must be in"):
            reader.read_range("reader-args", 0, 2, "w", 0, -4)
        with pytest.raises(tessera.InvalidArgumentError, match="length must be in"):
            reader.read_range("reader-args", 0, 2, "w", 0, 2**64)
        with pytest.raises(tessera.InvalidArgumentError, match="has a NUL character"):
            reader.read_range("reader-args", 0, 2, "w\0", 0, 4)
        with pytest.raises(TypeError, match="is read-only"):
            reader.read_range("reader-args", 0, 2, "w", 0, 4, out=bytes(4))
        with pytest.raises(TypeError, match="out must be a writable buffer"):
            reader.read_range("reader-args", 0, 2, "w", 0, 4, out=[0] * 4)
        with pytest.raises(tessera.InvalidArgumentError, match="out holds 3 bytes, 4 are read"):
            reader.read_range("reader-args", 0, 2, "w", 0, 4, out=bytearray(3))
        with pytest.raises(tessera.InvalidArgumentError, match="C-contiguous"):
            reader.read_range("reader-args", 0, 2, "w", 0, 4, out=memoryview(bytearray(8))[::2])
        # The library's checks, with the daemon's answers.
        with pytest.raises(tessera.NotFoundError,
                           match=r"step 2 has no entry 'nope'; it has 4: 'big', 'odd"):
            reader.read_range("reader-args", 0, 2, "nope", 0, 1)
        with pytest.raises(tessera.NotFoundError, match="has no entry 'nope'"):
            reader.read_range("reader-args", 0, 2, "nope")
        with pytest.raises(tessera.InvalidArgumentError,
                           match=rf"holds {blob} valid bytes: the range \[{blob}, \+1\)"):
            reader.read_range("reader-args", 0, 2, "user_state", blob, 1)
        with pytest.raises(tessera.InvalidArgumentError, match=f"offset {blob + 1} is past"):
            reader.read_range("reader-args", 0, 2, "user_state", blob + 1)
        with pytest.raises(tessera.InvalidArgumentError, match="must lie within"):
            reader.read_range("reader-args", 0, 2, "user_state", 1, 2**64 - 1)
        assert reader.read_range("reader-args", 0, 2, "user_state", blob, 0) == bytearray()
        with pytest.raises(tessera.NotFoundError, match="no sealed step 3; sealed steps here: 2"):
            reader.read_range("reader-args", 0, 3, "w", 0, 4)
        with pytest.raises(tessera.NotFoundError):
            reader.read_manifest("reader-args", 0, 3)
        with pytest.raises(tessera.NotFoundError):
            reader.read_manifest("reader-args", 1)
        with pytest.raises(tessera.NotFoundError):
            reader.read_manifest("reader-nothing", 0)
        with pytest.raises(tessera.InvalidArgumentError):
            reader.read_manifest("bad job", 0)
        assert reader.read_range("reader-args", 0, 2, "w") == want["w"]

        # tessera_read_manifest itself: a buffer too small, none at all, NULL arguments.
        lib, handle = tessera._lib.library(), reader._h()
        needed = ctypes.c_size_t(0)
        small = ctypes.create_string_buffer(b"untouched", 10)
        rc = lib.tessera_read_manifest(handle, b"reader-args", 0, 2, small, 10,
                                       ctypes.byref(needed))
        assert rc == -tessera.OutOfRangeError.code and needed.value > 10
        assert f"call again with capacity >= {needed.value}" in tessera._lib.last_error()
        assert small.value == b""
        assert lib.tessera_read_manifest(handle, b"reader-args", 0, 2, None, 0,
                                         ctypes.byref(needed)) == -tessera.OutOfRangeError.code
        exact = ctypes.create_string_buffer(needed.value)
        assert lib.tessera_read_manifest(handle, b"reader-args", 0, 2, exact, needed.value,
                                         None) == 0
        assert len(exact.value) == needed.value - 1 and b'"step": 2' in exact.value
        rc = lib.tessera_read_manifest(handle, None, 0, 2, exact, needed.value, None)
        assert rc == -tessera.InvalidArgumentError.code
        rc = lib.tessera_read_manifest(handle, b"reader-args", 0, 2, None, 5, None)
        assert rc == -tessera.InvalidArgumentError.code
        assert "nor json_out with capacity 5" in tessera._lib.last_error()
        rc = lib.tessera_read_range(handle, b"reader-args", 0, 2, None, 0, 1, None)
        assert rc == -tessera.InvalidArgumentError.code
        rc = lib.tessera_read_range(None, b"reader-args", 0, 2, b"w", 0, 1, None)
        assert "client is NULL" in tessera._lib.last_error()


def test_a_damaged_block_fails_only_the_ranges_over_it(daemon) -> None:
    seed = _seed()
    state = State(seed)
    with tessera.Client(str(daemon.socket), when_busy="wait", use_gpu=False) as writer, \
            tessera.Client(str(daemon.socket), use_gpu=False) as reader:
        writer.register("reader-damaged", 0, 1, state.entries())
        want = _snapshot(writer, state, 1)
        big = want["big"]
        bad = BLOCK + random.Random(seed).randrange(BLOCK)  # in block 1
        path, at = daemon.slot_holding(big[bad:bad + 64])
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(bytes([big[bad] ^ 0x20]))

        for offset, length in [(bad, 1), (BLOCK - 5, 10), (0, BIG)]:
            with pytest.raises(tessera.DataLossError) as info:
                reader.read_range("reader-damaged", 0, 1, "big", offset, length)
            message = str(info.value)
            assert ("job 'reader-damaged' rank 0 step 1 entry 'big': block 1 (bytes "
                    f"[{BLOCK}, {2 * BLOCK}) of the entry)") in message
            assert "payload CRC32C" in message  # and the daemon's check says the same
        # The manifest and the other blocks still verify: the layout check reads no entry bytes.
        assert reader.read_manifest("reader-damaged", 0).step == 1
        assert reader.read_range("reader-damaged", 0, 1, "big", 0, BLOCK) == big[:BLOCK]
        assert reader.read_range("reader-damaged", 0, 1, "big", 2 * BLOCK) == big[2 * BLOCK:]
        assert reader.read_range("reader-damaged", 0, 1, "w") == want["w"]


def test_dp_sharded_manifests_say_which_rank_stores_which_bytes(daemon) -> None:
    state = State(_seed())
    with tessera.Client(str(daemon.socket), when_busy="wait", use_gpu=False) as rank0, \
            tessera.Client(str(daemon.socket), when_busy="wait", use_gpu=False) as rank1, \
            tessera.Client(str(daemon.socket), use_gpu=False) as reader:
        for rank, client in enumerate((rank0, rank1)):
            client.set_data_parallel([0, 1], [True, True, True, False])
            client.register("reader-dp", rank, 2, state.entries())
        want = _snapshot(rank0, state, 1)
        rank1.update_entry(3, length=state.blob_length)
        assert rank1.snapshot(1)
        rank1.wait()

        rebuilt = {name: bytearray(len(data)) for name, data in want.items()}
        covered = {name: 0 for name in want}
        for rank in (0, 1):
            manifest = reader.read_manifest("reader-dp", rank)
            assert manifest.data_parallel is not None
            assert (manifest.data_parallel.dp_rank, manifest.data_parallel.dp_size) == (rank, 2)
            assert len(manifest.data_parallel.members_fingerprint) == 16
            for e in manifest.entries:
                assert (e.slice is not None) == (e.kind == EntryKind.TENSOR), e
                start = e.slice.offset if e.slice else 0
                if e.slice:
                    assert e.length == e.slice.length
                into = memoryview(rebuilt[e.name])[start:start + e.length]
                reader.read_range("reader-dp", rank, 1, e.name, out=into)
                covered[e.name] += e.length
        for name, data in want.items():
            assert covered[name] == len(data) * (2 if name == "user_state" else 1), name
            assert rebuilt[name] == data, name


def test_reading_while_the_trainer_snapshots_gives_the_step_asked_or_an_error(daemon) -> None:
    seed = _seed()
    rng = random.Random(seed)
    state = State(seed)
    steps = 40
    with tessera.Client(str(daemon.socket), when_busy="wait", use_gpu=False) as writer, \
            tessera.Client(str(daemon.socket), use_gpu=False) as reader:
        writer.register("reader-race", 0, 1, state.entries())
        _snapshot(writer, state, 1)
        failure: List[BaseException] = []

        def train() -> None:
            try:
                for step in range(2, steps + 1):
                    _snapshot(writer, state, step)
            except BaseException as e:  # shown by the main thread
                failure.append(e)

        trainer = threading.Thread(target=train)
        trainer.start()
        outcomes: Dict[str, int] = {}
        try:
            while trainer.is_alive():
                try:
                    step = reader.read_manifest("reader-race", 0).step
                except tessera.DataLossError as e:  # rewritten as it was checked, twice
                    outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
                    continue
                want = state.expected(step)
                for _ in range(4):
                    name = rng.choice(sorted(want))
                    offset = rng.randrange(len(want[name]))
                    length = rng.randrange(len(want[name]) - offset + 1)
                    try:
                        got = reader.read_range("reader-race", 0, step, name, offset, length)
                    except (tessera.NotFoundError, tessera.DataLossError) as e:
                        outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
                        continue
                    assert got == want[name][offset:offset + length], (
                        f"seed {seed}: step {step} entry {name!r} [{offset}, +{length}) is not "
                        "the step's bytes")
                    outcomes["exact"] = outcomes.get("exact", 0) + 1
        finally:
            trainer.join()
        assert not failure, failure
        print(f"reads while training: {outcomes}")
        assert outcomes.get("exact", 0) > 0
