"""CUDA paths: skipped where no CUDA device is present (CI has none)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import loratools
from tests.helpers import bf16_ulp, read_tensors

pytestmark = pytest.mark.gpu


def test_cuda_merge_matches_cpu_within_rounding(bases, adapters, tmp_path: Path) -> None:
    base, adapter = bases["llama-bf16"], adapters["all-linear"]
    gpu = loratools.merge(base, [adapter], tmp_path / "gpu", device="cuda")
    loratools.merge(base, [adapter], tmp_path / "cpu", device="cpu")
    assert gpu.verify.ok
    a, b = read_tensors(tmp_path / "gpu"), read_tensors(tmp_path / "cpu")
    for k in a:
        assert bool(((a[k].double() - b[k].double()).abs() <= bf16_ulp(b[k].double())).all()), k


def test_auto_device_picks_cuda(bases, adapters, tmp_path: Path) -> None:
    from loratools.options import resolve_device

    assert resolve_device("auto").type == "cuda"
    result = loratools.merge(bases["llama"], [adapters["dora"]], tmp_path / "m", device="auto")
    assert result.verify.ok
    assert torch.cuda.is_available()
