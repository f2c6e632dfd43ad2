"""loratools verify: tampering is caught and named, PEFT's own merges verify clean, an orientation
bug that a self-consistent check repeats is caught by --forward, round trips are reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import loratools
from loratools.cli import cli
from loratools.ops.check import verify_checkpoint
from tests import models


def run(*args: object) -> tuple[int, str]:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.output + (r.stderr if r.stderr_bytes is not None else "")


@pytest.fixture(params=["llama", "llama-bf16"])
def merged(request, bases, adapters, tmp_path: Path) -> tuple[Path, Path, Path]:
    base = bases[request.param]
    loratools.merge(base, [adapters["all-linear"]], tmp_path / "m", device="cpu")
    return base, adapters["all-linear"], tmp_path / "m"


def _rewrite(folder: Path, change) -> None:  # noqa: ANN001
    for shard in folder.glob("model*.safetensors"):
        sd = load_file(str(shard))
        change(sd)
        save_file(sd, str(shard), metadata={"format": "pt"})


def test_clean_merge_verifies(merged) -> None:
    base, adapter, out = merged
    code, text = run("verify", base, adapter, out, "--forward")
    assert code == 0, text
    assert "verify OK" in text and "14 layer(s) agree" in text


def test_one_tampered_element_is_caught_and_named(merged) -> None:
    base, adapter, out = merged
    name = "model.layers.1.self_attn.k_proj.weight"

    def tamper(sd):  # noqa: ANN001
        if name in sd:
            t = sd[name].clone()
            t.view(-1)[17] = torch.nextafter(t.view(-1)[17].float(), torch.tensor(10.0)).to(t.dtype) * 1.02
            sd[name] = t

    _rewrite(out, tamper)
    code, text = run("verify", base, adapter, out)
    assert code == 1 and "Traceback" not in text
    assert name in text.splitlines()[-1] and "FAIL" in text


def test_an_untouched_tensor_changed_by_one_bit_is_caught(merged) -> None:
    base, adapter, out = merged

    def flip(sd):  # noqa: ANN001
        if "model.norm.weight" in sd:
            t = sd["model.norm.weight"].clone()
            t.view(torch.int16 if t.element_size() == 2 else torch.int32)[0] ^= 1
            sd["model.norm.weight"] = t

    _rewrite(out, flip)
    report = verify_checkpoint(base, [adapter], out)
    assert [c.name for c in report.failures] == ["model.norm.weight"]


def test_missing_and_extra_tensors_fail(merged) -> None:
    base, adapter, out = merged

    def drop_and_add(sd):  # noqa: ANN001
        if "lm_head.weight" in sd:
            sd.pop("lm_head.weight")
            sd["surprise"] = torch.zeros(2)

    _rewrite(out, drop_and_add)
    index = json.loads((out / "model.safetensors.index.json").read_text()) if (
        out / "model.safetensors.index.json").exists() else None
    if index:
        index["weight_map"]["surprise"] = index["weight_map"].pop("lm_head.weight")
        (out / "model.safetensors.index.json").write_text(json.dumps(index))
    kinds = {c.name: c.kind for c in verify_checkpoint(base, [adapter], out).failures}
    assert kinds == {"lm_head.weight": "missing", "surprise": "extra"}


def test_a_merge_made_by_peft_verifies_clean(bases, adapters, tmp_path: Path) -> None:
    from peft import PeftModel

    for name in ("all-linear", "dora", "embedding"):
        pm = PeftModel.from_pretrained(models.load_base(bases["llama"]), str(adapters[name]))
        pm.merge_and_unload().save_pretrained(tmp_path / name)
        code, text = run("verify", bases["llama"], adapters[name], tmp_path / name, "--forward")
        assert code == 0, f"{name}: {text}"


def test_transposed_delta_passes_a_self_check_but_not_forward(bases, adapters, tmp_path: Path, monkeypatch) -> None:
    """Simulate an orientation bug in what the low-rank kind knows about ΔW (its rows, its rows at
    any indices, the factors the merge kernel adds): merge and the element checks agree with each
    other (all read that knowledge); --forward, which runs x → A → B through the layer, does not."""
    from loratools.adapter import LoraModule
    from loratools.deltas import LowRank

    real, real_take, real_factors = LowRank.rows, LowRank.take_rows, LoraModule.stored_factors

    def transposed_on_square(self, i, j, **kw):  # noqa: ANN001, ANN003
        if self.out_features != self.in_features:
            return real(self, i, j, **kw)
        return real(self, 0, self.out_features, **kw).T[i:j]

    def take_transposed(self, idx, **kw):  # noqa: ANN001, ANN003
        if self.out_features != self.in_features:
            return real_take(self, idx, **kw)
        return real(self, 0, self.out_features, **kw).T[idx]

    def factors_transposed(self):  # noqa: ANN001
        L, R, s = real_factors(self)
        return (R.T, L.T, s) if self.fan_in == self.fan_out else (L, R, s)

    monkeypatch.setattr(LowRank, "rows", transposed_on_square)
    monkeypatch.setattr(LowRank, "take_rows", take_transposed)
    monkeypatch.setattr(LoraModule, "stored_factors", factors_transposed)
    out = tmp_path / "m"
    result = loratools.merge(bases["llama"], [adapters["all-linear"]], out, device="cpu")
    assert result.verify.ok  # the naive self-check repeats the mistake
    assert verify_checkpoint(bases["llama"], [adapters["all-linear"]], out).ok
    report = verify_checkpoint(bases["llama"], [adapters["all-linear"]], out, forward=True)
    failed = sorted(c.name for c in report.failures)
    assert failed == sorted(f"model.layers.{i}.self_attn.{p}.weight" for i in (0, 1) for p in ("q_proj", "o_proj"))
    assert all(c.kind == "forward" for c in report.failures)


def test_forward_covers_conv_embedding_gpt2_and_dora(bases, adapters, tmp_path: Path) -> None:
    for name in ("conv", "conv-dora", "embedding", "lora-bias", "gpt2-no-fifo", "dora", "dora-gpt2", "dora-embedding"):
        base = bases[{"conv": "conv", "conv-dora": "conv", "lora-bias": "gpt2", "gpt2-no-fifo": "gpt2",
                      "dora-gpt2": "gpt2"}.get(name, "llama")]
        out = tmp_path / (f"{name}.safetensors" if base.suffix else name)
        loratools.merge(base, [adapters[name]], out, device="cpu")
        report = verify_checkpoint(base, [adapters[name]], out, forward=True)
        assert report.ok, f"{name}: {report.summary()}"
        assert any(c.kind == "forward" for c in report.checks)


def test_weights_are_part_of_what_is_verified(bases, adapters, tmp_path: Path) -> None:
    a, b = adapters["all-linear"], adapters["second"]
    loratools.merge(bases["llama"], [a, b], tmp_path / "m", weights=[1.0, 0.5], device="cpu")
    assert run("verify", bases["llama"], a, b, tmp_path / "m", "--weight", "1", "--weight", "0.5")[0] == 0
    code, text = run("verify", bases["llama"], a, b, tmp_path / "m")
    assert code == 1 and "q_proj" in text


def test_round_trip_report(bases, adapters) -> None:
    code, text = run("verify", bases["llama-bf16"], adapters["all-linear"], "--round-trip", "--json")
    assert code == 0, text
    data = json.loads(text)
    assert data["tensors"] == 14 and data["reversible_bit_exact"] is True
    assert 0 < data["bit_exact_fraction"] < 1 and data["max_ulps"] >= 1
    assert 0 < data["reversible_overhead_bytes"]


def test_stack_and_convert_verify_their_outputs(adapters, tmp_path: Path, monkeypatch) -> None:
    from loratools.formats import peft as peft_format

    real = peft_format.write

    def lossy(adapter, out, **kw):  # noqa: ANN001, ANN003
        paths = real(adapter, out, **kw)
        f = out / "adapter_model.safetensors"
        sd = load_file(str(f))
        key = next(k for k in sorted(sd) if "lora_B" in k)
        sd[key] = sd[key] * 1.001
        save_file(sd, str(f))
        return paths

    monkeypatch.setattr(peft_format, "write", lossy)
    with pytest.raises(loratools.VerificationError):
        loratools.stack([adapters["all-linear"], adapters["second"]], tmp_path / "s", method="cat")
    with pytest.raises(loratools.VerificationError):
        loratools.convert(adapters["all-linear"], tmp_path / "c", to="peft")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("base_name,names,weights", [
    ("llama", ["all-linear", "second"], [1.0, 0.5]),
    ("llama-bf16", ["all-linear", "second"], [1.0, 1.0]),
    ("gpt2", ["lora-bias", "gpt2-no-fifo"], [1.0, 2.0]),
])
def test_forward_verifies_several_adapters_on_one_tensor(bases, adapters, tmp_path: Path, base_name, names,
                                                         weights) -> None:
    """Two adapters touching the same tensor: --forward runs both through the layer, summed; the
    merges of loratools and of PEFT (another tool) verify, a damaged one does not."""
    paths = [adapters[n] for n in names]
    ours = tmp_path / "ours"
    loratools.merge(bases[base_name], paths, ours, weights=weights, device="cpu")
    report = verify_checkpoint(bases[base_name], paths, ours, weights=weights, forward=True)
    forward = [c for c in report.checks if c.kind == "forward"]
    assert report.ok and forward and len({c.name for c in forward}) == len(forward), report.summary()
    if base_name == "llama-bf16":
        return
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    sd = models.peft_merged_state_dict(bases[base_name], paths, weights)
    base_sd = {}
    for f in sorted(Path(bases[base_name]).glob("*.safetensors")):
        base_sd.update(load_file(f))
    save_file({k: sd[k].contiguous() for k in base_sd}, theirs / "model.safetensors")
    forward_only = [c for c in verify_checkpoint(bases[base_name], paths, theirs, weights=weights,
                                                 forward=True).checks if c.kind == "forward"]
    assert forward_only and all(c.ok for c in forward_only), [c for c in forward_only if not c.ok]
    # one adapter left out: the forward check of every shared tensor fails
    shared = {c.name for c in forward}
    wrong = [c for c in verify_checkpoint(bases[base_name], paths[:1], ours, weights=weights[:1],
                                          forward=True).checks if c.kind == "forward" and c.name in shared]
    assert wrong and not any(c.ok for c in wrong if c.name in {
        t for t in loratools.load_adapter(paths[1], base=bases[base_name]).modules})
