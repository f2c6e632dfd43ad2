"""Merging into FP8 block-quantized checkpoints (DeepSeek-V3 / Qwen3-FP8 / transformers' fine-grained
FP8: float8_e4m3fn codes times a scale per 128×128 block; compressed-tensors' per-row and
ComfyUI's per-tensor scales; e8m0 power-of-two scales): dequantize, add ΔW, requantize per block
(scale = block max / 448), or write --dtype bf16 without scales.

Oracles: a float64 dequantize → add → requantize written here from the format's definition
(round to nearest even on e4m3's grid), PEFT's merge_and_unload on the dequantized model, and
transformers loading the FP8 output itself (on a CPU it dequantizes FP8 checkpoints)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import loratools
from loratools.cli import cli
from loratools.errors import LoraToolsError, VerificationError

BLOCK = (128, 128)


# --- the format, from its definition, in float64 -------------------------------------------------------------------

def e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """x (float64, |x| ≤ 448) rounded to the nearest e4m3fn value, ties to even: 3 mantissa bits,
    smallest normal exponent −6 (below it the subnormal spacing 2^−9)."""
    e = torch.floor(torch.log2(x.abs().clamp_min(2.0**-6)))
    step = torch.exp2(e - 3)
    return torch.round(x / step) * step  # torch.round: half to even


def up_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The smallest value of ``dtype`` ≥ x (x > 0, float64), as float64."""
    if dtype == torch.float8_e8m0fnu:
        return torch.exp2(torch.ceil(torch.log2(x)))
    y = x.to(dtype)
    low = y.double() < x
    if bool(low.any()):  # the next representable value up: a positive float's bit pattern + 1
        bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[dtype]
        y.view(bits)[low] += 1
    y = y.double()
    return y


def spread(s: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    return s.repeat_interleave(block[0], 0)[:shape[0]].repeat_interleave(block[1], 1)[:, :shape[1]]


def quantize64(W: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype = torch.float32):
    """(codes as float64 values, scales as float64) per block: s = max|W|/448 rounded up to the
    scale's dtype, q = RNE(W / s) on the e4m3 grid."""
    rows, cols = W.shape
    a, b = math.ceil(rows / block[0]), math.ceil(cols / block[1])
    amax = torch.zeros(a, b, dtype=torch.float64)
    for i in range(a):
        for j in range(b):
            amax[i, j] = W[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]].abs().max()
    s = up_to(amax / 448.0, scale_dtype)
    return e4m3_round(W / spread(s, block, (rows, cols))), s


def dequantize64(codes: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    return codes.double() * spread(s.double().reshape(-1, s.shape[-1]) if s.dim() else s.double().reshape(1, 1),
                                   block, tuple(codes.shape))


def make_block_base(folder: Path, g: torch.Generator, *, scale_dtype: torch.dtype = torch.float32,
                    codes: torch.dtype = torch.float8_e4m3fn, config_block: bool = True) -> dict:
    """A two-shard FP8 checkpoint: up_proj (300×200, partial blocks) in shard 1 with its scales in
    shard 2, down_proj (200×300) untouched by the adapter, a norm in float32."""
    folder.mkdir(parents=True)
    W = {"model.layers.0.mlp.up_proj.weight": torch.randn(300, 200, generator=g, dtype=torch.float64) * 0.05,
         "model.layers.0.mlp.down_proj.weight": torch.randn(200, 300, generator=g, dtype=torch.float64) * 0.05}
    shard1, shard2, out = {}, {}, {"W": {}, "s": {}}
    for name, w in W.items():
        q, s = quantize64(w, BLOCK, scale_dtype)
        out["W"][name], out["s"][name] = q, s
        shard1[name] = q.to(codes)
        shard2[name + "_scale_inv"] = s.to(scale_dtype)
    shard2["model.norm.weight"] = torch.ones(200)
    save_file(shard1, str(folder / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(shard2, str(folder / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {**{k: "model-00001-of-00002.safetensors" for k in shard1},
                                            **{k: "model-00002-of-00002.safetensors" for k in shard2}}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
    if config_block:
        qc["weight_block_size"] = list(BLOCK)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16",
                                                    "quantization_config": qc}))
    return out


def make_lora(folder: Path, g: torch.Generator, shape=(300, 200), target="up_proj") -> tuple[torch.Tensor, Path]:
    folder.mkdir()
    A = torch.randn(4, shape[1], generator=g) * 0.1
    B = torch.randn(shape[0], 4, generator=g) * 0.1
    save_file({f"base_model.model.model.layers.0.mlp.{target}.lora_A.weight": A,
               f"base_model.model.model.layers.0.mlp.{target}.lora_B.weight": B}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                            "target_modules": [target]}))
    return 2.0 * (B.double() @ A.double()), folder


