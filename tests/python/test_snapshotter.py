"""tessera.torch.Snapshotter in this process against a real tesserad: what it restores, what it
refuses, and that it leaves training exactly as it would be without it."""

from __future__ import annotations

import copy
import random
from typing import Any, Dict, Tuple

import numpy as np
import pytest
import torch
import torch.nn as nn

import tessera
import tessera.torch
from helpers import assert_bit_equal


class Net(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, width)
        self.fc2 = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.fc2(torch.nn.functional.dropout(h, 0.2, self.training))


def make(seed: int = 0, width: int = 16,
         optimizer: str = "adamw") -> Tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Net(width)
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1, amsgrad=True)
    return model, opt


def train_step(model: nn.Module, opt: torch.optim.Optimizer) -> float:
    x = torch.randn(6, 8) + random.random() + float(np.random.rand())
    loss = model(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def full_state(model: nn.Module, opt: torch.optim.Optimizer,
               user: Dict[str, Any]) -> Dict[str, Any]:
    return copy.deepcopy({
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": [torch.get_rng_state(), random.getstate(), np.random.get_state()],
        "user": dict(user),
    })


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def test_restores_model_optimizer_rng_and_user_state_bit_exact(daemon) -> None:
    model, opt = make()
    seed_all(11)
    user: Dict[str, Any] = {"epoch": 3, "position": 0, "note": "x"}
    snap = tessera.torch.Snapshotter(model, opt, job_id="snap-exact", rank=0, world_size=1,
                                     every=4, socket_path=str(daemon.socket), user_state=user,
                                     when_busy="wait")
    for step in range(9):
        train_step(model, opt)
        user["position"] = step
        snap.step(step)
        if step == 8:
            snap.wait()
            expected = full_state(model, opt, user)
    for step in range(9, 12):  # move everything on
        train_step(model, opt)
        user["position"] = step
    for group in opt.param_groups:
        group["lr"] = 123.0
    user["extra"] = True
    snap.close()

    # A new process would start from a fresh model: rebuild everything with other values.
    model2, opt2 = make(seed=99)
    seed_all(12345)
    user2: Dict[str, Any] = {"epoch": 0, "position": -1, "note": "x"}
    with tessera.torch.Snapshotter(model2, opt2, job_id="snap-exact", rank=0, world_size=1,
                                   every=4, socket_path=str(daemon.socket),
                                   user_state=user2) as snap2:
        assert snap2.restore_latest() == 8
        assert_bit_equal(expected, full_state(model2, opt2, user2))
        assert opt2.param_groups[0]["lr"] == 0.01
        # Training continues identically from the restored state.
        assert train_step(model2, opt2).hex() == train_step_on_copy(expected).hex()


def train_step_on_copy(state: Dict[str, Any]) -> float:
    model, opt = make(seed=5)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"][0])
    random.setstate(state["rng"][1])
    np.random.set_state(state["rng"][2])
    return train_step(model, opt)


def test_fresh_start_changes_nothing(daemon) -> None:
    """With nothing to restore, the optimizer state created to register it is dropped again:
    training is bit-for-bit what it is without Tessera (Adam's step count starts at 0)."""
    plain_model, plain_opt = make(seed=3)
    seed_all(7)
    plain = [train_step(plain_model, plain_opt).hex() for _ in range(5)]

    model, opt = make(seed=3)
    seed_all(7)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=100)  # wraps optimizer.step too
    with tessera.torch.Snapshotter(model, opt, job_id="snap-fresh", every=2,
                                   socket_path=str(daemon.socket), when_busy="wait") as snap:
        assert snap.restore_latest() is None
        assert len(opt.state) == 0
        protected = []
        for step in range(5):
            protected.append(train_step(model, opt).hex())
            scheduler.step()
            snap.step(step)
        snap.wait()
        assert snap.stats().sealed == 3
    assert protected == plain
    assert_bit_equal(plain_model.state_dict(), model.state_dict())


