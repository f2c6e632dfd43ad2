"""merge BASE.gguf ADAPTER OUT.gguf — what llama.cpp's export-lora does, exactly.

Oracles: PEFT's merge_and_unload on the HF model, converted to GGUF the way llama.cpp's
convert_hf_to_gguf.py does it (names from the gguf package's tables, Llama q/k rows permuted by
its ``LlamaModel.permute``, written here from its definition), and the gguf package's own reader,
dequantizers and quantizers. llama.cpp itself loading the result is in tests/test_interop.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import loratools
from loratools.cli import cli
from loratools.errors import LoraToolsError, VerificationError

gguf = pytest.importorskip("gguf")


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (rotary halves interleaved per head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf(sd: dict[str, torch.Tensor], cfg, path: Path, qtype=None, split_max_tensors: int = 0) -> dict:
    """An HF llama state dict as a llama.cpp GGUF model (F32 tensors; 2-D weights as ``qtype``)."""
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), "llama", split_max_tensors=split_max_tensors)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_context_length(64)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    out = {}
    for name, t in sd.items():
        a = t.float().numpy()
        if name.endswith("q_proj.weight"):
            a = permute(a, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            a = permute(a, cfg.num_key_value_heads)
        gname = tmap.get_name(name, try_suffixes=(".weight",))
        out[gname] = a
        if qtype is not None and a.ndim == 2:
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        elif qtype == gguf.GGMLQuantizationType.F16 and a.ndim == 2:
            w.add_tensor(gname, a.astype(np.float16))
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def read_gguf(*paths: Path) -> dict[str, tuple[np.ndarray, object, np.ndarray]]:
    out = {}
    for p in paths:
        for t in gguf.GGUFReader(str(p)).tensors:
            out[t.name] = (gguf.quants.dequantize(t.data, t.tensor_type), t.tensor_type, np.array(t.data))
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("gguf_base")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.3)
    peft_model.save_pretrained(tmp / "lora")
    merged = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    return {"tmp": tmp, "cfg": cfg, "base": base, "peft": merged}


def test_f32_base_equals_peft_merge_converted(llama: dict) -> None:
    tmp, cfg = llama["tmp"], llama["cfg"]
    to_gguf(llama["base"], cfg, tmp / "base.gguf")
    want = to_gguf(llama["peft"], cfg, tmp / "peft-merged.gguf")
    res = loratools.merge(tmp / "base.gguf", tmp / "lora", tmp / "out.gguf", verify="full")
    assert res.verify.ok and len(res.changed) == 14  # 2 layers × 7 linear layers
    got = read_gguf(tmp / "out.gguf")
    base = read_gguf(tmp / "base.gguf")
    for name, a in want.items():
        g, qtype, raw = got[name]
        assert qtype == gguf.GGMLQuantizationType.F32
        np.testing.assert_allclose(g, a, rtol=1e-5, atol=1e-6, err_msg=name)
        if name in base and not any(name.startswith(f"blk.{i}.") and name.split(".")[2] in (
                "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down") for i in range(2)):
            assert np.array_equal(raw, base[name][2]), name  # untouched: byte for byte
    # the metadata is the base's (tokenizer included), plus loratools' record
    r = gguf.GGUFReader(str(tmp / "out.gguf"))
    assert r.fields["llama.block_count"].contents() == 2
    assert r.fields["tokenizer.ggml.tokens"].contents()[:3] == ["t0", "t1", "t2"]
    record = json.loads(r.fields["loratools.record"].contents())
    assert record["adapters"][0]["weight"] == 1.0


@pytest.mark.parametrize("kind", ["F16", "BF16"])
def test_f16_and_bf16_bases_rounded_once(llama: dict, kind: str) -> None:
    tmp, cfg = llama["tmp"], llama["cfg"]
    qtype = gguf.GGMLQuantizationType[kind]
    to_gguf(llama["base"], cfg, tmp / f"base-{kind}.gguf", qtype=qtype)
    want = to_gguf(llama["peft"], cfg, tmp / "unused.gguf")  # float32 PEFT merge, converted
    assert loratools.merge(tmp / f"base-{kind}.gguf", tmp / "lora", tmp / f"out-{kind}.gguf").verify.ok
    got = read_gguf(tmp / f"out-{kind}.gguf")
    name = "blk.1.attn_q.weight"
    g, written, _ = got[name]
    assert written == qtype
    delta = want[name].astype(np.float64) - to_gguf_value(llama, name)  # PEFT's ΔW, as llama.cpp lays it out
    exact = read_gguf(tmp / f"base-{kind}.gguf")[name][0].astype(np.float64) + delta
    once = torch.from_numpy(exact).to(torch.float16 if kind == "F16" else torch.bfloat16).double().numpy()
    assert float(np.mean(g.astype(np.float64) == once)) > 0.99  # one rounding of the exact sum


def to_gguf_value(llama: dict, gname: str) -> np.ndarray:
    layer, kind = gname.split(".")[1], gname.split(".")[2]
    hf = {"attn_q": "self_attn.q_proj"}[kind]
    a = llama["base"][f"model.layers.{layer}.{hf}.weight"].float().numpy()
    return permute(a, llama["cfg"].num_attention_heads).astype(np.float64)


def test_q8_0_base_requantized_by_the_package(llama: dict) -> None:
    tmp, cfg = llama["tmp"], llama["cfg"]
    q8 = gguf.GGMLQuantizationType.Q8_0
    to_gguf(llama["base"], cfg, tmp / "base-q8.gguf", qtype=q8)
    res = loratools.merge(tmp / "base-q8.gguf", tmp / "lora", tmp / "out-q8.gguf", verify="full")
    assert res.verify.ok and any("requantized 14 tensor(s)" in n and "Q8_0" in n for n in res.notes)
    base = read_gguf(tmp / "base-q8.gguf")
    want = to_gguf(llama["peft"], cfg, tmp / "unused.gguf")
    got = read_gguf(tmp / "out-q8.gguf")
    for name in ("blk.0.attn_k.weight", "blk.1.ffn_down.weight"):
        g, qtype, raw = got[name]
        assert qtype == q8
        exact = base[name][0].astype(np.float64) + (want[name].astype(np.float64) - _hf_base(llama, name))
        again = gguf.quants.quantize(exact.astype(np.float32), q8)  # the package's quantizer on the reference
        assert float(np.mean(raw == again)) > 0.99
    # --dtype fp16: changed tensors written F16 instead (what export-lora does), untouched ones kept
    assert loratools.merge(tmp / "base-q8.gguf", tmp / "lora", tmp / "out-f16.gguf", dtype="fp16").verify.ok
    got = read_gguf(tmp / "out-f16.gguf")
    assert got["blk.0.attn_k.weight"][1] == gguf.GGMLQuantizationType.F16
    assert got["token_embd.weight"][1] == base["token_embd.weight"][1]


def _hf_base(llama: dict, gname: str) -> np.ndarray:
    layer, kind = gname.split(".")[1], gname.split(".")[2]
    hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "ffn_down": "mlp.down_proj"}[kind]
    a = llama["base"][f"model.layers.{layer}.{hf}.weight"].float().numpy()
    if kind == "attn_q":
        a = permute(a, llama["cfg"].num_attention_heads)
    if kind == "attn_k":
        a = permute(a, llama["cfg"].num_key_value_heads)
    return a.astype(np.float64)


def test_split_base_written_as_the_same_splits(llama: dict) -> None:
    tmp, cfg = llama["tmp"], llama["cfg"]
    (tmp / "split").mkdir()
    to_gguf(llama["base"], cfg, tmp / "split" / "base.gguf", split_max_tensors=10)
    parts = sorted((tmp / "split").glob("base-*-of-*.gguf"))
    assert len(parts) >= 2
    (tmp / "split-out").mkdir()
    res = loratools.merge(parts[0], tmp / "lora", tmp / "split-out" / "merged.gguf")
    assert res.verify.ok
    outs = sorted((tmp / "split-out").glob("merged-*-of-*.gguf"))
    assert [p.name.split("-", 1)[1] for p in outs] == [p.name.split("-", 1)[1] for p in parts]
    for o, b in zip(outs, parts):  # each split holds the base split's tensors, in order
        assert [t.name for t in gguf.GGUFReader(str(o)).tensors] == [t.name for t in gguf.GGUFReader(str(b)).tensors]
        assert gguf.GGUFReader(str(o)).fields["split.count"].contents() == len(parts)
    import shutil

    shutil.copy(parts[0], tmp / "split" / "keep.gguf")
    for args in (["--overwrite"], []):  # OUT named so that its splits would be BASE's own files: refused
        res = CliRunner().invoke(cli, ["merge", str(parts[0]), str(tmp / "lora"), str(tmp / "split" / "base.gguf"),
                                       *args])
        assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert parts[0].read_bytes() == (tmp / "split" / "keep.gguf").read_bytes()
    (tmp / "split" / "keep.gguf").unlink()
    to_gguf(llama["base"], cfg, tmp / "whole.gguf")
    loratools.merge(tmp / "whole.gguf", tmp / "lora", tmp / "whole-out.gguf")
    single, split = read_gguf(tmp / "whole-out.gguf"), read_gguf(*outs)
    assert single.keys() == split.keys()
    for k in single:
        assert np.array_equal(single[k][2], split[k][2]), k


def test_modules_the_base_lacks_are_refused_by_name(llama: dict, tmp_path: Path) -> None:
    """lm_head LoRA against a GGUF without output.weight: refused, nothing written (never dropped)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    tmp, cfg = llama["tmp"], llama["cfg"]
    sd = {k: v for k, v in llama["base"].items() if k != "lm_head.weight"}
    to_gguf(sd, cfg, tmp_path / "tied.gguf")
    model = LlamaForCausalLM(cfg)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
                   ).save_pretrained(tmp_path / "lm")
    res = CliRunner().invoke(cli, ["merge", str(tmp_path / "tied.gguf"), str(tmp_path / "lm"), str(tmp_path / "o.gguf")])
    assert res.exit_code == 1 and "lm_head.weight" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o.gguf").exists()
    res = CliRunner().invoke(cli, ["merge", str(tmp / "base.gguf"), str(tmp / "lora"), str(tmp_path / "o.safetensors")])
    assert res.exit_code == 1 and ".gguf" in res.output