def _read(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float8_e8m0fnu])
def test_block_fp8_requantized_as_the_definition_says(tmp_path: Path, scale_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    base = make_block_base(tmp_path / "base", g, scale_dtype=scale_dtype)
    dW, lora = make_lora(tmp_path / "lora", g)
    out = tmp_path / "out"
    res = loratools.merge(tmp_path / "base", lora, out, verify="full")
    assert res.verify.ok
    name = "model.layers.0.mlp.up_proj.weight"
    exact = dequantize64(base["W"][name], base["s"][name], BLOCK) + dW  # float64 W + ΔW
    want_q, want_s = quantize64(exact, BLOCK, scale_dtype)
    got = _read(out)
    assert got[name].dtype == torch.float8_e4m3fn and got[name + "_scale_inv"].dtype == scale_dtype
    s = got[name + "_scale_inv"].double()
    # the scales: block max / 448 rounded up (the float32 max may differ from float64's in its last bit)
    assert torch.allclose(s, want_s, rtol=2.0**-20, atol=0)
    # the codes: round to nearest even of W'/s; float32 arithmetic moves a tie at most, never more than one step
    want_codes = e4m3_round(exact / spread(s, BLOCK, (300, 200)))
    codes = got[name].double()
    assert float((codes == want_codes).double().mean()) > 0.999
    value = dequantize64(got[name], got[name + "_scale_inv"], BLOCK)
    step = torch.exp2(torch.floor(torch.log2((exact / spread(s, BLOCK, (300, 200))).abs().clamp_min(2.0**-6))) - 3)
    assert bool(((value - exact).abs() <= (0.5 + 1e-3) * step * spread(s, BLOCK, (300, 200))).all())
    # untouched: the other weight and its scales, the norm — byte for byte; the layout and config kept
    src = _read(tmp_path / "base")
    for k in ("model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight_scale_inv", "model.norm.weight"):
        assert torch.equal(got[k].view(torch.uint8) if got[k].element_size() == 1 else got[k],
                           src[k].view(torch.uint8) if src[k].element_size() == 1 else src[k])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"][name + "_scale_inv"] == "model-00002-of-00002.safetensors"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]
    assert res.notes and "requantized 1 FP8 weight" in res.notes[0]


def test_block_fp8_to_bf16_drops_scales_and_quantization_config(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    base = make_block_base(tmp_path / "base", g)
    shard = tmp_path / "base" / "model-00002-of-00002.safetensors"  # a static activation scale beside the weight
    extra = load_file(str(shard))
    extra["model.layers.0.mlp.up_proj.input_scale"] = torch.tensor(0.02)
    save_file(extra, str(shard), metadata={"format": "pt"})
    index = json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.up_proj.input_scale"] = shard.name
    (tmp_path / "base" / "model.safetensors.index.json").write_text(json.dumps(index))
    dW, lora = make_lora(tmp_path / "lora", g)
    out = tmp_path / "out"
    assert loratools.merge(tmp_path / "base", lora, out, dtype="bf16").verify.ok
    got = _read(out)
    assert not any(k.endswith(("_scale_inv", "input_scale")) for k in got)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "bfloat16"
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        exact = dequantize64(base["W"][name], base["s"][name], BLOCK) + (dW if "up_proj" in name else 0)
        w = got[name]
        assert w.dtype == torch.bfloat16
        assert float((w.double() == exact.to(torch.bfloat16).double()).double().mean()) > 0.99  # one rounding
        assert float((w.double() - exact).abs().max()) <= 2.0**-8 * float(exact.abs().max())


def test_per_row_and_per_tensor_scales(tmp_path: Path) -> None:
    """compressed-tensors' per-channel ``weight_scale`` (out, 1) and ComfyUI's scalar ``scale_weight``."""
    g = torch.Generator().manual_seed(2)
    W1 = torch.randn(300, 200, generator=g, dtype=torch.float64) * 0.05
    W2 = torch.randn(300, 200, generator=g, dtype=torch.float64) * 0.05
    q1, s1 = quantize64(W1, (1, 200))  # one scale per row
    q2, s2 = quantize64(W2, (300, 200))  # one for the tensor
    (tmp_path / "base").mkdir()
    save_file({"model.layers.0.mlp.up_proj.weight": q1.to(torch.float8_e4m3fn),
               "model.layers.0.mlp.up_proj.weight_scale": s1.float(),
               "model.layers.0.mlp.gate_proj.weight": q2.to(torch.float8_e4m3fn),
               "model.layers.0.mlp.gate_proj.scale_weight": s2.float().reshape(())},
              str(tmp_path / "base" / "model.safetensors"))
    dW, lora = make_lora(tmp_path / "lora", g)
    (tmp_path / "lora2").mkdir()
    A, B = torch.randn(4, 200, generator=g) * 0.1, torch.randn(300, 4, generator=g) * 0.1
    sd = load_file(str(lora / "adapter_model.safetensors"))
    sd.update({"base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight": A,
               "base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight": B})
    save_file(sd, str(tmp_path / "lora2" / "adapter_model.safetensors"))
    (tmp_path / "lora2" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["up_proj", "gate_proj"]}))
    out = tmp_path / "out.safetensors"
    assert loratools.merge(tmp_path / "base" / "model.safetensors", tmp_path / "lora2", out, verify="full").verify.ok
    got = load_file(str(out))
    for name, W0, sname, block, d in (
            ("model.layers.0.mlp.up_proj.weight", dequantize64(q1, s1, (1, 200)), "model.layers.0.mlp.up_proj.weight_scale",
             (1, 200), dW),
            ("model.layers.0.mlp.gate_proj.weight", q2 * s2.reshape(()), "model.layers.0.mlp.gate_proj.scale_weight",
             (300, 200), 2.0 * (B.double() @ A.double()))):
        exact = W0 + d
        _, want_s = quantize64(exact, block)
        s = got[sname].double()
        assert tuple(s.shape) == ((300, 1) if block[0] == 1 else ())
        assert torch.allclose(s.reshape(want_s.shape), want_s, rtol=2.0**-20, atol=0)
        value = got[name].double() * (s if s.dim() else s.reshape(()))
        sp = s.reshape(-1, 1) if s.dim() else s.reshape(1, 1)
        step = torch.exp2(torch.floor(torch.log2((exact / sp).abs().clamp_min(2.0**-6))) - 3) * sp
        assert bool(((value - exact).abs() <= (0.5 + 1e-3) * step).all())


