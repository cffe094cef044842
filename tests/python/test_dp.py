"""DP-sharded snapshots (Snapshotter(dp_group=...), Client.set_data_parallel) against a real
tesserad: each member of a data-parallel group stores about 1/N of the replicated bytes, a job
killed mid-run restores bit-exact on every member from fresh processes that gather the other
members' slices, and a bad group is a clear error.

The members are separate processes (dp_worker.py) except in the low-level round trip, where each
member is a Client on its own thread. Seeds: TESSERA_TEST_SEED, else drawn and printed.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch
import torch.nn as nn

import tessera
import tessera.torch
from conftest import Daemon
from tessera import Entry

HERE = Path(__file__).resolve().parent
WORKER = HERE / "dp_worker.py"
ALIGNMENT = 256  # DpSlicing::kAlignment (common/dp_slices.h): slice boundaries are multiples
MANIFEST_SLACK = 64 << 10  # a shard's payload: its data, then a manifest well under this
MIN_SEALED = 5  # the killed run trains until every member has sealed this step


def draw_seed() -> int:
    seed = int(os.environ.get("TESSERA_TEST_SEED") or random.randrange(1, 1 << 31))
    print(f"seed {seed} (TESSERA_TEST_SEED={seed} repeats this run)")
    return seed


def random_array(rng: np.random.Generator, n: int, dtype: str) -> np.ndarray:
    # Random data, never zeros: zeros would hide bytes that were never written.
    if dtype.startswith("int"):
        return rng.integers(1, 1 << 30, size=n).astype(dtype)
    return (rng.standard_normal(n) + 3.0).astype(dtype)


def slice_bounds(total: int, members: int) -> List[int]:
    """The DP ranges of common/dp_slices.h: member r stores [bounds[r], bounds[r + 1]) of the
    replicated bytes concatenated in registration order."""
    bounds = [0]
    for r in range(1, members):
        bounds.append(max(bounds[-1], total * r // members // ALIGNMENT * ALIGNMENT))
    bounds.append(total)
    return bounds


# -- worker processes ------------------------------------------------------------------------------


class Worker:
    """A dp_worker.py process; its stdout lines are collected by a thread, stderr goes to a
    file."""

    def __init__(self, daemon: Daemon, job: str, mode: str, rank: int, world: int, seed: int,
                 log_dir: Path, extra: List[str], env: Dict[str, str]) -> None:
        self.rank = rank
        self.lines: List[str] = []
        self.stderr_path = log_dir / f"{mode}.{rank}.stderr"
        full_env = daemon.env(job)
        full_env.update(env)
        stderr = open(self.stderr_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), mode, "--rank", str(rank), "--world", str(world),
             "--seed", str(seed), *extra],
            env=full_env, cwd=HERE, stdout=subprocess.PIPE, stderr=stderr)
        stderr.close()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def describe(self) -> str:
        err = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        return (f"--- rank {self.rank} stdout\n" + "\n".join(self.lines) +
                f"\n--- rank {self.rank} stderr (last 4000 characters)\n{err[-4000:]}")

    def last_sealed(self) -> int:
        sealed = [int(line.split()[1]) for line in self.lines if line.startswith("sealed ")]
        return max(sealed, default=-1)

    def value(self, key: str) -> Optional[str]:
        """What the last line starting with `key ` says."""
        for line in reversed(self.lines):
            if line.startswith(key + " "):
                return line[len(key) + 1:]
        return None

    def wait(self, timeout_s: float) -> int:
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"rank {self.rank} ran over {timeout_s} s\n{self.describe()}",
                        pytrace=False)
        self._reader.join(timeout=10)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)


def start_group(daemon: Daemon, job: str, mode: str, world: int, seed: int, log_dir: Path,
                extra: List[str], env: Dict[str, str]) -> List[Worker]:
    return [Worker(daemon, job, mode, r, world, seed, log_dir, extra, env) for r in range(world)]


def train_then_kill(workers: List[Worker], victim: int, store: Path, job: str,
                    timeout_s: float = 180.0) -> int:
    """Waits until every member has sealed MIN_SEALED and the daemon holds a step >= MIN_SEALED
    sealed on every member (a member that started late catches up with one that ran ahead before
    the group was complete: real DP ranks start together, these processes need not), SIGKILLs
    `victim` mid-run and then the others (a synchronous job restarts when it loses a rank).
    Returns the newest step every member printed as sealed."""
    deadline = time.monotonic() + timeout_s
    world = len(workers)
    try:
        while (any(w.last_sealed() < MIN_SEALED for w in workers)
               or common_sealed_step(store, job, world) < MIN_SEALED):
            for w in workers:
                if w.process.poll() is not None:
                    w.wait(10)
                    pytest.fail(f"rank {w.rank} exited with {w.process.returncode} while "
                                f"training\n{w.describe()}", pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"the members did not all seal step {MIN_SEALED} in {timeout_s} s\n"
                            + "\n".join(w.describe() for w in workers), pytrace=False)
            time.sleep(0.05)
    finally:
        workers[victim].kill()
        for w in workers:
            w.kill()
    for w in workers:
        assert w.wait(30) == -signal.SIGKILL, w.describe()
    return min(w.last_sealed() for w in workers)


def slot_headers(store: Path, job: str) -> List[Tuple[int, int, int]]:
    """(rank, step, payload bytes) of every sealed slot of `job`, from the slot headers the
    daemon wrote (struct SegmentHeader of common/segment.h: magic "TESSERA1", layout version 1,
    state at byte 16 with 2 = sealed, step, rank, world size, capacity, payload bytes from byte
    24; the job id at byte 136)."""
    out = []
    for path in store.rglob("*.slot"):
        try:
            header = path.read_bytes()[:4096]
        except FileNotFoundError:
            continue
        magic, version, _kind, state, _crc, step, rank, _world, _capacity, payload = \
            struct.unpack_from("<QIIIIqIIQQ", header)
        if magic != int.from_bytes(b"TESSERA1", "little") or version != 1:
            pytest.fail(f"{path}: not a slot header of layout version 1 ({magic:#x}, {version}); "
                        "update slot_headers() to common/segment.h", pytrace=False)
        if state == 2 and header[136:].split(b"\0", 1)[0].decode() == job:
            out.append((rank, step, payload))
    return out


def common_sealed_step(store: Path, job: str, world: int) -> int:
    """The newest step sealed on every one of `world` ranks, -1 if none."""
    steps: Dict[int, set] = {}
    for rank, step, _ in slot_headers(store, job):
        steps.setdefault(rank, set()).add(step)
    if len(steps) < world:
        return -1
    return max(set.intersection(*steps.values()), default=-1)


def sealed_payloads(store: Path, job: str) -> Dict[int, int]:
    """rank -> the largest payload of its sealed snapshots."""
    out: Dict[int, int] = {}
    for rank, _, payload in slot_headers(store, job):
        out[rank] = max(out.get(rank, 0), payload)
    return out


def worker_env() -> Dict[str, str]:
    # A member that never arrives (or an NCCL that cannot start) fails the restore in 60 s, not
    # the library's default 300 s; deterministic cuBLAS for the bit-exact replay on a GPU.
    return {"TESSERA_DP_RESTORE_TIMEOUT_MS": "60000", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def run_kill_and_restore(daemon: Daemon, tmp_path: Path, job: str, world: int, victim: int,
                         group: str, device: str) -> Tuple[List[Dict], Dict, int]:
    """Trains `world` members, kills them, checks the shards' sizes, restores them all from
    fresh processes (each verifies itself bit-exact against a replay) and returns the members'
    restore stats, the registered layout and the restored step."""
    seed = draw_seed()
    env = worker_env()

    def extra(phase: str) -> List[str]:
        args = ["--device", device, "--group", group]
        if group == "dist":  # a fresh file store for each phase's process group
            args += ["--init-method", f"file://{tmp_path}/{phase}.rendezvous"]
        return args

    trainers = start_group(daemon, job, "train", world, seed, tmp_path, extra("train"), env)
    sealed = train_then_kill(trainers, victim, daemon.store, job)
    layouts = {w.value("layout") for w in trainers}
    assert len(layouts) == 1 and None not in layouts, f"the members registered {layouts}"
    layout = json.loads(layouts.pop())
    replicated, whole = layout["replicated_bytes"], layout["whole_bytes"]
    bounds = slice_bounds(replicated, world)
    print(f"layout {layout}; slices {bounds}; every member sealed step {sealed}")

    # What each member copied per snapshot, and what the daemon holds for it: its slice of the
    # replicated bytes plus its whole entries (a blob counts its valid bytes when copied, its
    # capacity in the payload's layout).
    for w in trainers:
        own = bounds[w.rank + 1] - bounds[w.rank]
        assert w.value("copied") is not None, w.describe()
        copied, sealed_count = (int(x) for x in w.value("copied").split())
        per_snapshot = copied / sealed_count
        assert own < per_snapshot <= own + whole, (w.rank, per_snapshot, own, whole, seed)
    payloads = sealed_payloads(daemon.store, job)
    assert sorted(payloads) == list(range(world)), payloads
    for rank, payload in payloads.items():
        own = bounds[rank + 1] - bounds[rank]
        assert abs(own - replicated / world) <= ALIGNMENT, (rank, own, replicated)
        assert own + whole <= payload <= own + whole + MANIFEST_SLACK, (
            f"rank {rank}: payload {payload} bytes, its slice {own} + whole entries {whole}; "
            f"seed {seed}")
    print(f"sealed payload per member (its slice of the {replicated} replicated bytes, plus "
          f"{whole} bytes of its own entries and the manifest): " + ", ".join(
              f"rank {r} {p} B (slice {bounds[r + 1] - bounds[r]} B, "
              f"{(bounds[r + 1] - bounds[r]) / replicated:.3f})"
              for r, p in sorted(payloads.items())))

    verifiers = start_group(daemon, job, "verify", world, seed, tmp_path, extra("verify"), env)
    codes = [v.wait(240) for v in verifiers]
    for v, code in zip(verifiers, codes):
        assert code == 0, (f"seed {seed}: rank {v.rank} failed to verify\n"
                           + "\n".join(w.describe() for w in verifiers)
                           + f"\n--- tesserad log (last 6000 characters)\n{daemon.log()[-6000:]}")
    steps = [int(v.value("verified") or -1) for v in verifiers]
    assert len(set(steps)) == 1, f"the members restored different steps: {steps}"
    assert steps[0] >= sealed, f"restored step {steps[0]}, but every member had sealed {sealed}"
    stats = [json.loads(v.value("stats") or "{}") for v in verifiers]
    for v, s in zip(verifiers, stats):
        print(f"rank {v.rank}: restored step {steps[0]}; dp_size {s['dp_size']}, "
              f"gathered_with_nccl {s['gathered_with_nccl']}, bytes_gathered "
              f"{s['bytes_gathered']}")
        for line in v.stderr_path.read_text(errors="replace").splitlines():
            if "members' slices" in line:
                print(f"  rank {v.rank}: {line}")
        own = bounds[v.rank + 1] - bounds[v.rank]
        assert s["dp_size"] == world, s
        assert s["bytes_gathered"] == replicated - own > 0, (v.rank, s, own, replicated)
    return stats, layout, steps[0]


# -- tests -----------------------------------------------------------------------------------------


def test_a_group_snapshot_from_before_the_first_optimizer_step_restores(daemon,
                                                                          tmp_path) -> None:
    """A GradScaler skips the optimizer steps whose gradients overflow, often the first ones, so
    a group's first snapshots hold no optimizer state. The group is killed before its first
    optimizer step; fresh members, whose optimizer has no state either, restore together (the
    state primed to restore into does not match, and is dropped again on every member), each
    bit-exact against a replay, train on identically and snapshot again."""
    seed = draw_seed()
    world = 2
    extra = ["--device", "cpu", "--group", "list", "--first-optimizer-step", "100000"]
    job = "dp-before-first-step"
    trainers = start_group(daemon, job, "train", world, seed, tmp_path, extra, worker_env())
    sealed = train_then_kill(trainers, 1, daemon.store, job)
    layout = json.loads(trainers[0].value("layout") or "{}")
    verifiers = start_group(daemon, job, "verify", world, seed, tmp_path, extra, worker_env())
    codes = [v.wait(240) for v in verifiers]
    for v, code in zip(verifiers, codes):
        assert code == 0, (f"seed {seed}: rank {v.rank} failed to verify\n"
                           + "\n".join(w.describe() for w in verifiers)
                           + f"\n--- tesserad log (last 6000 characters)\n{daemon.log()[-6000:]}")
    steps = {int(v.value("verified") or -1) for v in verifiers}
    assert len(steps) == 1 and steps.pop() >= sealed, (steps, sealed, seed)
    for v in verifiers:
        stats = json.loads(v.value("stats") or "{}")
        assert stats["dp_size"] == world, stats
    print(f"registered without optimizer state: {layout}; restored on {world} members")


@pytest.mark.parametrize("world,victim,group", [(4, 2, "list"), (3, 0, "dist")],
                         ids=["4-members-rank-list", "3-members-process-group"])
def test_killed_group_restores_bit_exact_on_every_member(daemon, tmp_path, world, victim,
                                                         group) -> None:
    """N members, one killed mid-run and then the rest; fresh members restore together. Each
    stored ~1/N of the replicated bytes; each gets all of them back (its slice from its shard,
    the rest from the others' through the daemon, on the CPU), plus its own buffer, RNG states
    and user dict, bit-exact against a replay of the training, and trains on identically."""
    stats, _, _ = run_kill_and_restore(daemon, tmp_path, f"dp-kill-{group}", world, victim,
                                       group, "cpu")
    for s in stats:
        assert s["gathered_with_nccl"] is False, s


def test_cuda_two_members_on_one_gpu_restore_bit_exact(daemon, tmp_path) -> None:
    """Two members on the same GPU: NCCL cannot hold two ranks of one communicator on one device
    (or libnccl does not load), so the restore gathers through the daemon, still bit-exact."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the GPU copy path is tested on a GPU machine")
    stats, layout, step = run_kill_and_restore(daemon, tmp_path, "dp-cuda", 2, 1, "list",
                                               "cuda:0")
    print(f"GPU {torch.cuda.get_device_name(0)}: restored step {step}, layout {layout}, stats "
          + json.dumps(stats))
    for s in stats:
        assert s["has_gpu"], s
        assert s["gathered_with_nccl"] is False, (
            f"two ranks on one GPU gathered over NCCL: {s}")