def test_snapshot_holds_the_state_of_its_step_even_when_the_optimizer_runs_at_once(daemon) -> None:
    """The fence hook makes optimizer.step() wait for the snapshot's copies."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024))  # 8 MiB of parameters
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 1024)).sum().backward()
    opt.step()  # the optimizer state exists: the Snapshotter registers at once
    with tessera.torch.Snapshotter(model, opt, job_id="snap-fence", every=1,
                                   socket_path=str(daemon.socket)) as snap:
        expected = copy.deepcopy((model.state_dict(), opt.state_dict()))
        assert snap.step(0)
        opt.step()  # rewrites every registered tensor while the snapshot is being taken
        snap.wait()
    model2 = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024))
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.1)
    with tessera.torch.Snapshotter(model2, opt2, job_id="snap-fence",
                                   socket_path=str(daemon.socket)) as snap2:
        assert snap2.restore_latest() == 0
        assert_bit_equal(expected, (model2.state_dict(), opt2.state_dict()))


def test_changed_model_is_refused_and_nothing_is_restored(daemon) -> None:
    model, opt = make(width=16)
    with tessera.torch.Snapshotter(model, opt, job_id="snap-shape", every=1,
                                   socket_path=str(daemon.socket), when_busy="wait") as snap:
        train_step(model, opt)
        snap.step(0)
        snap.wait()

    wider, wider_opt = make(seed=4, width=24)
    before = copy.deepcopy(wider.state_dict())
    rng_before = torch.get_rng_state()
    with tessera.torch.Snapshotter(wider, wider_opt, job_id="snap-shape",
                                   socket_path=str(daemon.socket)) as snap:
        with pytest.raises(tessera.FailedPreconditionError) as info:
            snap.restore_latest()
    message = str(info.value)
    assert "does not match the registered state, so nothing was restored" in message
    assert "'model.fc1.weight' is float32[24,8]" in message and "float32[16,8]" in message
    assert_bit_equal(before, wider.state_dict())
    assert len(wider_opt.state) == 0, "the optimizer state created for the restore stays behind"
    assert_bit_equal(rng_before, torch.get_rng_state())

    # The original model still restores: the failed attempt destroyed nothing.
    same, same_opt = make(seed=8, width=16)
    with tessera.torch.Snapshotter(same, same_opt, job_id="snap-shape",
                                   socket_path=str(daemon.socket)) as snap:
        assert snap.restore_latest() == 0
        assert_bit_equal(model.state_dict(), same.state_dict())


def test_replaced_optimizer_tensors_are_registered_again(daemon) -> None:
    model, opt = make(optimizer="sgd")
    with tessera.torch.Snapshotter(model, opt, job_id="snap-moved", every=1,
                                   socket_path=str(daemon.socket), when_busy="wait") as snap:
        train_step(model, opt)
        snap.step(0)
        # load_state_dict replaces every state tensor by a new one at a new address.
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        train_step(model, opt)
        snap.step(1)
        snap.wait()
        expected = copy.deepcopy(opt.state_dict())
    model2, opt2 = make(seed=1, optimizer="sgd")
    with tessera.torch.Snapshotter(model2, opt2, job_id="snap-moved",
                                   socket_path=str(daemon.socket)) as snap2:
        assert snap2.restore_latest() == 1
        assert_bit_equal(expected, opt2.state_dict())


def test_a_state_tensor_replaced_inside_its_dict_or_a_moved_parameter_is_registered_again(
        daemon) -> None:
    """The per-snapshot check sees a state tensor swapped inside the optimizer's own per-parameter
    dict, and a parameter whose storage moved; the snapshot then holds the new tensors."""
    model, opt = make(optimizer="sgd")
    with tessera.torch.Snapshotter(model, opt, job_id="snap-swapped", every=1,
                                   socket_path=str(daemon.socket), when_busy="wait") as snap:
        train_step(model, opt)
        snap.step(0)
        snap.wait()
        for p in model.parameters():
            state = opt.state[p]
            state["momentum_buffer"] = state["momentum_buffer"].clone() + 1
        snap.step(1)
        snap.wait()
        model.fc1.weight.data = model.fc1.weight.data.clone() * 2
        snap.step(2)
        snap.wait()
        expected = copy.deepcopy((model.state_dict(), opt.state_dict()))
    model2, opt2 = make(seed=1, optimizer="sgd")
    with tessera.torch.Snapshotter(model2, opt2, job_id="snap-swapped",
                                   socket_path=str(daemon.socket)) as snap2:
        assert snap2.restore_latest() == 2
        assert_bit_equal(expected, (model2.state_dict(), opt2.state_dict()))


class TiedNet(nn.Module):
    """Batch-norm buffers, which the forward pass updates, and an output tied to the input."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8, bias=False)
        self.norm = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 8, bias=False)
        self.out.weight = self.inp.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(torch.relu(self.inp(x))))


