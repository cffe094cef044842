"""Helpers shared by the Python tests: running trainers, parsing their losses, and comparing
saved training state bit for bit."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TRAIN_GPT = REPO / "examples" / "train_gpt.py"
PYTHON = sys.executable

_LOSS = re.compile(r"step (\d+) rank (\d+) loss (\S+)")


def run(args: List[str], env: Dict[str, str], timeout_s: float = 120.0,
        expect_signal: Optional[int] = None) -> str:
    """Runs a process to completion; returns its stdout. Fails the test, showing its output,
    when it exits otherwise than expected (0, or killed by `expect_signal`)."""
    try:
        result = subprocess.run(args, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(args)} ran over {timeout_s} s\n--- stdout\n"
                    f"{(e.stdout or b'').decode(errors='replace')}\n--- stderr\n"
                    f"{(e.stderr or b'').decode(errors='replace')}", pytrace=False)
    out = result.stdout.decode(errors="replace")
    err = result.stderr.decode(errors="replace")
    expected = 0 if expect_signal is None else -expect_signal
    if result.returncode != expected:
        pytest.fail(f"{' '.join(args)} exited with {result.returncode}, expected {expected}\n"
                    f"--- stdout\n{out}\n--- stderr\n{err}", pytrace=False)
    return out


def run_expecting_failure(args: List[str], env: Dict[str, str], timeout_s: float = 120.0) -> str:
    """Runs a process that must exit 1; returns its stdout and stderr together."""
    result = subprocess.run(args, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=timeout_s)
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 1, f"expected exit 1, got {result.returncode}:\n{output}"
    return output


def losses(output: str) -> Dict[Tuple[int, int], List[str]]:
    """(rank, step) -> every loss printed for it (a step may run twice around a restart)."""
    out: Dict[Tuple[int, int], List[str]] = {}
    for match in _LOSS.finditer(output):
        step, rank, loss = int(match.group(1)), int(match.group(2)), match.group(3)
        float.fromhex(loss)  # must parse
        out.setdefault((rank, step), []).append(loss)
    return out


def assert_same_losses(reference: str, resumed: str, ranks: int, steps: int) -> None:
    """Every loss printed by the resumed run (before and after the kill) equals the reference's,
    to the last bit, and every step of every rank was printed."""
    want = losses(reference)
    got = losses(resumed)
    for rank in range(ranks):
        for step in range(steps):
            assert len(want.get((rank, step), [])) == 1, f"reference lacks rank {rank} step {step}"
            assert (rank, step) in got, f"resumed run never printed rank {rank} step {step}"
            for loss in got[(rank, step)]:
                assert loss == want[(rank, step)][0], (
                    f"rank {rank} step {step}: loss {loss} ({float.fromhex(loss)!r}) != reference "
                    f"{want[(rank, step)][0]} ({float.fromhex(want[(rank, step)][0])!r})")


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _float_bits(x: float) -> bytes:
    return struct.pack("<d", x)


def assert_bit_equal(a: Any, b: Any, path: str = "state") -> None:
    """Asserts that two nested structures of tensors, arrays, dicts, sequences and scalars are
    equal bit for bit (NaNs included, -0.0 distinct from 0.0)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
        if _tensor_bytes(a) != _tensor_bytes(b):
            diff = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else "?"
            raise AssertionError(f"{path}: tensors differ (max abs difference {diff})")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), f"{path}: ndarray vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{path}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}")
        assert a.tobytes() == b.tobytes(), f"{path}: arrays differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict), f"{path}: dict vs {type(b).__name__}"
        assert list(a.keys()) == list(b.keys()), f"{path}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_bit_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
        assert len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bit_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert isinstance(b, float) and _float_bits(a) == _float_bits(b), f"{path}: {a!r} vs {b!r}"
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} vs {b!r}"


def load(path: Path) -> Dict[str, Any]:
    """Loads a state dumped by train_gpt.py --dump-dir."""
    # The dumps hold NumPy and Python RNG states: not weights-only (the default from PyTorch 2.6).
    return torch.load(path, map_location="cpu", weights_only=False)

