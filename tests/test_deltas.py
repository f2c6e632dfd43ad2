"""Delta kinds, edits and capabilities: a kind the pipeline has never seen merges, unmerges and
verifies without any change outside its own class; formats refuse what they declare they cannot
hold; options and JSON are checked at the boundary. Oracles: float64 arithmetic and the tiny
llama's own tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import loratools
from loratools.adapter import Adapter, LoraModule, lowrank_module
from loratools.checkpoint.reader import open_checkpoint
from loratools.deltas import Delta, Full, LowRank
from loratools.jsonio import get_field, load_json
from loratools.ops.check import verify_checkpoint

from .helpers import bf16_ulp

TARGET = "model.layers.0.mlp.up_proj.weight"  # (128, 64) in the tiny llama


@dataclass(frozen=True, eq=False)
class Hadamard(Delta):
    """A kind defined only here (LoHa's shape): ΔW = scale · (w1a @ w1b) ⊙ (w2a @ w2b)."""

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    scale: float = 1.0
    kind: ClassVar[str] = "hadamard-test"

    @property
    def out_features(self) -> int:
        return int(self.w1a.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.w1b.shape[1])

    @property
    def depth(self) -> int:
        return 2 * int(self.w1b.shape[0]) + 1

    def rows(self, i: int, j: int, *, dtype: torch.dtype = torch.float32, device=None, weight: float = 1.0):  # noqa: ANN001
        t = {k: v.to(device=device, dtype=dtype) for k, v in self.tensors().items()}
        return (t["w1a"][i:j] @ t["w1b"]) * (t["w2a"][i:j] @ t["w2b"]) * (weight * self.scale)

    def magnitude(self) -> Hadamard:
        return Hadamard(*(t.float().abs() for t in self.tensors().values()), abs(self.scale))

    @property
    def T(self) -> Hadamard:
        return Hadamard(self.w1b.T, self.w1a.T, self.w2b.T, self.w2a.T, self.scale)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"w1a": self.w1a, "w1b": self.w1b, "w2a": self.w2a, "w2b": self.w2b}

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Hadamard:
        return Hadamard(*(fn(t) for t in self.tensors().values()), self.scale)


def _hadamard(seed: int = 0) -> Hadamard:
    g = torch.Generator().manual_seed(seed)
    return Hadamard(*(torch.randn(s, generator=g) * 0.1 for s in [(128, 4), (4, 64), (128, 4), (4, 64)]), 0.5)


def _reference(base: Path, name: str, dw64: torch.Tensor) -> torch.Tensor:
    W = open_checkpoint(base).get(name)
    return (W.double() + dw64).to(W.dtype)


def test_a_new_delta_kind_merges_unmerges_and_verifies(bases, tmp_path: Path) -> None:
    d = _hadamard()
    adapter = Adapter(modules={TARGET: LoraModule(TARGET, d)}, meta={"format": "test"})
    out = tmp_path / "merged"
    result = loratools.merge(bases["llama"], [adapter], out, device="cpu")
    assert result.changed == [TARGET] and result.verify.ok
    dw64 = (d.w1a.double() @ d.w1b.double()) * (d.w2a.double() @ d.w2b.double()) * 0.5  # independent of rows()
    got = open_checkpoint(out).get(TARGET)
    ref = _reference(bases["llama"], TARGET, dw64)
    assert float((got.double() - (open_checkpoint(bases["llama"]).get(TARGET).double() + dw64)).abs().max()) < 1e-6
    assert torch.equal(got, ref) or float((got - ref).abs().max()) < 1e-6
    assert verify_checkpoint(bases["llama"], [adapter], out, forward=True).ok
    back = tmp_path / "back"
    loratools.unmerge(out, [adapter], back, device="cpu")
    W = open_checkpoint(bases["llama"]).get(TARGET)
    assert float((open_checkpoint(back).get(TARGET) - W).abs().max()) < 1e-6