def test_a_wrong_delta_is_caught(llama: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loratools.ops import gguf_merge

    tmp = llama["tmp"]
    real = gguf_merge._delta_rows
    monkeypatch.setattr(gguf_merge, "_delta_rows", lambda ch, i, j, cols, dtype: real(ch, i, j, cols, dtype) * 1.01)
    with pytest.raises(VerificationError):
        loratools.merge(tmp / "base.gguf", tmp / "lora", tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists()
    with pytest.raises(LoraToolsError, match="GGUF"):
        loratools.merge(tmp / "base.gguf", tmp / "lora", tmp_path / "r.gguf", reversible=True)


def test_a_type_the_package_cannot_quantize_is_written_f16(tmp_path: Path) -> None:
    """Q4_K (the package dequantizes it but cannot quantize it): the changed tensor becomes F16,
    as export-lora writes it, with a note; its value is dequant(Q4_K) + ΔW rounded once."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=32)
    model = LlamaForCausalLM(cfg)
    path = tmp_path / "q4k.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    q4k = gguf.GGMLQuantizationType.Q4_K
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(256, 256 // 256 * 144), dtype=np.uint8)
    raw[:, 0:4] = np.array([0.001, 0.0005], dtype=np.float16).view(np.uint8)  # d and dmin of each block
    w.add_tensor("blk.0.attn_v.weight", raw, raw_dtype=q4k)
    w.add_tensor("output_norm.weight", np.ones(256, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "lora")
    sd = {n: p.detach() for n, p in peft_model.named_parameters() if "lora_" in n}
    A = next(v for k, v in sd.items() if "lora_A" in k).double()
    B = next(v for k, v in sd.items() if "lora_B" in k).double()
    res = loratools.merge(path, tmp_path / "lora", tmp_path / "out.gguf", verify="full")
    assert res.verify.ok and any("F16" in n and "Q4_K" in n for n in res.warnings + res.notes)
    t = next(t for t in gguf.GGUFReader(str(tmp_path / "out.gguf")).tensors if t.name == "blk.0.attn_v.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.F16
    exact = gguf.quants.dequantize(raw, q4k).astype(np.float64) + 2.0 * (B @ A).numpy()
    assert float(np.mean(np.array(t.data, dtype=np.float64) == exact.astype(np.float16).astype(np.float64))) > 0.99


def test_moe_expert_lora_into_a_gguf_model_and_as_a_gguf_adapter(tmp_path: Path) -> None:
    """Qwen3-MoE: llama.cpp stacks the experts into ffn_{gate,up,down}_exps (E, out, in). A PEFT
    target_parameters adapter (fused experts in memory, per expert on disk) merged into that GGUF
    equals PEFT's merge converted the same way; written as a GGUF adapter, its stacked factors
    (E, r, in) / (E, out, r) read back to every expert's ΔW."""
    import transformers
    from peft import LoraConfig, get_peft_model

    import loratools as lt

    cfg = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      num_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg)
    model.save_pretrained(tmp_path / "base")
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(tmp_path / "lora")
    merged = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}

    def convert(sd: dict[str, torch.Tensor], path: Path) -> dict[str, np.ndarray]:
        """As convert_hf_to_gguf.py's Qwen2MoeModel: gate_up split in halves, experts stacked (E, out, in)."""
        tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3MOE, 2)
        w = gguf.GGUFWriter(str(path), "qwen3moe")
        w.add_block_count(2)
        w.add_head_count(4)
        w.add_head_count_kv(2)
        w.add_expert_count(4)
        w.add_embedding_length(32)
        w.add_feed_forward_length(64)
        w.add_expert_feed_forward_length(32)
        out = {}
        for name, t in sd.items():
            if name.endswith("mlp.experts.gate_up_proj"):
                half = t.shape[1] // 2
                parts = {name[:-len("gate_up_proj")] + "gate_proj.weight": t[:, :half],
                         name[:-len("gate_up_proj")] + "up_proj.weight": t[:, half:]}
            elif name.endswith("mlp.experts.down_proj"):
                parts = {name + ".weight": t}
            else:
                parts = {name: t}
            for n, x in parts.items():
                gname = tmap.get_name(n, try_suffixes=(".weight",))
                if gname is None:
                    continue
                out[gname] = x.float().contiguous().numpy()
                w.add_tensor(gname, out[gname])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return out

    convert(base, tmp_path / "base.gguf")
    want = convert(merged, tmp_path / "peft.gguf")
    res = lt.merge(tmp_path / "base.gguf", tmp_path / "lora", tmp_path / "out.gguf", verify="full")
    assert res.verify.ok and {"blk.0.ffn_gate_exps.weight", "blk.1.ffn_down_exps.weight", "blk.0.attn_q.weight"} <= set(
        res.changed)
    got = read_gguf(tmp_path / "out.gguf")
    assert want.keys() <= got.keys()
    for k, a in want.items():
        np.testing.assert_allclose(got[k][0], a, rtol=1e-5, atol=1e-6, err_msg=k)
    # as a GGUF adapter: stacked factors, read back per expert
    lt.convert(tmp_path / "lora", tmp_path / "a.gguf", to="gguf", base=tmp_path / "base")
    shapes = {t.name: tuple(t.data.shape) for t in gguf.GGUFReader(str(tmp_path / "a.gguf")).tensors}
    assert shapes["blk.0.ffn_up_exps.weight.lora_a"] == (4, 2, 32) and shapes["blk.0.ffn_up_exps.weight.lora_b"] == (4, 32, 2)
    back = lt.load_adapter(tmp_path / "a.gguf", base=tmp_path / "base")
    orig = lt.load_adapter(tmp_path / "lora", base=tmp_path / "base")
    assert set(back.modules) == set(orig.modules)
    for k, m in orig.modules.items():
        x, y = back.modules[k].delta.matrix(dtype=torch.float64), m.delta.matrix(dtype=torch.float64)
        assert torch.allclose(x, y, rtol=0, atol=1e-6 * max(1.0, float(y.abs().max()))), k


