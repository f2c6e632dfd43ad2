"""merge against PEFT's own merge_and_unload and forward pass, feature by feature."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import loratools
from tests import models
from tests.conftest import ADAPTERS
from tests.helpers import assert_close_fp32, file_metadata, read_tensors

SINGLE = [n for n in ADAPTERS if n != "second"]


def _out(tmp_path: Path, base: Path) -> Path:
    return tmp_path / ("merged.safetensors" if base.suffix == ".safetensors" else "merged")


@pytest.mark.parametrize("name", SINGLE)
def test_merge_matches_peft_merge_and_unload(name: str, bases, adapters, tmp_path: Path) -> None:
    base = bases[ADAPTERS[name][0]]
    out = _out(tmp_path, base)
    result = loratools.merge(base, [adapters[name]], out, device="cpu")
    assert result.verify is not None and result.verify.ok
    ours = read_tensors(out)
    base_tensors = read_tensors(base)
    assert set(ours) == set(base_tensors)
    oracle = models.peft_merged_state_dict(base, [adapters[name]])
    changed = 0
    for key, value in ours.items():
        assert value.dtype == base_tensors[key].dtype
        assert_close_fp32(value, oracle[key], key)
        if not torch.equal(value, base_tensors[key]):
            changed += 1
    assert changed == len(result.changed) > 0


def test_merge_of_two_weighted_adapters_matches_peft(bases, adapters, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    a, b = adapters["all-linear"], adapters["second"]
    loratools.merge(bases["llama"], [a, b], out, weights=[1.0, 0.5], device="cpu")
    oracle = models.peft_merged_state_dict(bases["llama"], [a, b], [1.0, 0.5])
    for key, value in read_tensors(out).items():
        assert_close_fp32(value, oracle[key], key)


@pytest.mark.parametrize("name", ["all-linear", "dora", "embedding", "modules-to-save", "patterns"])
def test_merged_model_logits_equal_unmerged_peft_model(name: str, bases, adapters, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    loratools.merge(bases["llama"], [adapters[name]], out, device="cpu")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bases["llama"]), str(adapters[name]))
    with torch.no_grad():
        ours = merged(ids).logits
        ref = peft_model.eval()(ids).logits
    assert_close_fp32(ours, ref, "logits", rtol=1e-4)


def test_gpt2_logits_with_square_conv1d_and_lora_bias(bases, adapters, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for name in ("lora-bias", "gpt2-no-fifo", "dora-gpt2"):
        out = tmp_path / name
        loratools.merge(bases["gpt2"], [adapters[name]], out, device="cpu")
        ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
        merged = AutoModelForCausalLM.from_pretrained(out).eval()
        pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bases["gpt2"]), str(adapters[name])).eval()
        with torch.no_grad():
            assert_close_fp32(merged(ids).logits, pm(ids).logits, f"{name} logits", rtol=1e-4)


def test_conv_forward_matches_peft(bases, adapters, tmp_path: Path) -> None:
    from peft import PeftModel

    for name in ("conv", "conv-dora"):
        out = tmp_path / f"{name}.safetensors"
        loratools.merge(bases["conv"], [adapters[name]], out, device="cpu")
        x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(2))
        merged = models.load_convnet(out).eval()
        pm = PeftModel.from_pretrained(models.load_convnet(bases["conv"]), str(adapters[name])).eval()
        with torch.no_grad():
            assert_close_fp32(merged(x), pm(x), f"{name} forward", rtol=1e-4)


def test_bf16_merge_is_one_rounding_of_float64(bases, adapters, tmp_path: Path) -> None:
    """bf16 output vs W + s·B@A in float64 computed here from the raw files: ≤ 1 ulp, nearly all exact."""
    from safetensors.torch import load_file

    adapter = adapters["all-linear"]
    out = tmp_path / "merged"
    loratools.merge(bases["llama-bf16"], [adapter], out, device="cpu")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    factors = load_file(str(adapter / "adapter_model.safetensors"))
    base = read_tensors(bases["llama-bf16"])
    ours = read_tensors(out)
    total = exact = 0
    for key, W in base.items():
        a_key = "base_model.model." + key.removesuffix(".weight") + ".lora_A.weight"
        if a_key not in factors:
            assert torch.equal(ours[key].view(torch.int16), W.view(torch.int16)), f"{key} not bit-identical"
            continue
        B = factors[a_key.replace("lora_A", "lora_B")].double()
        ref = W.double() + scale * (B @ factors[a_key].double())
        got = ours[key].double()
        err = (got - ref).abs()
        assert bool((err <= torch.maximum(torch.full_like(ref, 0), _ulp(ref))).all()), f"{key}: over 1 ulp"
        total += ref.numel()
        exact += int((ours[key] == ref.to(torch.bfloat16)).sum())
    assert total > 0
    assert exact / total > 0.999, f"only {exact}/{total} elements equal the correctly rounded value"


def _ulp(x: torch.Tensor) -> torch.Tensor:
    from tests.helpers import bf16_ulp

    return bf16_ulp(x)


def test_output_layout_mirrors_base(bases, adapters, tmp_path: Path) -> None:
    base, out = bases["llama"], tmp_path / "merged"
    loratools.merge(base, [adapters["all-linear"]], out, device="cpu")
    base_files = sorted(p.name for p in base.iterdir())
    assert sorted(p.name for p in out.iterdir()) == base_files
    assert not (out / "adapter_config.json").exists()
    base_index = json.loads((base / "model.safetensors.index.json").read_text())
    out_index = json.loads((out / "model.safetensors.index.json").read_text())
    assert out_index["weight_map"] == base_index["weight_map"]
    assert out_index["metadata"]["total_size"] == sum(p.stat().st_size for p in base.glob("*.safetensors")) - sum(
        8 + int.from_bytes(p.read_bytes()[:8], "little") for p in base.glob("*.safetensors")
    )
    for extra in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (out / extra).read_bytes() == (base / extra).read_bytes()
    record = json.loads(file_metadata(next(out.glob("*.safetensors")))["loratools"])
    assert record["operation"] == "merge" and len(record["adapters"][0]["sha256"]) == 64


def test_untouched_tensors_are_bit_identical(bases, adapters, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = loratools.merge(bases["llama"], [adapters["second"]], out, device="cpu")
    base, ours = read_tensors(bases["llama"]), read_tensors(out)
    untouched = [k for k in base if k not in result.changed]
    assert len(untouched) > 5
    for k in untouched:
        assert torch.equal(base[k].view(torch.uint8), ours[k].view(torch.uint8)), k


def test_max_shard_size_and_dtype(bases, adapters, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    loratools.merge(bases["llama"], [adapters["all-linear"]], out, device="cpu", dtype="bf16", max_shard_size="100KB")
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 2 and all(p.stat().st_size < 100_000 + 4096 for p in shards)
    tensors = read_tensors(out)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    oracle = models.peft_merged_state_dict(bases["llama"], [adapters["all-linear"]])
    for k, v in tensors.items():  # one rounding of the fp32 result: within 1 bf16 ulp of PEFT's fp32 merge
        assert bool(((v.double() - oracle[k].double()).abs() <= _ulp(oracle[k].double())).all()), k
    AutoModelForCausalLM.from_pretrained(out)  # transformers reads the re-sharded index


def test_fp64_precision_equals_fp32_within_rounding(bases, adapters, tmp_path: Path) -> None:
    a = loratools.merge(bases["llama-bf16"], [adapters["all-linear"]], tmp_path / "a", device="cpu")
    b = loratools.merge(bases["llama-bf16"], [adapters["all-linear"]], tmp_path / "b", device="cpu", precision="fp64")
    ta, tb = read_tensors(tmp_path / "a"), read_tensors(tmp_path / "b")
    differ = sum(int((ta[k] != tb[k]).sum()) for k in a.changed)
    total = sum(ta[k].numel() for k in a.changed)
    assert differ / total < 1e-3 and b.verify.ok


def test_dry_run_writes_nothing(bases, adapters, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = loratools.merge(bases["llama"], [adapters["all-linear"]], out, dry_run=True)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert result.plan is not None and len(result.plan.changed()) == 14


def test_pattern_that_matches_nothing_is_reported(bases, adapters, tmp_path: Path) -> None:
    result = loratools.merge(bases["llama"], [adapters["patterns"]], tmp_path / "m", device="cpu")
    assert any("nothing_matches" in w for w in result.warnings)


def test_load_adapter_returns_canonical_modules(bases, adapters) -> None:
    a = loratools.load_adapter(adapters["patterns"], base=bases["llama"])
    q1 = a.modules["model.layers.1.self_attn.q_proj.weight"]
    assert q1.rank == 2 and q1.delta.alpha == 5 and q1.scale == 2.5 and q1.delta.kind == "lowrank"
    k0 = a.modules["model.layers.0.self_attn.k_proj.weight"]
    assert (k0.rank, k0.delta.alpha, k0.scale) == (6, 8, 8 / 6)
    assert k0.delta.A.shape == (6, 64) and k0.delta.B.shape == (32, 6) and k0.shape == (32, 64)
    emb = loratools.load_adapter(adapters["embedding"], base=bases["llama"]).modules["model.embed_tokens.weight"]
    assert emb.kind == "embedding" and emb.transposed and emb.delta.A.shape == (4, 256) and emb.delta.B.shape == (64, 4)
    assert loratools.delta(emb).shape == (256, 64)