def test_a_wrong_new_kind_fails_verification(bases, tmp_path: Path, monkeypatch) -> None:
    """A merge written with a kind whose rows() was wrong at the time is caught by verify."""
    d = _hadamard(1)
    adapter = Adapter(modules={TARGET: LoraModule(TARGET, d)}, meta={"format": "test"})
    out = tmp_path / "m"
    real = Hadamard.rows

    def off(self, i, j, **kw):  # noqa: ANN001, ANN003
        return real(self, i, j, **kw) * 1.01

    monkeypatch.setattr(Hadamard, "rows", off)
    loratools.merge(bases["llama"], [adapter], out, device="cpu", verify=False)
    monkeypatch.setattr(Hadamard, "rows", real)
    report = verify_checkpoint(bases["llama"], [adapter], out)
    assert not report.ok and [c.name for c in report.failures] == [TARGET]


def test_full_delta_in_bf16_is_one_rounding_of_float64(bases, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    diff = torch.randn(128, 64, generator=g) * 1e-2
    adapter = Adapter(modules={TARGET: LoraModule(TARGET, Full(diff, 2.0))}, meta={"format": "test"})
    base = bases["llama-bf16"]
    out = tmp_path / "m"
    loratools.merge(base, [adapter], out, device="cpu")
    W = open_checkpoint(base).get(TARGET)
    exact = W.double() + 2.0 * diff.double()
    got = open_checkpoint(out).get(TARGET)
    assert got.dtype == torch.bfloat16
    assert bool(((got.double() - exact).abs() <= bf16_ulp(exact)).all())


def test_formats_refuse_what_they_cannot_hold(bases, tmp_path: Path) -> None:
    adapter = Adapter(modules={TARGET: LoraModule(TARGET, _hadamard(), shape=(128, 64))}, meta={"format": "test"})
    for to in ("peft", "kohya", "mlx"):
        with pytest.raises(loratools.UnsupportedAdapterError, match="hadamard-test delta"):
            loratools.convert(adapter, tmp_path / to, to=to)
        assert not (tmp_path / to).exists()
    dora = lowrank_module(TARGET, torch.randn(2, 64), torch.randn(128, 2), 1.0, magnitude=torch.ones(128))
    with pytest.raises(loratools.UnsupportedAdapterError, match="DoRA"):
        loratools.convert(Adapter(modules={TARGET: dora}), tmp_path / "g", to="gguf",
                          base=bases["llama"])
    assert not (tmp_path / "g").exists()


def test_lowrank_blocks_equal_the_whole_product() -> None:
    g = torch.Generator().manual_seed(0)
    d = LowRank(torch.randn(3, 10, generator=g), torch.randn(7, 3, generator=g), 0.25, alpha=0.75)
    whole = d.matrix(dtype=torch.float64)
    assert torch.allclose(whole, 0.25 * d.B.double() @ d.A.double())
    assert torch.allclose(d.rows(2, 5, dtype=torch.float64), whole[2:5])
    assert torch.allclose(d.cols(4, 9, dtype=torch.float64), whole[:, 4:9])
    assert torch.allclose(d.T.matrix(dtype=torch.float64), whole.T)
    assert d.parameter_count() == 3 * 10 + 7 * 3 and d.describe()["rank"] == 3
    m = lowrank_module("x.weight", d.A, d.B, d.scale, transposed=True)
    assert torch.allclose(loratools.delta(m, dtype=torch.float64), whole.T)
    assert torch.allclose(m.block(1, 4, dtype=torch.float64), whole.T[1:4])


def test_options_are_checked_once_at_the_boundary(bases, adapters, tmp_path: Path) -> None:
    with pytest.raises(loratools.InvalidArgumentError, match="Unknown option"):
        loratools.merge(bases["llama"], [adapters["all-linear"]], tmp_path / "o", devcie="cpu")
    with pytest.raises(loratools.InvalidArgumentError, match="finite"):
        loratools.merge(bases["llama"], [adapters["all-linear"]], tmp_path / "o", weights=[float("nan")])
    with pytest.raises(loratools.InvalidArgumentError, match="precision"):
        loratools.merge(bases["llama"], [adapters["all-linear"]], tmp_path / "o", precision="fp16")
    assert not (tmp_path / "o").exists()
    opts = loratools.Options.build(dtype="bf16", verify=False, max_shard_size="5MB")
    assert (opts.output_dtype, opts.verify, opts.max_shard_size, opts.compute_dtype) == (
        "bf16", "none", 5_000_000, torch.float32)
    with pytest.raises(Exception):  # frozen
        opts.device = "cuda"  # type: ignore[misc]


@pytest.mark.parametrize("text", ["{", "[1, 2]", "\"x\"", "{\"a\": NaN}", "1" * 5000, "[" * 100000 + "]" * 100000,
                                  b"\xff\xfe{}"])
def test_broken_json_is_a_corrupt_file_error(text) -> None:  # noqa: ANN001
    with pytest.raises(loratools.CorruptFileError, match="config.json"):
        load_json(text, where="config.json", what="the config")


def test_typed_fields() -> None:
    cfg = {"r": "eight", "lora_alpha": 16, "flag": True, "n": None}
    with pytest.raises(loratools.CorruptFileError, match="'r'"):
        get_field(cfg, "r", int, where="adapter_config.json")
    assert get_field(cfg, "lora_alpha", float) == 16.0
    assert get_field(cfg, "n", int, 7) == 7
    with pytest.raises(loratools.CorruptFileError):
        get_field(cfg, "flag", int)


def test_corrupt_config_is_broken_not_unknown(adapters, tmp_path: Path) -> None:
    """Detection answers yes, no, or 'yours but broken': a PEFT folder with a damaged config is a
    CorruptFileError naming it, not 'not an adapter'."""
    import shutil

    folder = tmp_path / "peft"
    shutil.copytree(adapters["all-linear"], folder)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(loratools.CorruptFileError, match="adapter_config.json"):
        loratools.load_adapter(folder)


def test_corrupt_provenance_stops_unmerge(bases, adapters, tmp_path: Path) -> None:
    """A damaged loratools record must stop unmerge, not switch its safety check off."""
    from loratools.checkpoint.safetensors_io import StreamWriter, read_header

    merged = tmp_path / "m"
    loratools.merge(bases["llama"], [adapters["all-linear"]], merged, device="cpu")
    first = open_checkpoint(merged).shards[0].filename
    header = read_header(merged / first)
    damaged = tmp_path / "d.safetensors"
    w = StreamWriter(damaged, [(i.name, i.dtype, i.shape) for i in header.tensors.values()],
                     dict(header.metadata, loratools="{broken"))
    for name in w.order:
        w.copy_range(name, header.tensors[name])
    w.close()
    damaged.replace(merged / first)
    with pytest.raises(loratools.CorruptFileError, match="loratools record"):
        loratools.unmerge(merged, [adapters["all-linear"]], tmp_path / "u")
    assert not (tmp_path / "u").exists()


def test_replace_keeps_module_fields() -> None:
    m = lowrank_module("a.weight", torch.zeros(1, 2), torch.zeros(3, 1), 2.0, 2.0)
    assert replace(m, target="b.weight").delta is m.delta and m.scale == 2.0 and m.rank == 1


def test_errors_are_measured_where_they_mean_something(bases, tmp_path: Path) -> None:
    """W and ΔW that cancel (exact zeros, near-cancellation): the check passes and reports at most
    one ulp of max(|W|, |ΔW|) for bf16 — not thousands of ulps of a tiny result — and the
    documented bound for fp32; a round trip through exact zeros reports a small number."""
    for base_name, limit in (("llama-bf16", 1.0), ("llama", 8.0)):
        base = bases[base_name]
        W = open_checkpoint(base).get(TARGET).double()
        diff = -W.clone()
        diff[64:] *= 1 - 1e-3  # rows 0..63 cancel exactly, the rest nearly
        adapter = Adapter(modules={TARGET: LoraModule(TARGET, Full(diff.float()))}, meta={"format": "test"})
        out = tmp_path / base_name
        result = loratools.merge(base, [adapter], out, device="cpu")
        check = next(c for c in result.verify.checks if c.name == TARGET)
        assert check.ok and check.max_ulps <= limit and check.bound_ratio <= 1.0, check
        assert "within their bound" in result.verify.summary()
