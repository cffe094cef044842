"""examples/train_gpt.py, killed and restarted under a real tesserad, continues bit for bit.

Each test runs the uninterrupted reference first (with the same seed, under another job id),
saving the full state (model, optimizer, RNG states, user dict) at every snapshot step; then the
interrupted run, whose state right after each restore and at the end must equal the reference's
bit for bit, and whose every printed loss (float.hex) must equal the reference's.

The kill steps are random; the seed is printed, and TESSERA_TEST_SEED=N repeats a run.
"""

from __future__ import annotations

import os
import random
import re
import signal
from pathlib import Path
from typing import List, Optional

import pytest
import torch

from helpers import (PYTHON, TRAIN_GPT, assert_bit_equal, assert_same_losses, load, run,
                     run_expecting_failure)

EVERY = 4


def _seed() -> int:
    seed = int(os.environ.get("TESSERA_TEST_SEED", random.randrange(1 << 30)))
    print(f"TESSERA_TEST_SEED={seed}")
    return seed


def _resumed_steps(output: str) -> List[Optional[int]]:
    out: List[Optional[int]] = []
    for line in output.splitlines():
        match = re.search(r"rank \d+: (fresh start|resumed from step (\d+))", line)
        if match:
            out.append(int(match.group(2)) if match.group(2) else None)
    return out


