"""What a training loop carries besides its model and optimizer, snapshotted by
tessera.torch.Snapshotter against a real tesserad: a GradScaler, an LR scheduler, a stateful
sampler (stateful=), the user's own state through a callable that restore_latest never calls,
and the end of a run (close(drop=True)).

Each test trains an uninterrupted reference, then the same loop "killed" at a random step: the
objects are thrown away, new ones are built as a relaunched process would build them, and a new
Snapshotter restores them; the rest of the run must equal the reference bit for bit. The steps
are random; the seed is printed, and TESSERA_TEST_SEED=N repeats a run.
"""

from __future__ import annotations

import os
import random
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

import tessera
import tessera.torch
from helpers import assert_bit_equal


def _seed() -> int:
    seed = int(os.environ.get("TESSERA_TEST_SEED", random.randrange(1 << 30)))
    print(f"TESSERA_TEST_SEED={seed}")
    return seed


def _model(seed: int) -> Tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 4))
    return model, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> str:
    loss = model(x).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item().hex()


def _lrs(optimizer: torch.optim.Optimizer) -> List[str]:
    return [float(g["lr"]).hex() for g in optimizer.param_groups]


# --- LR scheduler --------------------------------------------------------------------------------

def _run_with_scheduler(daemon, job: str, steps: range, seed: int, restore: bool,
                        with_scheduler: bool = True) -> Tuple[List[Tuple[str, List[str]]],
                                                              Optional[int], Dict[str, Any]]:
    """Trains `steps` of a loop with a StepLR(step_size=3, gamma=0.5) scheduler, stepped after
    the optimizer; returns (loss, lrs) per step, the step restored, and the scheduler's state."""
    model, optimizer = _model(seed)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    torch.manual_seed(seed + 1)
    stateful = {"scheduler": scheduler} if with_scheduler else None
    with tessera.torch.Snapshotter(model, optimizer, job_id=job, every=1,
                                   socket_path=str(daemon.socket), when_busy="wait",
                                   stateful=stateful) as snap:
        restored = snap.restore_latest() if restore else None
        out = []
        for step in steps:
            loss = _step(model, optimizer, torch.randn(4, 8))
            scheduler.step()
            out.append((loss, _lrs(optimizer)))
            snap.step(step)
        snap.wait()
    return out, restored, scheduler.state_dict()


def test_step_lr_resumes_with_its_next_decay_on_time(daemon) -> None:
    seed = _seed()
    steps = 14
    kill = random.Random(seed).randrange(1, steps - 4)
    note = f"(TESSERA_TEST_SEED={seed}, restart after step {kill})"
    reference, _, reference_state = _run_with_scheduler(daemon, "lr-ref", range(steps), seed,
                                                        restore=False)
    # The decays of the reference: every 3 steps, to the last bit.
    lrs = [float.fromhex(lr[0]) for _, lr in reference]
    assert lrs[0] == 0.2 and lrs[2] == 0.1 and lrs[5] == 0.05, lrs

    first, _, _ = _run_with_scheduler(daemon, "lr-killed", range(kill + 1), seed, restore=False)
    second, restored, state = _run_with_scheduler(daemon, "lr-killed", range(kill + 1, steps),
                                                  seed + 100, restore=True)
    assert restored == kill, note
    assert first + second == reference, note
    assert_bit_equal(reference_state, state, "scheduler state")

    # The same restart without the scheduler in stateful: its counter starts again at 0, so its
    # decays come at other steps (unless the restart falls on a multiple of step_size), as the
    # issue saw. The checks above would catch it.
    _run_with_scheduler(daemon, "lr-lost", range(kill + 1), seed, restore=False,
                        with_scheduler=False)
    lost, restored, lost_state = _run_with_scheduler(daemon, "lr-lost", range(kill + 1, steps),
                                                     seed + 100, restore=True,
                                                     with_scheduler=False)
    assert restored == kill
    assert lost_state["last_epoch"] == steps - kill - 1 != reference_state["last_epoch"], note
    if kill % 3 != 2:
        assert [lr for _, lr in lost] != [lr for _, lr in reference[kill + 1:]], note


# --- GradScaler ----------------------------------------------------------------------------------