def test_model_with_buffers_and_tied_weights(daemon) -> None:
    torch.manual_seed(0)
    model = TiedNet()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    with tessera.torch.Snapshotter(model, opt, job_id="snap-buffers", every=1,
                                   socket_path=str(daemon.socket), when_busy="wait") as snap:
        train_step(model, opt)
        snap.step(0)
        expected = copy.deepcopy(model.state_dict())
        model(torch.randn(6, 8))  # updates the running statistics right after the snapshot
        snap.wait()
        assert snap._registered is not None
        assert snap._registered.aliases == {"model.out.weight": "model.inp.weight"}
        fences = len(snap._hook_handles) + (snap._wrapped_step is not None)
        assert fences == 2, "optimizer and forward (batch-norm buffers) fences"
    torch.manual_seed(1)
    model2 = TiedNet()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.01)
    with tessera.torch.Snapshotter(model2, opt2, job_id="snap-buffers",
                                   socket_path=str(daemon.socket)) as snap2:
        assert snap2.restore_latest() == 0
        assert_bit_equal(expected, model2.state_dict())
        assert model2.out.weight is model2.inp.weight


def test_user_state_that_outgrows_its_blob_is_a_clear_error(daemon) -> None:
    model, opt = make()
    user: Dict[str, Any] = {"history": []}
    with tessera.torch.Snapshotter(model, opt, job_id="snap-big", every=1,
                                   socket_path=str(daemon.socket), user_state=user,
                                   when_busy="wait") as snap:
        train_step(model, opt)
        snap.step(0)
        snap.wait()
        user["history"] = list(range(100_000))
        with pytest.raises(tessera.BlobTooLargeError,
                           match=r"the pickled user_state is \d+ bytes, over the capacity of "
                                 r"65536 bytes.*user_state_capacity="):
            snap.step(1)
        assert snap.stats().started == 1, "nothing was snapshotted"
        user["history"] = [1, 2]
        train_step(model, opt)
        assert snap.step(2)
        snap.wait()

    # An explicit capacity holds it.
    model2, opt2 = make()
    with tessera.torch.Snapshotter(model2, opt2, job_id="snap-big2", every=1,
                                   socket_path=str(daemon.socket),
                                   user_state=lambda: {"history": list(range(100_000))},
                                   user_state_capacity=1 << 20, when_busy="wait") as snap:
        train_step(model2, opt2)
        snap.step(0)
        snap.wait()
        assert snap.restore_latest() == 0
        assert snap.restored_user_state == {"history": list(range(100_000))}


def test_non_contiguous_tensor_is_refused_with_its_name(daemon) -> None:
    model, opt = make()
    model.fc1.weight.data = model.fc1.weight.data.t().contiguous().t()
    assert not model.fc1.weight.is_contiguous()
    # Without an optimizer state to wait for, the Snapshotter registers at once.
    with pytest.raises(tessera.InvalidArgumentError,
                       match=r"tensor 'model.fc1.weight' \(shape \(16, 8\), strides "
                             r"\(1, 16\)\) is not contiguous"):
        tessera.torch.Snapshotter(model, None, job_id="snap-strided",
                                  socket_path=str(daemon.socket))
    # With one, at the first snapshot.
    with tessera.torch.Snapshotter(model, opt, job_id="snap-strided",
                                   socket_path=str(daemon.socket)) as snap:
        train_step(model, opt)
        with pytest.raises(tessera.InvalidArgumentError, match="is not contiguous"):
            snap.step(0)


