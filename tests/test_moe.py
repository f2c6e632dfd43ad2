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


def assert_equals_peft_merge(tmp_path: Path, changed: int) -> None:
    """tmp_path/ours holds what tmp_path/theirs (PEFT's merge) holds, within float32 rounding, and
    exactly ``changed`` tensors differ from tmp_path/base."""
    theirs = load_file(str(tmp_path / "theirs" / "model.safetensors"))
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    assert set(theirs) == set(ours)
    assert sum(not torch.equal(theirs[k], base[k]) for k in base) == changed
    for k, v in theirs.items():
        assert torch.allclose(ours[k], v, rtol=0, atol=2e-6 * max(1.0, float(v.abs().max()))), k


def save_base_adapter_and_peft_merge(model, targets: list[str], tmp_path: Path, modules: list[str] | None = None) -> None:
    """tmp_path/base (the model), /adapter (a random PEFT target_parameters LoRA, with module LoRA on
    ``modules`` beside it), /theirs (PEFT's merge)."""
    model.save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=6, target_modules=modules or [],
                                                    target_parameters=targets))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(tmp_path / "adapter")
    pm.merge_and_unload().save_pretrained(tmp_path / "theirs")


@pytest.mark.parametrize("targets", [["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], ["mlp.experts.down_proj"]])
def test_expert_lora_merges_like_peft(tmp_path: Path, targets: list[str]) -> None:
    cfg = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=6,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                      num_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg)
    save_base_adapter_and_peft_merge(model, targets, tmp_path)
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


def test_mixtral_expert_lora_merges_like_peft_into_its_legacy_names(tmp_path: Path) -> None:
    """Mixtral: fused in memory in transformers 5, ``block_sparse_moe.experts.N.w1/w3/w2`` on disk."""
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=6, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                     num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg)
    save_base_adapter_and_peft_merge(model, ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], tmp_path)
    result = loratools.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "ours")
    assert result.verify.ok and len(result.changed) == 2 * 4 * 3
    assert all(".block_sparse_moe.experts." in n for n in result.changed)
    theirs = load_file(str(tmp_path / "theirs" / "model.safetensors"))
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert set(theirs) == set(ours)
    for k, v in theirs.items():
        assert torch.allclose(ours[k], v, rtol=0, atol=2e-6 * max(1.0, float(v.abs().max()))), k


def test_legacy_per_expert_peft_lora_merges_and_nothing_is_dropped(tmp_path: Path) -> None:
    """PEFT adapters made when Mixtral's experts were nn.Linear modules (target_modules w1/w2/w3:
    ``…block_sparse_moe.experts.N.w1.lora_A.weight``) bind to the per-expert tensors on disk, each
    merged exactly (float64 reference); a factor for an expert the base does not have is refused
    by name — never dropped."""
    import json

    from click.testing import CliRunner
    from safetensors.torch import save_file

    from loratools.cli import cli

    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=6, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                     num_experts_per_tok=2)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(cfg).save_pretrained(tmp_path / "base")
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    g = torch.Generator().manual_seed(2)

    def adapter(folder: Path, experts: range) -> dict:
        sd, want = {}, {}
        for e in experts:
            for w, (o, i) in {"w1": (6, 16), "w2": (16, 6), "w3": (6, 16)}.items():
                stem = f"model.layers.0.block_sparse_moe.experts.{e}.{w}"
                A, B = torch.randn(2, i, generator=g), torch.randn(o, 2, generator=g)
                sd[f"base_model.model.{stem}.lora_A.weight"], sd[f"base_model.model.{stem}.lora_B.weight"] = A, B
                want[stem + ".weight"] = 3.0 * (B.double() @ A.double())
        folder.mkdir()
        save_file(sd, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 2, "lora_alpha": 6, "target_modules": ["w1", "w2", "w3"]}))
        return want

    want = adapter(tmp_path / "legacy", range(4))
    result = loratools.merge(tmp_path / "base", tmp_path / "legacy", tmp_path / "out")
    assert result.verify.ok and len(result.changed) == 12
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k, d in want.items():
        assert torch.allclose(ours[k].double(), base[k].double() + d, rtol=0, atol=1e-5), k
    adapter(tmp_path / "too-many", range(6))  # experts 4 and 5 are not in the base
    res = CliRunner().invoke(cli, ["merge", str(tmp_path / "base"), str(tmp_path / "too-many"), str(tmp_path / "o2")])
    assert res.exit_code == 1 and "experts.4" in res.output and not (tmp_path / "o2").exists()