def _grad_scaler(monkeypatch, **kwargs: Any) -> Tuple[Any, torch.device]:
    """An enabled GradScaler, as a fresh process makes it (its scale tensor not created yet),
    and the device of its state: a CUDA one where CUDA is; else PyTorch's CPU GradScaler where
    it has one (2.3 and later); else (PyTorch 1.13, which disables a GradScaler without CUDA) a
    torch.cuda.amp.GradScaler made enabled by telling its constructor that CUDA is there."""
    if torch.cuda.is_available():
        return torch.cuda.amp.GradScaler(**kwargs), torch.device("cuda")
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cpu", **kwargs), torch.device("cpu")
    import torch.cuda.amp.grad_scaler as grad_scaler

    monkeypatch.setattr(grad_scaler, "amp_definitely_not_available", lambda: False)
    scaler = torch.cuda.amp.GradScaler(**kwargs)
    monkeypatch.undo()
    assert scaler.is_enabled()
    return scaler, torch.device("cpu")


def _enabled_grad_scaler(monkeypatch, **kwargs: Any) -> Any:
    """_grad_scaler's, with its state tensors created by its own lazy initializer, as its first
    scale() does (PyTorch 1.13's scale() and unscale_() have no CPU kernels)."""
    scaler, device = _grad_scaler(monkeypatch, **kwargs)
    scaler._lazy_init_scale_growth_tracker(device)
    return scaler


def _scaler_dynamics(scaler: Any, rng: random.Random) -> None:
    """What scaler.update() does after a step, with overflows drawn from `rng`: back off on an
    overflow, grow after growth_interval clean steps. Written through the scaler's public
    update(new_scale=...) and its growth tracker (update()'s kernel is CUDA-only in 1.13)."""
    state = scaler.state_dict()
    tracker = state["_growth_tracker"]
    scale = state["scale"]
    if rng.random() < 0.3:
        scale, tracker = scale * state["backoff_factor"], 0
    else:
        tracker += 1
        if tracker == state["growth_interval"]:
            scale, tracker = scale * state["growth_factor"], 0
    scaler.update(new_scale=float(scale))
    scaler._growth_tracker.fill_(tracker)


def test_grad_scaler_state_is_restored(daemon, monkeypatch) -> None:
    seed = _seed()
    steps = 12
    kill = random.Random(seed).randrange(2, steps - 1)
    note = f"(TESSERA_TEST_SEED={seed}, restart after step {kill})"
    model, optimizer = _model(seed)
    scaler = _enabled_grad_scaler(monkeypatch, init_scale=1024.0, growth_interval=3)
    dynamics = random.Random(seed)
    states = []
    with tessera.torch.Snapshotter(model, optimizer, job_id="scaler", every=1,
                                   socket_path=str(daemon.socket), when_busy="wait",
                                   stateful={"scaler": scaler}) as snap:
        for step in range(kill + 1):
            _step(model, optimizer, torch.randn(4, 8))
            _scaler_dynamics(scaler, dynamics)
            states.append(scaler.state_dict())
            snap.step(step)
        snap.wait()
        for _ in range(3):  # the live scaler moves on after the snapshot
            _scaler_dynamics(scaler, dynamics)
    # From its initial 1024: a back-off at any step, or a growth at the third without one (a
    # back-off at the first step and none after leaves every state saved at 512).
    assert len({1024.0} | {s["scale"] for s in states}) > 1, f"the scale never changed {note}"

    # A relaunch: a fresh scaler, whose scale tensor does not exist yet (scale() creates it).
    model2, optimizer2 = _model(seed + 1)
    fresh, device = _grad_scaler(monkeypatch, init_scale=2.0 ** 16, growth_interval=3)
    with tessera.torch.Snapshotter(model2, optimizer2, job_id="scaler",
                                   socket_path=str(daemon.socket),
                                   stateful={"scaler": fresh}) as snap2:
        assert snap2.restore_latest() == kill, note
    assert_bit_equal(states[kill], fresh.state_dict(), "scaler state")
    fresh._lazy_init_scale_growth_tracker(device)
    assert fresh._scale.item() == states[kill]["scale"], note
    assert fresh._growth_tracker.item() == states[kill]["_growth_tracker"], note

    # A snapshot of a disabled scaler (its state is {}) does not load into an enabled one: a
    # clear error naming it.
    model3, optimizer3 = _model(seed)
    disabled = torch.cuda.amp.GradScaler(enabled=False)
    with tessera.torch.Snapshotter(model3, optimizer3, job_id="scaler-off", every=1,
                                   socket_path=str(daemon.socket), when_busy="wait",
                                   stateful={"scaler": disabled}) as snap3:
        _step(model3, optimizer3, torch.randn(4, 8))
        snap3.step(0)
        snap3.wait()
        assert snap3.restore_latest() == 0  # disabled into disabled: nothing to load
    enabled = _enabled_grad_scaler(monkeypatch)
    model4, optimizer4 = _model(seed)
    with tessera.torch.Snapshotter(model4, optimizer4, job_id="scaler-off",
                                   socket_path=str(daemon.socket),
                                   stateful={"scaler": enabled}) as snap4:
        with pytest.raises(tessera.FailedPreconditionError,
                           match=r"stateful\['scaler'\] \(GradScaler\) does not load the state "
                                 r"it saved: RuntimeError\(.The source state dict is empty"):
            snap4.restore_latest()