def test_bad_arguments_are_clear_errors(daemon, monkeypatch) -> None:
    model, opt = make()
    socket = str(daemon.socket)
    Snapshotter = tessera.torch.Snapshotter
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        Snapshotter(opt, opt, job_id="j", socket_path=socket)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        Snapshotter(model, model, job_id="j", socket_path=socket)  # type: ignore[arg-type]
    with pytest.raises(tessera.InvalidArgumentError, match="every must be >= 1"):
        Snapshotter(model, opt, job_id="j", every=0, socket_path=socket)
    with pytest.raises(TypeError, match="every must be an int"):
        Snapshotter(model, opt, job_id="j", every="10", socket_path=socket)  # type: ignore
    with pytest.raises(TypeError, match="user_state must be a dict or a callable"):
        Snapshotter(model, opt, job_id="j", user_state=[1], socket_path=socket)  # type: ignore
    with pytest.raises(tessera.InvalidArgumentError, match="rank 3 must be below world_size 2"):
        Snapshotter(model, opt, job_id="j", rank=3, world_size=2, socket_path=socket)
    with pytest.raises(tessera.UnavailableError, match="no tesserad answers"):
        Snapshotter(model, opt, job_id="j", socket_path=socket + ".missing")
    with pytest.raises(tessera.InvalidArgumentError,
                       match="staging must be 'off', 'full' or 'adaptive', got 'lazy'"):
        Snapshotter(model, opt, job_id="j", staging="lazy", socket_path=socket)
    with pytest.raises(tessera.InvalidArgumentError, match=r"must be in \(0, 1\], got 1.5"):
        Snapshotter(model, opt, job_id="j", staging_budget=1.5, socket_path=socket)
    with pytest.raises(tessera.InvalidArgumentError, match="staging_budget must be > 0 bytes"):
        Snapshotter(model, opt, job_id="j", staging_budget=0, socket_path=socket)
    with pytest.raises(TypeError, match="staging_budget must be bytes"):
        Snapshotter(model, opt, job_id="j", staging_budget="1G", socket_path=socket)  # type: ignore
    monkeypatch.delenv("TESSERA_JOB_ID", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    with pytest.raises(tessera.InvalidArgumentError, match="no job id"):
        Snapshotter(model, opt, socket_path=socket)
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(tessera.InvalidArgumentError, match="RANK='one' is not an integer"):
        Snapshotter(model, opt, job_id="j", socket_path=socket)
    monkeypatch.delenv("RANK")
    with Snapshotter(model, opt, job_id="j", socket_path=socket,
                     user_state={"f": lambda: 0}) as snap:
        train_step(model, opt)
        with pytest.raises(tessera.InvalidArgumentError, match="user_state does not pickle"):
            snap.step(0)
        with pytest.raises(TypeError, match="step must be an int"):
            snap.step(1.0)  # type: ignore[arg-type]


def test_identity_comes_from_the_torchrun_environment(daemon, monkeypatch) -> None:
    monkeypatch.delenv("TESSERA_JOB_ID", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "elastic-run-7")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    model, opt = make()
    with tessera.torch.Snapshotter(model, opt, socket_path=str(daemon.socket)) as snap:
        assert (snap.job_id, snap.rank, snap.world_size, snap.local_rank) == \
            ("elastic-run-7", 1, 4, 1)
    monkeypatch.setenv("TESSERA_JOB_ID", "explicit-env")
    with tessera.torch.Snapshotter(model, opt, socket_path=str(daemon.socket)) as snap:
        assert snap.job_id == "explicit-env"
    with tessera.torch.Snapshotter(model, opt, job_id="argument", rank=0, world_size=1,
                                   socket_path=str(daemon.socket)) as snap:
        assert (snap.job_id, snap.rank, snap.world_size) == ("argument", 0, 1)


def test_cuda_tensors_round_trip(daemon) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the GPU copy path is tested on a GPU machine")
    torch.manual_seed(0)
    model = Net().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    with tessera.torch.Snapshotter(model, opt, job_id="snap-cuda", every=1,
                                   socket_path=str(daemon.socket), when_busy="wait") as snap:
        x = torch.randn(6, 8, device="cuda")
        model(x).sum().backward()
        opt.step()
        snap.step(0)
        expected = copy.deepcopy((model.state_dict(), opt.state_dict(), torch.cuda.get_rng_state()))
        model(x).sum().backward()
        opt.step()
        torch.rand(3, device="cuda")
        snap.wait()
        assert snap.stats().has_gpu
        assert snap.restore_latest() == 0
        assert_bit_equal(expected,
                         (model.state_dict(), opt.state_dict(), torch.cuda.get_rng_state()))


@pytest.mark.parametrize("staging,budget", [("off", None), ("full", None),
                                            ("adaptive", None), ("adaptive", 4096)])
def test_cuda_snapshot_holds_its_step_in_every_staging_mode(daemon, staging, budget) -> None:
    """The optimizer runs at once after each snapshot (its pre-hook fences): whatever was staged,
    the snapshot holds the state of its own step, bit-exact. A 4 KiB budget stages almost
    nothing and falls back to the fence for the rest."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the GPU copy path is tested on a GPU machine")
    torch.manual_seed(7)
    model = Net(width=4096).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    x = torch.randn(64, 8, device="cuda")
    job = f"snap-staging-{staging}-{budget}"
    with tessera.torch.Snapshotter(model, opt, job_id=job, every=1, staging=staging,
                                   staging_budget=budget, socket_path=str(daemon.socket),
                                   when_busy="wait") as snap:
        for step in range(7):
            model(x).square().mean().backward()
            opt.step()  # fences the previous snapshot's copies
            opt.zero_grad()
            if step < 6:
                snap.step(step)
            if step == 5:
                expected = copy.deepcopy((model.state_dict(), opt.state_dict()))
        snap.wait()
        stats = snap.stats()
        assert stats.sealed == 6 and stats.failed == 0, stats
        if staging == "off":
            assert stats.bytes_staged == 0, stats
        elif budget is None:
            assert stats.bytes_staged > 0, stats
        else:
            assert stats.staging_budget_short > 0 and stats.staging_alloc_failures == 0, stats
            assert stats.staging_buffer_bytes <= 2 << 20, stats
    model2 = Net(width=4096).cuda()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.01)
    with tessera.torch.Snapshotter(model2, opt2, job_id=job,
                                   socket_path=str(daemon.socket)) as snap2:
        assert snap2.restore_latest() == 5
        assert_bit_equal(expected, (model2.state_dict(), opt2.state_dict()))


def test_readme_snippet_runs_and_resumes(daemon, monkeypatch) -> None:
    """The five-line loop of agent/python/README.md, run as written, twice: the second run
    resumes after the first one's snapshot."""
    import re
    from pathlib import Path
    from types import SimpleNamespace

    readme = Path(__file__).resolve().parents[2] / "agent" / "python" / "README.md"
    snippet = re.search(r"```python\n(.*?)```", readme.read_text(), re.S).group(1)
    assert snippet.count("# +") == 5, "the README promises five added lines"
    monkeypatch.setenv("TESSERA_SOCKET", str(daemon.socket))
    monkeypatch.setenv("TESSERA_JOB_ID", "readme")

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> SimpleNamespace:
            return SimpleNamespace(loss=self.fc(x).square().mean())

    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = Model()
        progress = {"batches": 0}

        def next_batch(p: Dict[str, int]) -> torch.Tensor:
            p["batches"] += 1
            return torch.full((2, 4), float(p["batches"]))

        scope = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.01),
                 "num_steps": 3, "next_batch": next_batch, "progress": progress}
        exec(snippet, scope)
        scope["snapshotter"].close()
        runs.append((scope["restored"], dict(progress)))
    assert runs == [(None, {"batches": 3}), (0, {"batches": 3})]