def test_e5m2_with_scales_is_not_requantized_but_dequantizes(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    base = make_block_base(tmp_path / "base", g, codes=torch.float8_e5m2)
    _, lora = make_lora(tmp_path / "lora", g)
    res = CliRunner().invoke(cli, ["merge", str(tmp_path / "base"), str(lora), str(tmp_path / "out")])
    assert res.exit_code == 1 and "e4m3" in res.output and "--dtype bf16" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()
    res = CliRunner().invoke(cli, ["merge", str(tmp_path / "base"), str(lora), str(tmp_path / "out"), "--dtype", "bf16"])
    assert res.exit_code == 0, res.output
    del base


def test_block_size_that_cannot_be_told_is_refused(tmp_path: Path) -> None:
    """300×200 with a 3×2 grid and no weight_block_size: 128 or 100 rows per block? Refused by name."""
    g = torch.Generator().manual_seed(4)
    make_block_base(tmp_path / "base", g, config_block=False)
    _, lora = make_lora(tmp_path / "lora", g)
    res = CliRunner().invoke(cli, ["merge", str(tmp_path / "base"), str(lora), str(tmp_path / "out")])
    assert res.exit_code == 1 and "up_proj.weight_scale_inv" in res.output and "weight_block_size" in res.output
    assert not (tmp_path / "out").exists()


def test_reversible_refused_and_unmerge_within_requantization(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    base = make_block_base(tmp_path / "base", g)
    _, lora = make_lora(tmp_path / "lora", g)
    with pytest.raises(LoraToolsError, match="bit for bit"):
        loratools.merge(tmp_path / "base", lora, tmp_path / "r", reversible=True)
    assert not (tmp_path / "r").exists()
    loratools.merge(tmp_path / "base", lora, tmp_path / "m")
    assert loratools.unmerge(tmp_path / "m", lora, tmp_path / "u", verify="full").verify.ok
    name = "model.layers.0.mlp.up_proj.weight"
    orig = dequantize64(base["W"][name], base["s"][name], BLOCK)
    m, u = _read(tmp_path / "m"), _read(tmp_path / "u")
    back = dequantize64(u[name], u[name + "_scale_inv"], BLOCK)
    # two requantizations, each within half a step of its own block scale
    bound = 0.5 * (spread(m[name + "_scale_inv"].double(), BLOCK, (300, 200)) +
                   spread(u[name + "_scale_inv"].double(), BLOCK, (300, 200))) * torch.exp2(
        torch.floor(torch.log2((orig.abs().max() / spread(u[name + "_scale_inv"].double(), BLOCK, (300, 200)))
                                .clamp_min(2.0**-6))) - 3) * 2
    assert bool(((back - orig).abs() <= bound).all())
    assert float((back - orig).norm() / orig.norm()) < 0.05


def test_a_wrong_requantizer_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check re-derives the reference from the adapter's factors in float64: codes one step off
    in a single block do not pass it, and nothing is written."""
    from loratools.ops import fp8

    g = torch.Generator().manual_seed(6)
    make_block_base(tmp_path / "base", g)
    _, lora = make_lora(tmp_path / "lora", g)
    real = fp8.quantize

    def off_by_a_bit(W, block, scale_dtype, keep=None, pow2=False):
        codes, scales = real(W, block, scale_dtype, keep, pow2)
        return (codes.float() * 1.25).to(codes.dtype), scales

    monkeypatch.setattr(fp8, "quantize", off_by_a_bit)
    with pytest.raises(VerificationError):
        loratools.merge(tmp_path / "base", lora, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_verify_command_reads_the_fp8_output(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(7)
    make_block_base(tmp_path / "base", g)
    _, lora = make_lora(tmp_path / "lora", g)
    loratools.merge(tmp_path / "base", lora, tmp_path / "m")
    res = CliRunner().invoke(cli, ["verify", str(tmp_path / "base"), str(lora), str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    loratools.merge(tmp_path / "base", lora, tmp_path / "b", dtype="bf16")
    res = CliRunner().invoke(cli, ["verify", str(tmp_path / "base"), str(lora), str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    # a code changed behind loratools' back is found
    path = tmp_path / "m" / "model-00001-of-00002.safetensors"
    sd = load_file(str(path))
    w = sd["model.layers.0.mlp.up_proj.weight"].float()
    w[7, 9] = -w[7, 9] * 2 + 1
    sd["model.layers.0.mlp.up_proj.weight"] = w.to(torch.float8_e4m3fn)
    save_file(sd, str(path), metadata={"format": "pt"})
    res = CliRunner().invoke(cli, ["verify", str(tmp_path / "base"), str(lora), str(tmp_path / "m")])
    assert res.exit_code != 0 and "up_proj.weight" in res.output


# --- a real model: transformers and PEFT as the oracles ------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_fp8(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny Qwen3 quantized the DeepSeek/Qwen3-FP8 way (128×128 blocks of every linear layer in the
    decoder, embeddings, norms and lm_head kept), its dequantized float32 twin, and a PEFT LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen3Config

    tmp = tmp_path_factory.mktemp("qwen_fp8")
    torch.manual_seed(0)
    cfg = Qwen3Config(hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, vocab_size=128, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fp8_sd, deq = {}, {}
    for k, v in sd.items():
        if k.startswith("model.layers") and k.endswith("proj.weight"):
            q, s = quantize64(v.double(), BLOCK)
            fp8_sd[k], fp8_sd[k + "_scale_inv"] = q.to(torch.float8_e4m3fn), s.float()
            deq[k] = dequantize64(q, s, BLOCK).float()
        else:
            fp8_sd[k] = deq[k] = v
    model.load_state_dict(deq)
    model.save_pretrained(tmp / "deq")  # the dequantized twin, float32
    (tmp / "fp8").mkdir()
    save_file(fp8_sd, str(tmp / "fp8" / "model.safetensors"), metadata={"format": "pt"})
    c = json.loads((tmp / "deq" / "config.json").read_text())
    c["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": list(BLOCK)}
    (tmp / "fp8" / "config.json").write_text(json.dumps(c))
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    peft_model.save_pretrained(tmp / "lora")
    merged = peft_model.merge_and_unload()
    return {"tmp": tmp, "peft": {k: v.detach().clone() for k, v in merged.state_dict().items()}}


def test_tiny_qwen3_fp8_merge_loads_in_transformers_and_matches_peft(qwen_fp8: dict) -> None:
    from transformers import AutoModelForCausalLM

    tmp = qwen_fp8["tmp"]
    res = loratools.merge(tmp / "fp8", tmp / "lora", tmp / "merged-fp8")
    assert res.verify.ok and len(res.changed) == 14  # 2 layers × 7 linear layers; their scales written anew
    loaded = AutoModelForCausalLM.from_pretrained(tmp / "merged-fp8")  # transformers dequantizes FP8 on a CPU
    got = loaded.state_dict()
    raw = load_file(str(tmp / "merged-fp8" / "model.safetensors"))
    for k, v in qwen_fp8["peft"].items():
        if k.startswith("model.layers") and k.endswith("proj.weight"):
            s = spread(raw[k + "_scale_inv"].double(), BLOCK, tuple(v.shape))
            # within half an e4m3 step of its block scale of PEFT's float32 merge (plus float32 rounding)
            step = torch.exp2(torch.floor(torch.log2((v.double() / s).abs().clamp_min(2.0**-6))) - 3) * s
            assert bool(((got[k].double() - v.double()).abs() <= 0.5 * step + 1e-6 * v.abs().double().max()).all()), k
        else:
            assert torch.equal(got[k], v), k
    # and the fp32 merge is PEFT's, within float32 rounding
    assert loratools.merge(tmp / "fp8", tmp / "lora", tmp / "merged-fp32", dtype="fp32").verify.ok
    plain = AutoModelForCausalLM.from_pretrained(tmp / "merged-fp32").state_dict()
    for k, v in qwen_fp8["peft"].items():
        assert torch.allclose(plain[k], v, rtol=1e-5, atol=1e-6), k
    assert "quantization_config" not in json.loads((tmp / "merged-fp32" / "config.json").read_text())


def test_ue8m0_scale_format_keeps_power_of_two_scales(tmp_path: Path) -> None:
    """DeepSeek-V3.1 stores float32 scales but declares scale_fmt "ue8m0": its kernels want powers of
    two, so requantized scales are rounded up to the next power of two, still stored as float32."""
    g = torch.Generator().manual_seed(8)
    base = make_block_base(tmp_path / "base", g)
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    cfg["quantization_config"]["scale_fmt"] = "ue8m0"
    (tmp_path / "base" / "config.json").write_text(json.dumps(cfg))
    dW, lora = make_lora(tmp_path / "lora", g)
    assert loratools.merge(tmp_path / "base", lora, tmp_path / "out", verify="full").verify.ok
    got = _read(tmp_path / "out")
    name = "model.layers.0.mlp.up_proj.weight"
    s = got[name + "_scale_inv"]
    assert s.dtype == torch.float32
    exact = dequantize64(base["W"][name], base["s"][name], BLOCK) + dW
    _, want = quantize64(exact, BLOCK, torch.float8_e8m0fnu)  # the definition: the next power of two up
    assert torch.equal(s.double(), want)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_full_check_of_a_weight_larger_than_one_check_chunk(tmp_path: Path, per_tensor: bool) -> None:
    """--verify-full goes through a weight in chunks (1 M elements): each block's scale is still
    checked against its whole block's max, and a per-tensor scale against the whole tensor's."""
    g = torch.Generator().manual_seed(9)
    W = torch.randn(1100, 1024, generator=g, dtype=torch.float64) * 0.05
    block = (1100, 1024) if per_tensor else BLOCK
    q, sc = quantize64(W, block)
    (tmp_path / "base").mkdir()
    save_file({"model.layers.0.mlp.up_proj.weight": q.to(torch.float8_e4m3fn),
               "model.layers.0.mlp.up_proj.weight_scale_inv": sc.float().reshape(()) if per_tensor else sc.float()},
              str(tmp_path / "base" / "model.safetensors"))
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "fp8", "weight_block_size": list(BLOCK)}}))
    _, lora = make_lora(tmp_path / "lora", g, shape=(1100, 1024))
    assert loratools.merge(tmp_path / "base", lora, tmp_path / "out", verify="full").verify.ok
    res = CliRunner().invoke(cli, ["verify", str(tmp_path / "base"), str(lora), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
