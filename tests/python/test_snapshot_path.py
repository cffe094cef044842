"""The per-snapshot path of tessera.torch.Snapshotter against a real tesserad: what a snapshot
checks and captures on the training thread, and when.

* A tensor that moved or was replaced between two snapshots is found by the next snapshot's
  check, whatever moved it, and that snapshot holds the new memory's bytes, never the old ones.
* What a snapshot holds is the state at the snapshot() call: changing the user dict, a stateful
  object or the RNG states right after it returns, while the copies are still running, changes
  nothing in it.
* The pickles of Python's and NumPy's RNG states, reused while a state stays the same, are
  reused only when it is exactly the same: NumPy's cached Gaussian and Python's gauss_next
  change without the generators' words changing, and 0.0 and -0.0 differ.

The data and the choices are random; the seed is printed, and TESSERA_TEST_SEED=N repeats a run.
"""

from __future__ import annotations

import copy
import os
import random
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import pytest
import torch
import torch.nn as nn

import tessera
import tessera.torch
from helpers import assert_bit_equal


def _seed() -> int:
    seed = int(os.environ.get("TESSERA_TEST_SEED", random.randrange(1 << 30)))
    print(f"TESSERA_TEST_SEED={seed}")
    return seed


class _Net(nn.Module):
    """Parameters and batch-norm buffers (a float and an int64 one)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.norm = nn.BatchNorm1d(width)
        self.out = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.norm(self.inp(x))))


def _make(seed: int, width: int = 16) -> Tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = _Net(width)
    return model, torch.optim.AdamW(model.parameters(), lr=0.01, amsgrad=True)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    loss = model(torch.randn(6, 8)).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _perturbed(t: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """A copy of `t` in new memory with other values (still valid optimizer state: >= 0 where
    it was)."""
    if t.is_floating_point():
        return t.clone().add_(torch.rand(t.shape, generator=rng, dtype=t.dtype))
    return t.clone().add_(1)


def _replace_state_tensor(model: nn.Module, optimizer: torch.optim.Optimizer,
                          rng: random.Random, trng: torch.Generator) -> str:
    p = rng.choice([p for p in model.parameters() if optimizer.state.get(p)])
    state = optimizer.state[p]
    key = rng.choice([k for k, v in state.items() if isinstance(v, torch.Tensor)])
    state[key] = _perturbed(state[key], trng)
    return f"optimizer state tensor {key!r} replaced in its dict"


def _replace_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer,
                        rng: random.Random, trng: torch.Generator) -> str:
    p = rng.choice([p for p in model.parameters() if optimizer.state.get(p)])
    optimizer.state[p] = {k: _perturbed(v, trng) for k, v in optimizer.state[p].items()}
    return "a parameter's optimizer state dict replaced"


def _move_parameter(model: nn.Module, optimizer: torch.optim.Optimizer,
                    rng: random.Random, trng: torch.Generator) -> str:
    name, p = rng.choice(list(model.named_parameters()))
    p.data = _perturbed(p.data, trng)
    return f"parameter {name} moved (.data =)"


def _move_buffer(model: nn.Module, optimizer: torch.optim.Optimizer,
                 rng: random.Random, trng: torch.Generator) -> str:
    name, b = rng.choice(list(model.named_buffers()))
    b.data = _perturbed(b.data, trng)
    return f"buffer {name} moved (.data =)"


def _reload_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer,
                      rng: random.Random, trng: torch.Generator) -> str:
    state = copy.deepcopy(optimizer.state_dict())
    for values in state["state"].values():
        for k, v in values.items():
            if isinstance(v, torch.Tensor):
                values[k] = _perturbed(v, trng)
    optimizer.load_state_dict(state)
    return "optimizer.load_state_dict"


_MOVES: List[Callable[..., str]] = [_replace_state_tensor, _replace_state_dict, _move_parameter,
                                    _move_buffer, _reload_optimizer]


def test_a_tensor_moved_or_replaced_between_snapshots_is_snapshotted_from_its_new_memory(
        daemon) -> None:
    """Each round: snapshots, one random move of a random tensor, one more snapshot; a fresh
    model restored from that snapshot holds the moved tensor's new bytes. The old memory stays
    alive (the registration holds it) with other bytes, so a snapshot that copied from it would
    differ."""
    seed = _seed()
    rng = random.Random(seed)
    trng = torch.Generator().manual_seed(seed)
    moves = _MOVES * 2
    rng.shuffle(moves)
    model, optimizer = _make(seed)
    step = 0
    for round_, move in enumerate(moves):
        job = f"path-moved-{round_}"
        with tessera.torch.Snapshotter(model, optimizer, job_id=job, every=1,
                                       socket_path=str(daemon.socket), when_busy="wait") as snap:
            for _ in range(rng.randrange(1, 4)):
                _train(model, optimizer)
                assert snap.step(step)
                step += 1
            snap.wait()
            what = move(model, optimizer, rng, trng)
            assert snap.step(step)
            snap.wait()
            expected = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
        fresh, fresh_optimizer = _make(seed + 1 + round_)
        with tessera.torch.Snapshotter(fresh, fresh_optimizer, job_id=job,
                                       socket_path=str(daemon.socket)) as restorer:
            assert restorer.restore_latest() == step, what
            try:
                assert_bit_equal(expected, (fresh.state_dict(), fresh_optimizer.state_dict()))
            except AssertionError as e:
                raise AssertionError(f"after {what} (TESSERA_TEST_SEED={seed}): {e}") from None
        step += 1


class _Position:
    """A stateful object whose state_dict() hands out its live list, as many do."""

    def __init__(self) -> None:
        self.seen: List[float] = []

    def state_dict(self) -> Dict[str, Any]:
        return {"seen": self.seen}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.seen = list(state["seen"])


def _rng_states() -> List[Any]:
    return [torch.get_rng_state(), random.getstate(), np.random.get_state()]


@pytest.mark.parametrize("callable_user_state", [False, True])
def test_a_snapshot_holds_the_state_of_its_call_not_what_follows(daemon,
                                                                 callable_user_state) -> None:
    """Right after each snapshot() returns, while its copies are still running (8 MiB of
    tensors), the user dict, a stateful object and every RNG change; the restored values are the
    ones of the call."""
    seed = _seed()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % (1 << 32))
    random.seed(seed)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 1024)).sum().backward()
    optimizer.step()
    user: Dict[str, Any] = {"blob": rng.randbytes(3000),
                            "floats": [rng.uniform(-1, 1) for _ in range(50)],
                            "array": np.frombuffer(rng.randbytes(800), dtype=np.float64).copy(),
                            "nested": {"position": rng.randrange(1 << 40)}}
    position = _Position()
    job = f"path-point-{int(callable_user_state)}"
    with tessera.torch.Snapshotter(
            model, optimizer, job_id=job, every=1, socket_path=str(daemon.socket),
            user_state=(lambda: user) if callable_user_state else user,
            stateful={"position": position}) as snap:
        taken = 0
        for step in range(20):
            rng_before = _rng_states()
            expected_user = copy.deepcopy(user)
            expected_position = copy.deepcopy(position.seen)
            started = snap.step(step)
            # Everything changes at once, in place where it can.
            user["blob"] = rng.randbytes(3000)
            user["floats"].append(rng.uniform(-1, 1))
            user["array"].view(np.uint64)[:] += 1  # its bits change (NaNs among them), in place
            user["nested"]["position"] += 1
            position.seen.append(rng.random())
            torch.rand(3)
            random.random()
            np.random.randn()
            if started:
                taken += 1
                last = (step, rng_before, expected_user, expected_position)
        snap.wait()
        assert taken >= 1 and snap.stats().failed == 0
    step, rng_before, expected_user, expected_position = last

    fresh = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024))
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.1)
    fresh_user: Dict[str, Any] = {}
    fresh_position = _Position()
    restored: List[Dict[str, Any]] = []
    with tessera.torch.Snapshotter(
            fresh, fresh_optimizer, job_id=job, socket_path=str(daemon.socket),
            user_state=(lambda: fresh_user) if callable_user_state else fresh_user,
            load_user_state=restored.append, stateful={"position": fresh_position}) as restorer:
        assert restorer.restore_latest() == step
        note = f"step {step} (TESSERA_TEST_SEED={seed})"
        try:
            assert_bit_equal(expected_user, restored[0], "user")
            assert_bit_equal(expected_position, fresh_position.seen, "stateful")
            assert_bit_equal(rng_before, _rng_states(), "rng")
        except AssertionError as e:
            raise AssertionError(f"{note}: {e}") from None


def _python_gauss_consumed() -> None:
    random.gauss(0.0, 1.0)  # draws a pair: one returned, one kept in gauss_next


def _numpy_gauss_pending() -> None:
    np.random.seed(random.randrange(1 << 32))
    np.random.randn()  # draws a pair: one returned, one kept (has_gauss = 1)


# (what, setup, change): the change leaves the generator's words as they are and changes only
# the cached Gaussian (or nothing).
_RNG_CHANGES: List[Tuple[str, Callable[[], None], Callable[[], None]]] = [
    ("NumPy's cached Gaussian consumed", _numpy_gauss_pending, lambda: np.random.randn()),
    ("NumPy's cached Gaussian restored by set_state",
     lambda: (_numpy_gauss_pending(), _RESTORE.append(np.random.get_state()),
              np.random.randn()),
     lambda: np.random.set_state(_RESTORE.pop())),
    ("NumPy's cached Gaussian 0.0 -> -0.0",
     lambda: np.random.set_state(np.random.get_state()[:3] + (1, 0.0)),
     lambda: np.random.set_state(np.random.get_state()[:3] + (1, -0.0))),
    ("Python's gauss_next consumed", _python_gauss_consumed,
     lambda: random.gauss(0.0, 1.0)),
    ("Python's gauss_next 0.0 -> -0.0",
     lambda: random.setstate(random.getstate()[:2] + (0.0,)),
     lambda: random.setstate(random.getstate()[:2] + (-0.0,))),
    ("Python's gauss_next 1.0 -> 1",
     lambda: random.setstate(random.getstate()[:2] + (1.0,)),
     lambda: random.setstate(random.getstate()[:2] + (1,))),
    ("nothing changed", lambda: None, lambda: None),
]
_RESTORE: List[Any] = []


@pytest.mark.parametrize("what,setup,change", _RNG_CHANGES, ids=[c[0] for c in _RNG_CHANGES])
def test_rng_states_that_differ_only_in_a_cached_gaussian_are_snapshotted_anew(
        daemon, what: str, setup: Callable[[], None], change: Callable[[], None]) -> None:
    seed = _seed()
    random.seed(seed)
    model, optimizer = _make(seed)
    _train(model, optimizer)
    job = "path-rng"
    with tessera.torch.Snapshotter(model, optimizer, job_id=job, every=1,
                                   socket_path=str(daemon.socket), when_busy="wait") as snap:
        setup()
        assert snap.step(0)
        snap.wait()
        change()
        expected = [random.getstate(), np.random.get_state()]
        assert snap.step(1)
        snap.wait()
    # Other states before the restore, so that a restore of anything else shows.
    random.seed(seed + 1)
    np.random.seed((seed + 1) % (1 << 32))
    fresh, fresh_optimizer = _make(seed + 2)
    with tessera.torch.Snapshotter(fresh, fresh_optimizer, job_id=job,
                                   socket_path=str(daemon.socket)) as restorer:
        assert restorer.restore_latest() == 1
        try:
            assert_bit_equal(expected, [random.getstate(), np.random.get_state()], "rng")
        except AssertionError as e:
            raise AssertionError(f"{what} (TESSERA_TEST_SEED={seed}): {e}") from None


def test_rng_fingerprints_tell_apart_what_pickles_apart() -> None:
    """No daemon: the fingerprints behind the reuse of RNG pickles."""
    exact = tessera.torch._exact
    assert exact(0.0) != exact(-0.0) and exact(1) != exact(True) and exact(1) != exact(1.0)
    assert exact(float("nan")) == exact(float("nan"))  # the same bits
    python = tessera.torch._python_rng_fingerprint
    numpy = tessera.torch._numpy_rng_fingerprint
    state = random.getstate()
    assert python(state) == python(copy.deepcopy(state))
    assert python(state) != python(state[:2] + (0.5,))
    assert python(("other",)) != python(("other",))  # an unknown shape equals nothing
    np.random.seed(5)
    np.random.randn()
    pending = np.random.get_state()
    assert pending[3] == 1
    assert numpy(pending) == numpy(copy.deepcopy(pending))
    np.random.randn()
    consumed = np.random.get_state()
    assert consumed[1].tobytes() == pending[1].tobytes() and consumed[2] == pending[2]
    assert numpy(consumed) != numpy(pending)