def test_a_snapshot_taken_before_the_first_optimizer_step_restores(daemon) -> None:
    """A GradScaler skips the optimizer steps whose gradients overflow, often the first ones, so
    the first snapshots hold no optimizer state. A relaunch restores one (the state created to
    restore into is dropped again) and goes on bit-exact."""
    seed = _seed()
    steps = 8
    kill = random.Random(seed).randrange(0, 3)  # a step before the first optimizer step
    note = f"(TESSERA_TEST_SEED={seed}, restart after step {kill})"

    def run(job: str, span: range, restore: bool) -> Tuple[List[str], Optional[int], Any]:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 4))
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
        torch.manual_seed(seed + 1)
        out = []
        with tessera.torch.Snapshotter(model, optimizer, job_id=job, every=1,
                                       socket_path=str(daemon.socket), when_busy="wait") as snap:
            restored = snap.restore_latest() if restore else None
            if restore:
                assert len(optimizer.state) == 0, f"primed state left behind {note}"
            for step in span:
                loss = model(torch.randn(4, 8)).square().mean()
                optimizer.zero_grad()
                loss.backward()
                if step >= 3:  # the steps before were skipped, as on an overflow
                    optimizer.step()
                out.append(loss.item().hex())
                snap.step(step)
            snap.wait()
        return out, restored, optimizer.state_dict()

    reference, _, reference_state = run("early-ref", range(steps), False)
    first, _, _ = run("early-killed", range(kill + 1), False)
    second, restored, state = run("early-killed", range(kill + 1, steps), True)
    assert restored == kill, note
    assert first + second == reference, note
    assert_bit_equal(reference_state, state, "optimizer state")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a real float16 loop needs CUDA")
def test_grad_scaler_in_a_float16_cuda_loop(daemon) -> None:
    """On a GPU: autocast float16 with a real GradScaler, resumed bit-exact."""
    seed = _seed()
    steps = 10
    kill = random.Random(seed).randrange(1, steps - 2)

    def run(job: str, span: range, restore: bool) -> Tuple[List[str], Optional[int]]:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 8)).cuda()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        scaler = torch.cuda.amp.GradScaler(init_scale=2.0 ** 20, growth_interval=2)
        torch.manual_seed(seed + 1)
        out = []
        with tessera.torch.Snapshotter(model, optimizer, job_id=job, every=1,
                                       socket_path=str(daemon.socket), when_busy="wait",
                                       stateful={"scaler": scaler}) as snap:
            restored = snap.restore_latest() if restore else None
            for step in span:
                x = torch.randn(32, 64, device="cuda") * 100
                with torch.autocast("cuda", dtype=torch.float16):
                    loss = model(x).square().mean()
                optimizer.zero_grad()
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                out.append(f"{loss.item().hex()} {scaler.get_scale().hex()}")
                snap.step(step)
            snap.wait()
        return out, restored

    reference, _ = run("amp-ref", range(steps), False)
    first, _ = run("amp-killed", range(kill + 1), False)
    second, restored = run("amp-killed", range(kill + 1, steps), True)
    assert restored == kill
    assert first + second == reference


# --- A stateful sampler --------------------------------------------------------------------------