@pytest.mark.parametrize("targets", [["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], ["mlp.experts.gate_up_proj"]])
def test_gpt_oss_experts_fused_on_disk_merge_like_peft(tmp_path: Path, targets: list[str]) -> None:
    """gpt-oss keeps its experts fused on disk: gate_up_proj (E, H, 2I) with gate and up interleaved,
    down_proj (E, I, H), read as x @ W[e] (PEFT's is_transposed). Each expert's ΔW goes into its
    slice of the fused tensor, as PEFT's merge_and_unload puts it."""
    cfg = transformers.GptOssConfig(hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=1, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                    vocab_size=64)
    torch.manual_seed(0)
    save_base_adapter_and_peft_merge(transformers.GptOssForCausalLM(cfg), targets, tmp_path)
    result = loratools.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "ours", verify="full")
    assert result.verify.ok and len(result.changed) == 2 * len(targets)
    assert all(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in result.changed)
    theirs = load_file(str(tmp_path / "theirs" / "model.safetensors"))
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    assert set(theirs) == set(ours)
    assert sum(not torch.equal(theirs[k], base[k]) for k in base) == 2 * len(targets)
    for k, v in theirs.items():
        assert torch.allclose(ours[k], v, rtol=0, atol=2e-6 * max(1.0, float(v.abs().max()))), k
    # and the sampled default check, unmerge, and loratools verify read the fused tensors too
    assert loratools.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "ours2").verify.ok
    assert loratools.unmerge(tmp_path / "ours2", tmp_path / "adapter", tmp_path / "back").verify.ok
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    for k, v in base.items():
        assert torch.allclose(back[k], v, rtol=0, atol=1e-5), k


def test_gpt_oss_expert_adapter_forward_check_and_clean_refusals(tmp_path: Path) -> None:
    """verify --forward runs every expert's layer un-merged; stack, resize, convert to formats without
    expert parameters and extract of fused experts refuse by name instead of writing something else."""
    from click.testing import CliRunner

    from loratools.cli import cli

    cfg = transformers.GptOssConfig(hidden_size=32, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                    vocab_size=64)
    torch.manual_seed(0)
    save_base_adapter_and_peft_merge(transformers.GptOssForCausalLM(cfg),
                                     ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], tmp_path)
    b, a = str(tmp_path / "base"), str(tmp_path / "adapter")
    run = CliRunner().invoke
    res = run(cli, ["verify", b, a, str(tmp_path / "theirs"), "--forward"])  # PEFT's own merge
    assert res.exit_code == 0 and "2 layer(s) agree in a forward pass" in res.output, res.output
    for args, needle in ((["stack", a, a, str(tmp_path / "s"), "--base", b, "--method", "cat"], "fused expert"),
                         (["resize", a, str(tmp_path / "r"), "--rank", "1", "--base", b], "fused expert"),
                         (["convert", a, str(tmp_path / "k"), "--to", "kohya", "--base", b], "experts delta"),
                         (["extract", b, str(tmp_path / "theirs"), str(tmp_path / "x"), "--rank", "2"], "fused experts")):
        res = run(cli, args)
        assert res.exit_code == 1 and needle in res.output and "bug" not in res.output, (args, res.output)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_module_lora_beside_expert_lora(tmp_path: Path, arch: str) -> None:
    """target_modules (attention) and target_parameters (experts) in one adapter: both merged, as PEFT does."""
    if arch == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=6,
                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                          num_experts=4, num_experts_per_tok=2)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    else:
        cfg = transformers.GptOssConfig(hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                        vocab_size=64)
        model = transformers.GptOssForCausalLM(cfg)
    torch.manual_seed(0)
    save_base_adapter_and_peft_merge(model, ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], tmp_path,
                                     modules=["q_proj", "v_proj"])
    result = loratools.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "ours")
    assert result.verify.ok
    assert sum(n.endswith(("q_proj.weight", "v_proj.weight")) for n in result.changed) == 4
    assert_equals_peft_merge(tmp_path, len(result.changed))