def test_verify_reads_gguf_merges(llama: dict, tmp_path: Path) -> None:
    """loratools verify BASE.gguf ADAPTER MERGED.gguf: a loratools merge, and one written F16 where the
    base was Q8_0 (what llama.cpp's export-lora writes), pass; a changed value or a tensor added
    behind loratools' back fails, named."""
    tmp, cfg = llama["tmp"], llama["cfg"]
    to_gguf(llama["base"], cfg, tmp_path / "b8.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    loratools.merge(tmp_path / "b8.gguf", tmp / "lora", tmp_path / "m8.gguf")
    loratools.merge(tmp_path / "b8.gguf", tmp / "lora", tmp_path / "m16.gguf", dtype="fp16")
    for merged in ("m8.gguf", "m16.gguf"):
        res = CliRunner().invoke(cli, ["verify", str(tmp_path / "b8.gguf"), str(tmp / "lora"), str(tmp_path / merged)])
        assert res.exit_code == 0, res.output
    # the merged F16 file with one value changed, and a tensor added: both named
    r = gguf.GGUFReader(str(tmp_path / "m16.gguf"))
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    w.add_block_count(2)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    for t in r.tensors:
        data = np.array(t.data)
        if t.name == "blk.0.attn_v.weight":
            data = data.copy()
            data[3, 5] += np.float16(0.25)
        w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    w.add_tensor("blk.0.extra.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    res = CliRunner().invoke(cli, ["verify", str(tmp_path / "b8.gguf"), str(tmp / "lora"), str(tmp_path / "bad.gguf")])
    assert res.exit_code == 1 and "blk.0.attn_v.weight" in res.output and "blk.0.extra.weight" in res.output