class ResumableSampler(Sampler):
    """A shuffling sampler that knows its position: the permutation of each epoch comes from its
    own generator (seed + epoch), and state_dict() says how far it got."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch, self.position = size, seed, 0, 0

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        while self.position < self.size:
            self.position += 1
            yield order[self.position - 1]
        self.epoch, self.position = self.epoch + 1, 0

    def __len__(self) -> int:
        return self.size

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


def _run_with_sampler(daemon, job: str, steps: range, seed: int, restore: bool,
                      with_sampler: bool = True) -> Tuple[List[Tuple[List[int], str]],
                                                          Optional[int], Dict[str, int]]:
    """A loop over a DataLoader of 10 samples in batches of 3 (a short last batch, several
    epochs); returns (indices, loss) per step, the step restored and the sampler's state."""
    model, optimizer = _model(seed)
    data = torch.randn(10, 8, generator=torch.Generator().manual_seed(seed))
    dataset = TensorDataset(torch.arange(10), data)
    sampler = ResumableSampler(len(dataset), seed)
    # A generator of its own: each iter(loader) draws a seed for its workers, from torch's global
    # RNG when none is given, and the relaunch makes one iterator more than the reference did.
    loader = DataLoader(dataset, batch_size=3, sampler=sampler, generator=torch.Generator())
    torch.manual_seed(seed + 2)
    out = []
    with tessera.torch.Snapshotter(model, optimizer, job_id=job, every=1,
                                   socket_path=str(daemon.socket), when_busy="wait",
                                   stateful={"sampler": sampler} if with_sampler else None) as snap:
        restored = snap.restore_latest() if restore else None
        batches = iter(loader)  # made after the restore: it starts where the sampler stands
        for step in steps:
            try:
                indices, x = next(batches)
            except StopIteration:
                batches = iter(loader)
                indices, x = next(batches)
            out.append((indices.tolist(), _step(model, optimizer, x)))
            snap.step(step)
        snap.wait()
    return out, restored, sampler.state_dict()


def test_stateful_sampler_resumes_at_its_position(daemon) -> None:
    seed = _seed()
    steps = 13  # four batches per epoch: three epochs and a bit
    kill = random.Random(seed).randrange(1, steps - 3)
    note = f"(TESSERA_TEST_SEED={seed}, restart after step {kill})"
    reference, _, reference_state = _run_with_sampler(daemon, "sampler-ref", range(steps), seed,
                                                      restore=False)
    assert reference_state["epoch"] == 3, reference_state
    first, _, _ = _run_with_sampler(daemon, "sampler-killed", range(kill + 1), seed, False)
    second, restored, state = _run_with_sampler(daemon, "sampler-killed",
                                                range(kill + 1, steps), seed, True)
    assert restored == kill, note
    assert first + second == reference, note
    assert state == reference_state, note

    # Without the sampler in stateful, the relaunch starts the epoch over: another batch.
    _run_with_sampler(daemon, "sampler-lost", range(kill + 1), seed, False, with_sampler=False)
    lost, _, _ = _run_with_sampler(daemon, "sampler-lost", range(kill + 1, steps), seed, True,
                                   with_sampler=False)
    assert [i for i, _ in lost] != [i for i, _ in reference[kill + 1:]], note


# --- The user's own state ------------------------------------------------------------------------

# A loop written at module level, as nanoGPT's train.py is: its variables exist only once the
# loop has run, and the hook names them.
_SCRIPT = """
snapshotter = tessera.torch.Snapshotter(
    model, optimizer, job_id=job, every=2, socket_path=socket, when_busy="wait",
    user_state=lambda: {"X": X, "best": best},
    load_user_state=lambda state: globals().update(state))
restored = snapshotter.restore_latest()
start = 0 if restored is None else restored + 1
if restored is None:
    X, best = torch.randn(4, 8), 1e9
for step in range(start, steps):
    loss = model(X).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append((step, loss.item().hex()))
    best = min(best, loss.item())
    X = torch.randn(4, 8)  # the next batch, drawn before the snapshot point
    snapshotter.step(step)
snapshotter.wait()
snapshotter.close()
"""