def _trainer(steps: int, dump: Path, *extra: str, device: str = "cpu") -> List[str]:
    return [PYTHON, str(TRAIN_GPT), "--steps", str(steps), "--every", str(EVERY),
            "--device", device, "--dump-dir", str(dump), *extra]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_killed_trainer_resumes_bit_exact(daemon, tmp_path: Path, device: str) -> None:
    """One process, SIGKILLed at two random steps (right after a snapshot started, when the draw
    says so); the daemon itself is SIGKILLed and restarted after the first kill; a launch with a
    changed model is refused without touching anything."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: this variant runs on a GPU machine")
    seed = _seed()
    steps = 20
    rng = random.Random(seed)
    first, second = sorted(rng.sample(range(0, steps - 2), 2))
    note = f"(TESSERA_TEST_SEED={seed}, kills at steps {first} and {second})"
    print(note)

    reference = run(_trainer(steps, tmp_path / "ref", device=device), daemon.env("gpt-ref"))
    env = daemon.env("gpt-killed")
    dump = tmp_path / "killed"
    outputs = [run(_trainer(steps, dump, "--kill-at-step", str(first), "--when-busy", "wait",
                            device=device),
                   env, expect_signal=signal.SIGKILL)]
    assert _resumed_steps(outputs[0]) == [None]

    daemon.kill()   # the daemon dies too; a restarted one re-adopts the sealed snapshot
    daemon.start()

    refused = run_expecting_failure(
        _trainer(steps, tmp_path / "wide", "--width", "48", device=device), env)
    assert "FailedPreconditionError" in refused and \
        "does not match the registered state, so nothing was restored" in refused, refused

    outputs.append(run(_trainer(steps, dump, "--kill-at-step", str(second), "--when-busy",
                                "wait", device=device), env, expect_signal=signal.SIGKILL))
    outputs.append(run(_trainer(steps, dump, "--when-busy", "wait", device=device), env))

    resumed = [_resumed_steps(o)[0] for o in outputs[1:]]
    for kill, got in zip((first, second), resumed):
        # With when_busy=wait, the snapshot before the newest started one is sealed for sure.
        newest = kill - kill % EVERY
        allowed = {newest, newest - EVERY} if newest >= EVERY else {newest, None}
        assert got in allowed, f"killed at step {kill}, resumed from {got} {note}"
    for got in resumed:
        if got is not None:
            assert_bit_equal(load(tmp_path / "ref" / f"rank0_step{got}.pt"),
                             load(dump / f"rank0_restored{got}.pt"), f"restored step {got}")
    assert_bit_equal(load(tmp_path / "ref" / "rank0_final.pt"), load(dump / "rank0_final.pt"),
                     "final state")
    assert_same_losses(reference, "\n".join(outputs), ranks=1, steps=steps)


def _torchrun(steps: int, dump: Path, *extra: str) -> List[str]:
    # --redirects 1 --tee 1: torchrun of PyTorch 1.13 on Python 3.11 fails on its defaults (0),
    # whose IntFlag lookup returns None there; these values work on every version.
    return [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "--monitor_interval", "0.2", "--redirects", "1", "--tee", "1",
            str(TRAIN_GPT), "--steps", str(steps), "--every", str(EVERY), "--device", "cpu",
            "--dump-dir", str(dump), *extra]


def test_two_ranks_gloo_identical_loss_curve(daemon, tmp_path: Path) -> None:
    """torchrun, 2 ranks, gloo: every rank SIGKILLed at step K, torchrun launched again, the
    ranks resume from their snapshots, and every loss of every rank equals the uninterrupted
    run's.

    The job is launched twice rather than restarted by torchrun's --max_restarts: PyTorch 2.x's
    in-place restart of a gloo group failed to reconnect on the GPU machine (the new ranks were
    handed the dead ranks' addresses), which is torchrun's business, not Tessera's.
    """
    seed = _seed()
    steps = 16
    # K is at least 2 steps past a snapshot step, so that the newest snapshot has usually sealed
    # on both ranks when they are killed; when it has not (a loaded machine), they resume
    # together from the one before, which when_busy=wait guarantees was sealed.
    kill = random.Random(seed).choice([k for k in range(EVERY, steps - 1) if k % EVERY >= 2])
    note = f"(TESSERA_TEST_SEED={seed}, kill at step {kill})"
    print(note)

    run(_torchrun(steps, tmp_path / "ref"), daemon.env("gpt2-ref"), timeout_s=180)
    env = daemon.env("gpt2-killed")
    killed = run_expecting_failure(_torchrun(steps, tmp_path / "killed", "--kill-at-step",
                                             str(kill), "--when-busy", "wait"), env,
                                   timeout_s=180)
    assert "exitcode  : -9" in killed, killed
    resumed = run(_torchrun(steps, tmp_path / "killed"), env, timeout_s=180)

    newest = kill - kill % EVERY
    assert _resumed_steps(killed) == [None, None], f"{killed} {note}"
    steps_resumed = _resumed_steps(resumed)
    restored = steps_resumed[0]
    assert restored in (newest, newest - EVERY) and steps_resumed == [restored, restored], (
        f"killed at step {kill}: the ranks resumed from {steps_resumed}, not both from step "
        f"{newest} (or {newest - EVERY} if {newest} had not sealed on both) {resumed} {note}")
    for rank in range(2):
        assert_bit_equal(load(tmp_path / "ref" / f"rank{rank}_step{restored}.pt"),
                         load(tmp_path / "killed" / f"rank{rank}_restored{restored}.pt"),
                         f"rank {rank} restored step {restored}")
        assert_bit_equal(load(tmp_path / "ref" / f"rank{rank}_final.pt"),
                         load(tmp_path / "killed" / f"rank{rank}_final.pt"), f"rank {rank} final")
    # From the ranks' own files: torchrun's --tee interleaves the ranks' output and once split a
    # loss in the middle (TESSERA_TEST_SEED=132847736).
    def losses_of(run_dir: Path) -> str:
        return "".join((run_dir / f"rank{rank}_losses.txt").read_text() for rank in range(2))

    assert_same_losses(losses_of(tmp_path / "ref"), losses_of(tmp_path / "killed"), ranks=2,
                       steps=steps)


def test_ranks_that_sealed_different_steps_resume_together(daemon, tmp_path: Path) -> None:
    """Rank 0 sealed steps 4 then 8, rank 1 only 4 (it died before sealing 8). The daemon kept
    step 4 for rank 0 as the job's restore point (the newest step every rank holds), so both
    ranks resume from step 4, and rank 0's step 8, from the abandoned run, is dropped."""
    import subprocess

    worker = Path(__file__).with_name("disagreeing_ranks.py")
    env = daemon.env("disagreeing")
    for phase in ("train", "restore"):
        init = f"file://{tmp_path}/rendezvous-{phase}"
        procs = [subprocess.Popen([PYTHON, str(worker), str(rank), init, phase], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for rank in range(2)]
        outputs = [p.communicate(timeout=120)[0].decode(errors="replace") for p in procs]
        codes = [p.returncode for p in procs]
        assert codes == [0, 0], outputs
    for rank, output in enumerate(outputs):
        assert f"rank {rank}: restored step 4" in output, output