@pytest.mark.parametrize("world", [2, 4], ids=["2-gpus", "4-gpus"])
def test_cuda_members_on_their_own_gpus_gather_over_nccl(daemon, tmp_path, world) -> None:
    """One member per GPU, as on a real node: one is killed mid-run, then the rest; fresh members
    restore together, each its own slice from its shard and the others' slices broadcast over
    the NCCL communicator the library creates (no framework handle), bit-exact on every member."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA devices, this machine has "
                    f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}: the "
                    "multi-GPU restore runs on a multi-GPU machine")
    stats, layout, step = run_kill_and_restore(daemon, tmp_path, f"dp-gpus-{world}", world,
                                               world - 1, "list", "cuda:each")
    names = [torch.cuda.get_device_name(i) for i in range(world)]
    print(f"GPUs {names}: restored step {step}, layout {layout}, stats " + json.dumps(stats))
    for s in stats:
        assert s["has_gpu"], s
        assert s["gathered_with_nccl"] is True, f"the slices did not come over NCCL: {s}"
        assert s["gather_note"] == "", s


def test_client_members_store_exact_slices_and_gather_the_rest(daemon, monkeypatch) -> None:
    """Three Clients (one thread each) as one DP group over tensors of odd sizes and dtypes: each
    copies exactly its range of the replicated bytes plus its own entries; a restore by all
    three together brings back every byte."""
    monkeypatch.setenv("TESSERA_DP_RESTORE_TIMEOUT_MS", "60000")  # read by Client()
    seed = draw_seed()
    rng = np.random.default_rng(seed)
    world = 3
    shapes = [("a", 1001, "float32"), ("b", 333, "float64"), ("own", 77, "int32"),
              ("c", 4099, "float16"), ("d", 5, "int64")]
    replicated_flags = [name != "own" for name, _, _ in shapes] + [False]  # + a blob
    common = {name: random_array(rng, n, dtype) for name, n, dtype in shapes if name != "own"}
    members = []
    for rank in range(world):
        arrays = {name: common[name].copy() if name != "own" else random_array(rng, n, dtype)
                  for name, n, dtype in shapes}
        blob = ctypes.create_string_buffer(512)
        payload = rng.integers(1, 256, size=100 + rank, dtype=np.uint8).tobytes()
        ctypes.memmove(blob, payload, len(payload))
        members.append((arrays, blob, payload))
    replicated = sum(a.nbytes for a in common.values())
    bounds = slice_bounds(replicated, world)

    clients = []
    for rank, (arrays, blob, payload) in enumerate(members):
        client = tessera.Client(str(daemon.socket), when_busy="wait", use_gpu=False)
        client.set_data_parallel(list(range(world)), replicated_flags)
        entries = [Entry.tensor(name, arrays[name].ctypes.data, dtype, arrays[name].shape)
                   for name, _, dtype in shapes]
        entries.append(Entry.blob("blob", ctypes.addressof(blob), 512, len(payload)))
        client.register("dp-client", rank, world, entries)
        assert client.snapshot(3)
        client.wait()
        own = bounds[rank + 1] - bounds[rank]
        assert client.stats().bytes_copied == own + arrays["own"].nbytes + len(payload), (
            rank, client.stats(), bounds, seed)
        clients.append(client)

    expected = [({k: v.copy() for k, v in arrays.items()}, payload)
                for arrays, _, payload in members]
    for arrays, blob, _ in members:  # other values everywhere, never zeros
        for a in arrays.values():
            a[...] = random_array(rng, a.size, str(a.dtype)).reshape(a.shape)
        ctypes.memset(blob, 0x5A, 512)

    results: Dict[int, object] = {}

    def restore(rank: int) -> None:
        try:
            results[rank] = clients[rank].restore()
        except Exception as e:  # reported below, on the test's thread
            results[rank] = e

    threads = [threading.Thread(target=restore, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == {r: 3 for r in range(world)}, results
    for rank, client in enumerate(clients):
        arrays, blob, _ = members[rank]
        want, payload = expected[rank]
        for name in arrays:
            assert arrays[name].tobytes() == want[name].tobytes(), (rank, name, seed)
        assert client.entry_length(len(shapes)) == len(payload)
        assert blob.raw[:len(payload)] == payload, rank
        stats = client.stats()
        own = bounds[rank + 1] - bounds[rank]
        assert (stats.dp_size, stats.gathered_with_nccl, stats.bytes_gathered) == \
            (world, False, replicated - own), stats
        # Host memory (use_gpu=False): DP rank 0's offer says why NCCL was not used.
        assert stats.gather_note == "rank 0: no replicated tensor is GPU memory", stats
        client.close()



def test_bad_dp_group_is_a_clear_error(daemon) -> None:
    torch.manual_seed(3)
    model = nn.Linear(8, 8)
    socket = str(daemon.socket)

    def snapshotter(rank: int, world: int, group: object) -> tessera.torch.Snapshotter:
        # Without an optimizer, the Snapshotter registers at once: every check runs here.
        return tessera.torch.Snapshotter(model, None, job_id="dp-bad", rank=rank,
                                         world_size=world, socket_path=socket, dp_group=group)

    with pytest.raises(tessera.InvalidArgumentError,
                       match=r"rank 1 is not in its dp_group \[0, 2\]"):
        snapshotter(1, 3, [0, 2])
    with pytest.raises(tessera.InvalidArgumentError,
                       match=r"dp_group lists a rank twice: \[0, 1, 1\]"):
        snapshotter(0, 3, [0, 1, 1])
    with pytest.raises(tessera.InvalidArgumentError, match=r"dp_group\[\] must be >= 0, got -1"):
        snapshotter(0, 3, [0, -1])
    with pytest.raises(tessera.InvalidArgumentError,
                       match=r"data-parallel member 5 is not a rank of the job \(world size 3\)"):
        snapshotter(0, 3, [0, 1, 5])
    with pytest.raises(tessera.InvalidArgumentError,
                       match="dp_group is a process group, but torch.distributed is not "
                             "initialized"):
        snapshotter(0, 3, object())

    # The raw client: the group is checked against the registration.
    data = random_array(np.random.default_rng(1), 64, "float32")
    blob = ctypes.create_string_buffer(16)
    entries = [Entry.tensor("w", data.ctypes.data, "float32", data.shape),
               Entry.blob("b", ctypes.addressof(blob), 16, 4)]
    cases = [
        ([0, 0, 1], [True, False], r"data-parallel member 0 is listed twice"),
        ([1, 2], [True, False], r"rank 0 is not in its data-parallel group \[1,2\]"),
        ([0, 1], [True], r"replicated flags for 1 entries, but 2 are registered"),
        ([0, 1], [True, True], r"entry 1 \('b'\) is a blob: only tensors can be replicated"),
    ]
    for members, flags, message in cases:
        with tessera.Client(socket, use_gpu=False) as client:
            client.set_data_parallel(members, flags)
            with pytest.raises(tessera.InvalidArgumentError, match=message):
                client.register("dp-bad-client", 0, 3, entries)
    with tessera.Client(socket, use_gpu=False) as client:
        with pytest.raises(tessera.InvalidArgumentError, match="must be job ranks"):
            client.set_data_parallel([0, -2], [True, False])


def test_a_member_missing_from_the_restore_is_named_and_nothing_hangs(daemon, monkeypatch) -> None:
    """Two of three members restore; each gives up after TESSERA_DP_RESTORE_TIMEOUT_MS, naming
    the group it waited for, and the member that did not come is not blocked by them."""
    monkeypatch.setenv("TESSERA_DP_RESTORE_TIMEOUT_MS", "1500")
    seed = draw_seed()
    rng = np.random.default_rng(seed)
    world = 3
    common = random_array(rng, 3000, "float32")
    arrays = [common.copy() for _ in range(world)]
    clients = []
    for rank in range(world):
        client = tessera.Client(str(daemon.socket), when_busy="wait", use_gpu=False)
        client.set_data_parallel(list(range(world)), [True])
        client.register("dp-missing", rank, world,
                        [Entry.tensor("w", arrays[rank].ctypes.data, "float32", common.shape)])
        assert client.snapshot(1)
        client.wait()
        clients.append(client)
    errors: Dict[int, BaseException] = {}

    def restore(rank: int) -> None:
        try:
            clients[rank].restore()
        except BaseException as e:  # reported below, on the test's thread
            errors[rank] = e

    threads = [threading.Thread(target=restore, args=(r,)) for r in (0, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(errors) == [0, 2], errors
    for rank, e in errors.items():
        print(f"rank {rank}: {type(e).__name__}: {e}")
        assert isinstance(e, tessera.TesseraError), e
        assert f"DP rank {rank} waited " in str(e), e
        assert "ms in all for the other members of [0,1,2]" in str(e), e
        assert "still waiting for 1 of 3 (indices 1)" in str(e), e
    for client in clients:
        client.close()