def test_user_state_callable_is_called_only_by_snapshots(daemon) -> None:
    seed = _seed()
    steps = 9
    kill = random.Random(seed).choice([2, 4, 6])  # snapshot steps (every=2)

    def run(job: str, run_steps: int) -> Dict[str, Any]:
        model, optimizer = _model(seed)
        torch.manual_seed(seed + 3)
        scope = {"tessera": tessera, "torch": torch, "model": model, "optimizer": optimizer,
                 "job": job, "socket": str(daemon.socket), "steps": run_steps, "losses": []}
        exec(_SCRIPT, scope)  # a NameError here is the hook called before the loop ran
        return scope

    reference = run("user-ref", steps)
    first = run("user-killed", kill + 1)
    assert first["restored"] is None
    second = run("user-killed", steps)
    assert second["restored"] == kill
    assert first["losses"] + second["losses"] == reference["losses"]
    assert second["snapshotter"].restored_user_state["best"] == \
        min(float.fromhex(loss) for _, loss in first["losses"])
    assert_bit_equal(reference["X"], second["X"], "the batch drawn last")

    # Registered at construction (the optimizer state exists) and restored: still not called.
    model, optimizer = _model(seed)
    _step(model, optimizer, torch.randn(4, 8))
    calls: List[int] = []
    loaded: List[Dict[str, Any]] = []

    def user_state() -> Dict[str, Any]:
        calls.append(1)
        return {"calls": len(calls)}

    snap = tessera.torch.Snapshotter(model, optimizer, job_id="user-calls", every=1,
                                     socket_path=str(daemon.socket), when_busy="wait",
                                     user_state=user_state, load_user_state=loaded.append)
    with snap:
        assert snap._registered is not None and calls == []
        assert snap.restore_latest() is None and calls == []
        snap.step(0)
        snap.step(1)
        snap.wait()
        assert calls == [1, 1]
        assert snap.restore_latest() == 1
        assert calls == [1, 1] and loaded == [{"calls": 2}]
        assert snap.restored_user_state == {"calls": 2}
        assert snap._blobs["user"].capacity == tessera.torch.CALLABLE_USER_STATE_CAPACITY


# --- Clear errors --------------------------------------------------------------------------------

def test_misplaced_or_mismatched_stateful_objects_are_clear_errors(daemon) -> None:
    model, optimizer = _model(0)
    socket = str(daemon.socket)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3)
    scaler = torch.cuda.amp.GradScaler(enabled=False)
    Snapshotter = tessera.torch.Snapshotter
    hint = r"pass LR schedulers, GradScalers, stateful samplers and data loaders by name"
    with pytest.raises(TypeError, match=r"job_id got a StepLR, an object with state_dict\(\) "
                                        r"and load_state_dict\(\): " + hint):
        Snapshotter(model, optimizer, scheduler, socket_path=socket)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"rank got a GradScaler.*stateful=\{'scheduler'"):
        Snapshotter(model, optimizer, "j", scaler, socket_path=socket)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"optimizer \(a torch.optim.Optimizer or None\) got a "
                                        r"StepLR"):
        Snapshotter(model, scheduler, job_id="j", socket_path=socket)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"user_state got a StepLR.*" + hint):
        Snapshotter(model, optimizer, job_id="j", socket_path=socket,
                    user_state=scheduler)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"user_state\['sched'\] is a StepLR.*restored as a "
                                        r"copy, not into your object"):
        Snapshotter(model, optimizer, job_id="j", socket_path=socket,
                    user_state={"sched": scheduler})
    with pytest.raises(TypeError, match=r"stateful must be a dict of name -> object.*got list"):
        Snapshotter(model, optimizer, job_id="j", socket_path=socket,
                    stateful=[scheduler])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"stateful\['loader'\] is a DataLoader, which has no "
                                        r"state_dict\(\).*a plain torch DataLoader cannot resume"):
        Snapshotter(model, optimizer, job_id="j", socket_path=socket,
                    stateful={"loader": DataLoader(TensorDataset(torch.zeros(2)))})
    with pytest.raises(tessera.InvalidArgumentError,
                       match=r"stateful\['opt'\] is the optimizer the Snapshotter was given"):
        Snapshotter(model, optimizer, job_id="j", socket_path=socket,
                    stateful={"opt": optimizer})
    with pytest.raises(tessera.InvalidArgumentError,
                       match=r"stateful\['b'\] is the same object as stateful\['a'\]"):
        Snapshotter(model, optimizer, job_id="j", socket_path=socket,
                    stateful={"a": scheduler, "b": scheduler})
    with pytest.raises(tessera.InvalidArgumentError,
                       match=r"stateful name 'my scheduler' must be 1 to 64 characters of "
                             r"\[A-Za-z0-9._-\]"):
        Snapshotter(model, optimizer, job_id="j", socket_path=socket,
                    stateful={"my scheduler": scheduler})
    with pytest.raises(tessera.InvalidArgumentError,
                       match=r"stateful_capacity names \['scaler'\], which stateful= does not"):
        Snapshotter(model, optimizer, job_id="j", socket_path=socket,
                    stateful={"scheduler": scheduler}, stateful_capacity={"scaler": 1024})

    # A user dict that gains a stateful object later: refused at the snapshot, nothing taken.
    user: Dict[str, Any] = {}
    with Snapshotter(model, optimizer, job_id="stateful-errors", every=1, socket_path=socket,
                     when_busy="wait", user_state=user, stateful={"scheduler": scheduler}) as snap:
        _step(model, optimizer, torch.randn(4, 8))
        user["scaler"] = scaler
        with pytest.raises(TypeError, match=r"user_state\['scaler'\] is a GradScaler"):
            snap.step(0)
        del user["scaler"]
        assert snap.step(1)
        snap.wait()
        assert snap.stats().started == 1

    # A relaunch that names other objects: refused, saying what must match.
    model2, optimizer2 = _model(1)
    with Snapshotter(model2, optimizer2, job_id="stateful-errors", socket_path=socket,
                     stateful={"sampler": ResumableSampler(4, 0)}) as snap:
        with pytest.raises(tessera.FailedPreconditionError,
                           match=r"'blob.state.sampler' is registered but not in the snapshot.*"
                                 r"stateful= must name the same objects"):
            snap.restore_latest()


