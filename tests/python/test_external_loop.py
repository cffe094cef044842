"""examples/nanogpt_loop.py (nanoGPT's loop with the lines of README.md's diff) SIGKILLed at three
random iterations, from outside and at whatever instant the signal lands, and launched again each
time: every loss it prints, at every iteration and evaluation, equals an uninterrupted run's bit
for bit; the run that finishes drops its snapshots, so the next launch starts afresh.

The kill iterations are random; the seed is printed, and TESSERA_TEST_SEED=N repeats a run.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import torch

import tessera
from helpers import PYTHON, REPO, run

NANOGPT = REPO / "examples" / "nanogpt_loop.py"
MAX_ITERS = 40
SNAPSHOT_INTERVAL = 3
_ITER = re.compile(r"^iter (\d+): loss (\S+),", re.M)
_EVAL = re.compile(r"^step (\d+): train loss (\S+), val loss (\S+)$", re.M)
_START = re.compile(r"^(fresh start|resumed from iteration (\d+))$", re.M)


def _seed() -> int:
    seed = int(os.environ.get("TESSERA_TEST_SEED", random.randrange(1 << 30)))
    print(f"TESSERA_TEST_SEED={seed}")
    return seed


def _run_killed_after(args: List[str], env: Dict[str, str], iteration: int,
                      timeout_s: float = 180.0) -> Tuple[str, int]:
    """Runs the loop and SIGKILLs it as soon as it has printed the loss of `iteration` or a later
    one (a launch may resume past it); returns what it printed and its exit status."""
    process = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    timer = threading.Timer(timeout_s, process.kill)
    timer.start()
    lines: List[bytes] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            printed = re.match(rb"iter (\d+): ", line)
            if printed is not None and int(printed.group(1)) >= iteration:
                process.send_signal(signal.SIGKILL)
                break
        lines.extend(process.stdout.readlines())
        code = process.wait()
    finally:
        timer.cancel()
    return b"".join(lines).decode(errors="replace"), code


def _values(pattern: re.Pattern, output: str) -> Dict[int, List[Tuple[str, ...]]]:
    out: Dict[int, List[Tuple[str, ...]]] = {}
    for match in pattern.finditer(output):
        out.setdefault(int(match.group(1)), []).append(match.groups()[1:])
    return out


def _start(output: str) -> Optional[int]:
    match = _START.search(output)
    assert match is not None, output
    return int(match.group(2)) if match.group(2) else None


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_external_loop_killed_three_times_continues_bit_exact(daemon, tmp_path: Path,
                                                             device: str) -> None:
    """On a GPU the loop autocasts to float16 with its GradScaler enabled (nanoGPT's setting
    there), so the scaler's state is part of what must come back."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: this variant runs on a GPU machine")
    seed = _seed()
    kills = sorted(random.Random(seed).sample(range(4, MAX_ITERS - 10), 3))
    note = f"(TESSERA_TEST_SEED={seed}, SIGKILL after iterations {kills})"
    print(note)
    args = [PYTHON, str(NANOGPT), f"--data_dir={tmp_path / 'data'}", f"--max_iters={MAX_ITERS}",
            f"--snapshot_interval={SNAPSHOT_INTERVAL}", f"--device={device}"]

    reference = run(args, daemon.env(f"nano-ref-{device}"), timeout_s=180)
    assert _start(reference) is None
    want_iters = _values(_ITER, reference)
    want_evals = _values(_EVAL, reference)
    assert sorted(want_iters) == list(range(MAX_ITERS + 1)), reference
    assert sorted(want_evals) == list(range(0, MAX_ITERS + 1, 10)), reference

    env = daemon.env(f"nano-killed-{device}")
    outputs = []
    for kill in kills:
        output, code = _run_killed_after(args, env, kill)
        assert code == -signal.SIGKILL, f"exit {code}, expected SIGKILL {note}\n{output}"
        outputs.append(output)
    outputs.append(run(args, env, timeout_s=180))

    starts = [_start(o) for o in outputs]
    assert starts[0] is None, note
    for kill, start in zip(kills, starts[1:]):
        # Resumed from a snapshot iteration; the kill may land a little after `kill`.
        assert start is not None and start % SNAPSHOT_INTERVAL == 0 and start < MAX_ITERS, \
            f"launch after the kill at {kill} resumed from {start} {note}"
    for i, output in enumerate(outputs):
        for iteration, losses in _values(_ITER, output).items():
            for loss in losses:
                assert loss == want_iters[iteration][0], (
                    f"launch {i}, iteration {iteration}: loss {loss} != {want_iters[iteration][0]}"
                    f" {note}")
        for iteration, losses in _values(_EVAL, output).items():
            for loss in losses:
                assert loss == want_evals[iteration][0], (
                    f"launch {i}, evaluation at {iteration}: {loss} != "
                    f"{want_evals[iteration][0]} {note}")
    seen = set()
    for output in outputs:
        seen.update(_values(_ITER, output))
    assert seen == set(range(MAX_ITERS + 1)), f"iterations never printed: " \
        f"{sorted(set(range(MAX_ITERS + 1)) - seen)} {note}"
    assert max(_values(_ITER, outputs[-1])) == MAX_ITERS, "trained past the end"

    # The finished run dropped its snapshots: nothing is left, and a relaunch starts afresh.
    with tessera.Client(str(daemon.socket)) as client:
        assert client.list_versions(f"nano-killed-{device}") == []
        assert client.list_versions(f"nano-ref-{device}") == []
    again, code = _run_killed_after(args, env, 0)
    assert code == -signal.SIGKILL and _start(again) is None, again
