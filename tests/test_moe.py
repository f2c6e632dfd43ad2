"""PEFT LoRA on fused MoE expert parameters (``target_parameters``) merged into a Qwen3-MoE
checkpoint: transformers 5 keeps the experts fused in memory (gate_up_proj (E, 2I, H), down_proj
(E, H, I)) and writes them per expert on disk; PEFT's own merge_and_unload, saved by transformers,
is the oracle, tensor by tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loratools

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("targets", [["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], ["mlp.experts.down_proj"]])
def test_expert_lora_merges_like_peft(tmp_path: Path, targets: list[str]) -> None:
    cfg = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=6,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                      num_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg)
    model.save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=6, target_modules=[], target_parameters=targets))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(tmp_path / "adapter")
    pm.merge_and_unload().save_pretrained(tmp_path / "theirs")
    out = tmp_path / "ours"
    result = loratools.merge(tmp_path / "base", tmp_path / "adapter", out)
    assert result.verify.ok
    experts = 2 * 4 * (3 if len(targets) == 2 else 1)
    assert len(result.changed) == experts  # every expert's gate/up/down that the adapter touches
    theirs, ours = load_file(str(tmp_path / "theirs" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    assert set(theirs) == set(ours)
    assert sum(not torch.equal(theirs[k], base[k]) for k in base) == experts
    for k, v in theirs.items():
        assert torch.allclose(ours[k], v, rtol=0, atol=2e-6 * max(1.0, float(v.abs().max()))), k