def test_gpt_oss_swapped_peft_layout_and_square_experts(tmp_path: Path) -> None:
    """PEFT's other reading of a 3-D parameter (in and out swapped: lora_A (r·E, d2), lora_B (d1, r·E),
    stored ΔW_e = B_e A_e) is told from the is_transposed one by the factors' shapes (float64
    reference); experts square per expert (d1 = d2) are refused: nothing tells the readings apart."""
    import json

    from click.testing import CliRunner
    from safetensors.torch import save_file

    from loratools.cli import cli

    def base(folder: Path, hidden: int, inter: int) -> dict:
        cfg = transformers.GptOssConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=4,
                                        num_experts_per_tok=2, vocab_size=64)
        torch.manual_seed(0)
        transformers.GptOssForCausalLM(cfg).save_pretrained(folder)
        return load_file(str(folder / "model.safetensors"))

    def adapter(folder: Path, shapes: dict[str, tuple[int, int]]) -> dict:
        g = torch.Generator().manual_seed(4)
        sd, want = {}, {}
        for depth, (name, (d1, d2)) in enumerate(shapes.items()):
            A, B = torch.randn(2 * 4, d2, generator=g), torch.randn(d1, 2 * 4, generator=g)  # the swapped reading
            key = "base_model.model.model.layers.0.mlp.experts." + "base_layer." * depth
            sd[key + "lora_A.weight"], sd[key + "lora_B.weight"] = A, B
            As, Bs = A.double().reshape(4, 2, d2), B.double().reshape(d1, 2, 4).permute(2, 0, 1)
            want[f"model.layers.0.mlp.experts.{name}"] = 3.0 * torch.bmm(Bs, As)  # (E, d1, d2) as stored
        folder.mkdir()
        save_file(sd, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": 2, "lora_alpha": 6, "target_modules": [],
            "target_parameters": [f"mlp.experts.{n}" for n in shapes]}))
        return want

    weights = base(tmp_path / "base", 32, 24)
    want = adapter(tmp_path / "lora", {"gate_up_proj": (32, 48), "down_proj": (24, 32)})
    assert loratools.merge(tmp_path / "base", tmp_path / "lora", tmp_path / "out").verify.ok
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k, d in want.items():
        assert torch.allclose(got[k].double(), weights[k].double() + d, rtol=0, atol=1e-5), k
    base(tmp_path / "square", 32, 16)  # gate_up (E, 32, 32): square per expert
    adapter(tmp_path / "sq-lora", {"gate_up_proj": (32, 32)})
    res = CliRunner().invoke(cli, ["merge", str(tmp_path / "square"), str(tmp_path / "sq-lora"), str(tmp_path / "o")])
    assert res.exit_code == 1 and "square" in res.output and not (tmp_path / "o").exists()


@pytest.mark.parametrize("targets", [["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]])
def test_llama4_experts_fused_on_disk_merge_like_peft(tmp_path: Path, targets: list[str]) -> None:
    """Llama 4 keeps its experts fused on disk too, (E, H, 2I) and (E, I, H), and PEFT reads them the
    swapped way (no is_transposed): lora_A (r·E, 2I), lora_B (H, r·E), stored ΔW_e = B_e A_e. Merged
    as PEFT's merge_and_unload merges them, with the attention LoRA beside them."""
    cfg = transformers.Llama4TextConfig(hidden_size=32, intermediate_size=24, intermediate_size_mlp=40,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                        num_local_experts=4, num_experts_per_tok=1, vocab_size=64,
                                        interleave_moe_layer_step=1)
    torch.manual_seed(0)
    save_base_adapter_and_peft_merge(transformers.Llama4ForCausalLM(cfg), targets, tmp_path, modules=["q_proj"])
    result = loratools.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "ours", verify="full")
    assert result.verify.ok and sum(".experts." in n for n in result.changed) == 4
    assert_equals_peft_merge(tmp_path, len(result.changed))