class GrowingState:
    """A stateful object whose state grows (a log of everything it saw)."""

    def __init__(self) -> None:
        self.seen: List[int] = []

    def state_dict(self) -> Dict[str, Any]:
        return {"seen": list(self.seen)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.seen = list(state["seen"])


def test_stateful_state_that_outgrows_its_blob_is_a_clear_error(daemon) -> None:
    model, optimizer = _model(0)
    growing = GrowingState()
    with tessera.torch.Snapshotter(model, optimizer, job_id="stateful-big", every=1,
                                   socket_path=str(daemon.socket), when_busy="wait",
                                   stateful={"log": growing}) as snap:
        _step(model, optimizer, torch.randn(4, 8))
        assert snap.step(0)
        growing.seen = list(range(50_000))
        with pytest.raises(tessera.BlobTooLargeError,
                           match=r"the pickled state_dict\(\) of stateful\['log'\] "
                                 r"\(GrowingState\) is \d+ bytes, over the capacity of 65536 bytes.*"
                                 r"stateful_capacity=\{'log': bytes\}"):
            snap.step(1)
        snap.wait()
        assert snap.stats().started == 1, "nothing was snapshotted"

    # With the capacity asked for, it fits, and comes back whole.
    grown = GrowingState()
    grown.seen = list(range(50_000))
    model2, optimizer2 = _model(0)
    with tessera.torch.Snapshotter(model2, optimizer2, job_id="stateful-big2", every=1,
                                   socket_path=str(daemon.socket), when_busy="wait",
                                   stateful={"log": grown},
                                   stateful_capacity={"log": 1 << 20}) as snap:
        _step(model2, optimizer2, torch.randn(4, 8))
        snap.step(0)
        snap.wait()
        grown.seen = []
        assert snap.restore_latest() == 0
    assert grown.seen == list(range(50_000))


# --- The end of a run ----------------------------------------------------------------------------

def test_close_with_drop_ends_the_job(daemon) -> None:
    """A finished run closes with drop=True: the next launch with the job id starts afresh, at
    any step, and the daemon holds nothing of the old run."""
    model, optimizer = _model(0)
    snap = tessera.torch.Snapshotter(model, optimizer, job_id="finished", every=1,
                                     socket_path=str(daemon.socket), when_busy="wait")
    for step in range(6):
        _step(model, optimizer, torch.randn(4, 8))
        snap.step(step)
    snap.wait()
    with tessera.Client(str(daemon.socket)) as client:
        assert [v.step for v in client.list_versions("finished") if v.sealed] == [5]
    snap.close(drop=True)
    snap.close(drop=True)  # idempotent
    with tessera.Client(str(daemon.socket)) as client:
        assert client.list_versions("finished") == []

    model2, optimizer2 = _model(1)
    before = {k: v.clone() for k, v in model2.state_dict().items()}
    with tessera.torch.Snapshotter(model2, optimizer2, job_id="finished", every=1,
                                   socket_path=str(daemon.socket), when_busy="wait") as snap2:
        assert snap2.restore_latest() is None
        assert_bit_equal(before, model2.state_dict())
        for step in range(3):  # the new run starts over at step 0
            _step(model2, optimizer2, torch.randn(4, 8))
            snap2.step(step)
        snap2.wait()
        assert snap2.restore_latest() == 2
