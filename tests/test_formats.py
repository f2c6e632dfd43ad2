"""kohya, diffusers, MLX-LM and GGUF: read, write, convert, merge.

Oracles: diffusers' own kohya conversion (``_convert_non_diffusers_lora_to_diffusers``), PEFT's
merge of the source adapter onto transformers models, the ``gguf`` package reading our files,
MLX-LM's documented formula (y = x Wᵀ + scale·(x @ lora_a) @ lora_b), and float64 arithmetic.
A format × format round-trip matrix checks every ΔW.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import loratools
from loratools.cli import cli
from tests import models
from tests.helpers import assert_close_fp32, read_tensors

FORMATS = ["peft", "kohya", "diffusers", "mlx", "gguf"]


def run(*args: object) -> tuple[int, str]:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.output + (r.stderr if r.stderr_bytes is not None else "")


def deltas(adapter: loratools.Adapter) -> dict[str, torch.Tensor]:
    return {n: loratools.delta(m, dtype=torch.float64) for n, m in adapter.modules.items()}


def assert_same_deltas(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-6) -> None:
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert_close_fp32(b[k], a[k], k, rtol=rtol)


@pytest.fixture(scope="module")
def sd_parts(tmp_path_factory) -> dict[str, Path]:
    """A tiny UNet (diffusers) and CLIP text encoder (transformers), with PEFT adapters on them."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    root = tmp_path_factory.mktemp("sd")
    unet = models.save_tiny_unet(root / "unet")
    clip = models.save_tiny_clip(root / "clip")
    unet_lora = models.make_peft_adapter_on(
        UNet2DConditionModel.from_pretrained(unet), root / "unet-lora",
        dict(r=2, lora_alpha=3, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1"]),
        seed=3)
    clip_lora = models.make_peft_adapter_on(
        CLIPTextModel.from_pretrained(clip), root / "clip-lora",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"]), seed=4)
    return {"unet": unet, "clip": clip, "unet-lora": unet_lora, "clip-lora": clip_lora}


# --- the round-trip matrix ------------------------------------------------------------------------

SOURCES = {  # adapter fixture → formats that can hold it (the others must refuse, saying why)
    "patterns": set(FORMATS),
    "rslora": set(FORMATS),
    "dora": {"peft", "kohya", "diffusers", "mlx"},
    "embedding": {"peft", "mlx", "gguf"},
    "modules-to-save": {"peft"},
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_peft_to_format_and_back_keeps_every_delta(fmt: str, source: str, bases, adapters, tmp_path: Path) -> None:
    original = loratools.load_adapter(adapters[source], base=bases["llama"])
    mid, back = tmp_path / fmt, tmp_path / "back"
    if fmt not in SOURCES[source]:
        code, text = run("convert", adapters[source], mid, "--to", fmt, "--base", bases["llama"])
        assert code == 1 and "Traceback" not in text and not mid.exists()
        return
    code, text = run("convert", adapters[source], mid, "--to", fmt, "--base", bases["llama"])
    assert code == 0, text
    code, text = run("convert", mid, back, "--to", "peft", "--base", bases["llama"])
    assert code == 0, text
    again = loratools.load_adapter(back, base=bases["llama"])
    assert_same_deltas(deltas(original), deltas(again))
    kept = set(original.replacements) - (set(original.meta.get("base_copies", ())) if fmt != "peft" else set())
    assert set(again.replacements) == kept
    for n in kept:
        assert torch.equal(original.replacements[n], again.replacements[n])
    for n, m in original.modules.items():
        if m.magnitude is not None:
            assert torch.equal(m.magnitude, again.modules[n].magnitude)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "mlx", "gguf"])
def test_merge_of_each_format_equals_peft_merge(fmt: str, bases, adapters, tmp_path: Path) -> None:
    adapter = adapters["patterns"]
    loratools.convert(adapter, tmp_path / fmt, to=fmt, base=bases["llama"])
    loratools.merge(bases["llama"], [tmp_path / fmt], tmp_path / "merged", device="cpu")
    oracle = models.peft_merged_state_dict(bases["llama"], [adapter])
    for k, v in read_tensors(tmp_path / "merged").items():
        assert_close_fp32(v, oracle[k], k)


# --- kohya ----------------------------------------------------------------------------------------


def _diffusers_deltas(kohya_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ΔW per module as diffusers itself converts a kohya state dict (its network_alphas applied)."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    import re

    sd, alphas = _convert_non_diffusers_lora_to_diffusers(dict(kohya_sd))
    out = {}
    for k, down in sd.items():
        # diffusers writes its attention-processor form and a `.lora.down` form; alphas are keyed to match
        proc = re.match(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.down\.weight$", k)
        te_attn = re.match(r"^(.*\.self_attn)\.to_(q|k|v|out)_lora\.down\.weight$", k)
        if proc:
            module = f"{proc[1]}.{proc[2]}" + (".0" if proc[2] == "to_out" else "")
            alpha_key = k + ".alpha"
        elif te_attn:
            module = f"{te_attn[1]}.{te_attn[2]}_proj" if te_attn[2] != "out" else f"{te_attn[1]}.out_proj"
            alpha_key = k + ".alpha"
        elif k.endswith(".lora_linear_layer.down.weight"):
            module, alpha_key = k.removesuffix(".lora_linear_layer.down.weight"), k + ".alpha"
        elif k.endswith(".lora.down.weight"):
            module, alpha_key = k.removesuffix(".lora.down.weight"), k.removesuffix(".lora.down.weight") + ".alpha"
        elif k.endswith(".lora_A.weight"):
            module, alpha_key = k.removesuffix(".lora_A.weight"), k.removesuffix(".lora_A.weight") + ".alpha"
        else:
            continue
        up = sd[k.replace("down.weight", "up.weight").replace("lora_A", "lora_B")]
        r = down.shape[0]
        alpha = float(alphas.get(alpha_key, r))
        out[module] = (alpha / r) * (up.double().reshape(up.shape[0], r) @ down.double().reshape(r, -1))
    return out


def test_kohya_unet_and_text_encoder_agree_with_diffusers_conversion(sd_parts, tmp_path: Path) -> None:
    for part, base, prefix in (("unet-lora", sd_parts["unet"], "unet."), ("clip-lora", sd_parts["clip"], "text_encoder.")):
        out = tmp_path / part
        loratools.convert(sd_parts[part], out, to="kohya", base=base)
        sd = load_file(str(out / "pytorch_lora_weights.safetensors"))
        assert all(k.startswith("lora_unet_" if part == "unet-lora" else "lora_te_") for k in sd)
        cfg = json.loads((sd_parts[part] / "adapter_config.json").read_text())
        assert all(float(v) == cfg["lora_alpha"] for k, v in sd.items() if k.endswith(".alpha"))  # the real alpha
        theirs = _diffusers_deltas(sd)
        ours = loratools.load_adapter(sd_parts[part], base=base)
        assert len(theirs) == len(ours.modules)
        for target, m in ours.modules.items():
            d = loratools.delta(m, dtype=torch.float64)
            assert_close_fp32(theirs[prefix + target.removesuffix(".weight")].reshape(d.shape), d, target)
        # and reading the kohya file without loratools' name metadata: names come from the base, flattened
        stripped = tmp_path / f"{part}-plain.safetensors"
        save_file(sd, str(stripped))
        back = loratools.load_adapter(stripped, base=base)
        assert_same_deltas(deltas(ours), deltas(back))


def test_kohya_merge_into_text_encoder_equals_peft(sd_parts, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import CLIPTextModel

    loratools.convert(sd_parts["clip-lora"], tmp_path / "k", to="kohya", base=sd_parts["clip"])
    loratools.merge(sd_parts["clip"], [tmp_path / "k"], tmp_path / "merged", device="cpu")
    pm = PeftModel.from_pretrained(CLIPTextModel.from_pretrained(sd_parts["clip"]), str(sd_parts["clip-lora"]))
    oracle = pm.merge_and_unload().state_dict()
    for k, v in read_tensors(tmp_path / "merged").items():
        assert_close_fp32(v, oracle[k], k)


def test_sd_scripts_clip_names_bind_to_a_transformers_5_text_encoder(sd_parts, tmp_path: Path) -> None:
    """sd-scripts names text-encoder modules lora_te_text_model_encoder_…; transformers 5 saves
    CLIPTextModel without the text_model. prefix. They bind, and the merge equals PEFT's."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import CLIPTextModel

    with safe_open(str(next((sd_parts["clip"]).glob("*.safetensors"))), "pt") as f:
        assert not any(k.startswith("text_model.") for k in f.keys())  # what this test is about
    loratools.convert(sd_parts["clip-lora"], tmp_path / "k", to="kohya", base=sd_parts["clip"])
    ours = load_file(str(tmp_path / "k" / "pytorch_lora_weights.safetensors"))
    sd_scripts = {k.replace("lora_te_", "lora_te_text_model_", 1): v for k, v in ours.items()}
    assert all(k.startswith("lora_te_text_model_encoder_layers_") for k in sd_scripts)
    f = tmp_path / "sd-scripts.safetensors"
    save_file(sd_scripts, str(f), metadata={"ss_network_module": "networks.lora"})  # no loratools names
    loratools.merge(sd_parts["clip"], [f], tmp_path / "merged", device="cpu")
    pm = PeftModel.from_pretrained(CLIPTextModel.from_pretrained(sd_parts["clip"]), str(sd_parts["clip-lora"]))
    oracle = pm.merge_and_unload().state_dict()
    for k, v in read_tensors(tmp_path / "merged").items():
        assert_close_fp32(v, oracle[k], k)


def test_kohya_pipeline_file_into_one_component_and_the_unet_file(sd_parts, tmp_path: Path) -> None:
    """A file with UNet and text-encoder modules applied to the UNet alone: the text-encoder part is
    reported as belonging elsewhere; the UNet part merges (1×1 conv proj_in/out included)."""
    a = tmp_path / "a"
    b = tmp_path / "b"
    loratools.convert(sd_parts["unet-lora"], a, to="kohya", base=sd_parts["unet"])
    loratools.convert(sd_parts["clip-lora"], b, to="kohya", base=sd_parts["clip"])
    both = {**load_file(str(a / "pytorch_lora_weights.safetensors")),
            **load_file(str(b / "pytorch_lora_weights.safetensors"))}
    save_file(both, str(tmp_path / "pipeline.safetensors"))
    unet_file = sd_parts["unet"] / "diffusion_pytorch_model.safetensors"
    code, text = run("merge", unet_file, tmp_path / "pipeline.safetensors", tmp_path / "u.safetensors", "-q")
    assert code == 0, text
    assert "text_encoder" in text and "left out" in text
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    pm = PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained(sd_parts["unet"]), str(sd_parts["unet-lora"]))
    oracle = pm.merge_and_unload().state_dict()
    for k, v in load_file(str(tmp_path / "u.safetensors")).items():
        assert_close_fp32(v, oracle[k], k)


def _kohya_file(path: Path, modules: dict[str, dict[str, torch.Tensor]]) -> Path:
    save_file({f"{stem}.{k}": v for stem, parts in modules.items() for k, v in parts.items()}, str(path))
    return path


def test_kohya_alpha_missing_or_zero_means_rank_and_squeezed_1x1(bases, tmp_path: Path) -> None:
    base = read_tensors(bases["llama"])
    g = torch.Generator().manual_seed(0)
    q, k = base["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"]
    down_q, up_q = torch.randn(4, 64, 1, 1, generator=g), torch.randn(64, 4, 1, 1, generator=g)  # 1×1 conv on a Linear
    down_k, up_k = torch.randn(4, 64, generator=g), torch.randn(32, 4, generator=g)
    f = _kohya_file(tmp_path / "k.safetensors", {
        "lora_unet_model_layers_0_self_attn_q_proj": {"lora_down.weight": down_q, "lora_up.weight": up_q},
        "lora_unet_model_layers_0_self_attn_k_proj": {"lora_down.weight": down_k, "lora_up.weight": up_k,
                                                      "alpha": torch.tensor(0.0)},
    })
    loratools.merge(bases["llama"], [f], tmp_path / "m", device="cpu")
    merged = read_tensors(tmp_path / "m")
    assert_close_fp32(merged["model.layers.0.self_attn.q_proj.weight"],
                      q.double() + up_q.double().reshape(64, 4) @ down_q.double().reshape(4, 64), "q")  # alpha = r
    assert_close_fp32(merged["model.layers.0.self_attn.k_proj.weight"], k.double() + up_k.double() @ down_k.double(), "k")


@pytest.mark.parametrize("axis", ["out", "in"])
def test_kohya_dora_scale_on_either_axis(axis: str, bases, tmp_path: Path) -> None:
    W = read_tensors(bases["llama"])["model.layers.0.mlp.up_proj.weight"].double()  # (128, 64)
    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(4, 64, generator=g) * 0.1, torch.randn(128, 4, generator=g) * 0.1
    V = W + 0.5 * up.double() @ down.double()  # alpha 2, r 4
    dim = 1 if axis == "out" else 0
    norm = torch.linalg.vector_norm(V, dim=dim, keepdim=True)
    scale = norm * (1 + 0.1 * torch.rand(norm.shape, generator=g, dtype=torch.float64))
    f = _kohya_file(tmp_path / "d.safetensors", {"lora_unet_model_layers_0_mlp_up_proj": {
        "lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(2.0),
        "dora_scale": scale.float()}})
    loratools.merge(bases["llama"], [f], tmp_path / "m", device="cpu")
    expected = scale.float().double() * V / norm
    assert_close_fp32(read_tensors(tmp_path / "m")["model.layers.0.mlp.up_proj.weight"], expected, axis)


def test_kohya_unsupported_keys_refused_or_skipped_with_a_report(bases, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    f = _kohya_file(tmp_path / "mixed.safetensors", {
        "lora_unet_model_layers_0_self_attn_v_proj": {"lora_down.weight": torch.randn(2, 64, generator=g),
                                                      "lora_up.weight": torch.randn(32, 2, generator=g)},
        "lora_unet_model_layers_1_self_attn_v_proj": {"lora_mid.weight": torch.randn(2, 2, 3, 3, generator=g),
                                                      "alpha": torch.tensor(1.0)},
    })
    code, text = run("merge", bases["llama"], f, tmp_path / "m")
    assert code == 1 and "lora_mid" in text and "--allow-skip" in text and not (tmp_path / "m").exists()
    code, text = run("merge", bases["llama"], f, tmp_path / "m", "--allow-skip", "-q")
    assert code == 0 and "skipped" in text and "lora_mid" in text


# --- diffusers ------------------------------------------------------------------------------------


def test_diffusers_file_loads_in_diffusers_and_alpha_tensors_and_old_layout(sd_parts, tmp_path: Path) -> None:
    from diffusers.utils.state_dict_utils import _load_sft_state_dict_metadata

    out = tmp_path / "d"
    loratools.convert(sd_parts["unet-lora"], out, to="diffusers", base=sd_parts["unet"])
    f = out / "pytorch_lora_weights.safetensors"
    meta = _load_sft_state_dict_metadata(str(f))  # diffusers' own reader of the alpha metadata
    assert meta["unet.lora_alpha"] == 3 and meta["unet.r"] == 2
    ours = loratools.load_adapter(sd_parts["unet-lora"], base=sd_parts["unet"])
    sd = load_file(str(f))
    # the same factors with .alpha tensors instead of metadata
    with_alpha = {**sd, **{k.replace(".lora_A.weight", ".alpha"): torch.tensor(3.0) for k in sd if "lora_A" in k}}
    save_file(with_alpha, str(tmp_path / "alpha.safetensors"))
    assert_same_deltas(deltas(ours), deltas(loratools.load_adapter(tmp_path / "alpha.safetensors", base=sd_parts["unet"])))
    # the old attention-processor layout: …attn1.processor.to_q_lora.down.weight, scale 1
    old = {}
    for k, v in sd.items():
        if ".attn1.to_" in k:
            parent, proj = k.split(".attn1.")[0] + ".attn1", k.split(".attn1.")[1].split(".lora_")[0]
            role = "down" if ".lora_A." in k else "up"
            old[f"{parent}.processor.{proj.removesuffix('.0')}_lora.{role}.weight"] = v
    save_file(old, str(tmp_path / "old.safetensors"))
    a = loratools.load_adapter(tmp_path / "old.safetensors", base=sd_parts["unet"])
    for n, m in a.modules.items():
        assert m.scale == 1.0 and n.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight"))
        src = ours.modules[n]
        assert_close_fp32(loratools.delta(m, dtype=torch.float64) * src.scale, loratools.delta(src, dtype=torch.float64), n)


# --- MLX ------------------------------------------------------------------------------------------


def test_mlx_merge_follows_mlx_lm_formula(bases, tmp_path: Path) -> None:
    """An adapter as MLX-LM writes it; the merged weight must give y = x Wᵀ + scale·(x @ a) @ b."""
    folder = tmp_path / "mlx"
    folder.mkdir()
    g = torch.Generator().manual_seed(4)
    a = torch.randn(64, 8, generator=g) * 0.1
    b = torch.randn(8, 32, generator=g) * 0.1
    emb_a, emb_b = torch.randn(256, 8, generator=g) * 0.1, torch.randn(8, 64, generator=g) * 0.1
    save_file({"model.layers.1.self_attn.k_proj.lora_a": a, "model.layers.1.self_attn.k_proj.lora_b": b,
               "model.embed_tokens.lora_a": emb_a, "model.embed_tokens.lora_b": emb_b}, str(folder / "adapters.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": 1, "model": "tiny",
        "lora_parameters": {"rank": 8, "scale": 10.0, "dropout": 0.0, "keys": ["self_attn.k_proj"]}}))
    loratools.merge(bases["llama"], [folder], tmp_path / "m", device="cpu")
    base, merged = read_tensors(bases["llama"]), read_tensors(tmp_path / "m")
    x = torch.randn(5, 64, generator=g, dtype=torch.float64)
    W = base["model.layers.1.self_attn.k_proj.weight"].double()
    y = x @ W.T + 10.0 * (x @ a.double()) @ b.double()
    assert_close_fp32(x @ merged["model.layers.1.self_attn.k_proj.weight"].double().T, y, "mlx forward")
    ids = torch.tensor([3, 17, 255])
    emb = base["model.embed_tokens.weight"].double()[ids] + 10.0 * emb_a.double()[ids] @ emb_b.double()
    assert_close_fp32(merged["model.embed_tokens.weight"].double()[ids], emb, "mlx embedding")


def test_mlx_writer_has_one_rank_and_scale(bases, adapters, tmp_path: Path) -> None:
    loratools.convert(adapters["patterns"], tmp_path / "mlx", to="mlx", base=bases["llama"])
    cfg = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    sd = load_file(str(tmp_path / "mlx" / "adapters.safetensors"))
    rank = cfg["lora_parameters"]["rank"]
    assert rank == 6 and all(v.shape[1] == rank for k, v in sd.items() if k.endswith("lora_a"))
    assert cfg["num_layers"] == 2 and set(cfg["lora_parameters"]["keys"]) == {"self_attn.q_proj", "self_attn.k_proj",
                                                                            "mlp.down_proj"}


# --- GGUF -----------------------------------------------------------------------------------------


def _llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute, written out here as the reference."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_gguf_is_read_by_the_gguf_package(bases, adapters, tmp_path: Path) -> None:
    import gguf

    loratools.convert(adapters["patterns"], tmp_path / "g", to="gguf", base=bases["llama"])
    reader = gguf.GGUFReader(str(tmp_path / "g" / "adapter.gguf"))
    assert reader.get_field("general.type").contents() == "adapter"
    assert reader.get_field("adapter.type").contents() == "lora"
    assert reader.get_field("general.architecture").contents() == "llama"
    alpha = reader.get_field("adapter.lora.alpha").contents()
    tensors = {t.name: torch.from_numpy(t.data.copy()).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    assert set(tensors) >= {"blk.0.attn_q.weight.lora_a", "blk.1.attn_k.weight.lora_b", "blk.0.ffn_down.weight.lora_a"}
    ours = loratools.load_adapter(adapters["patterns"], base=bases["llama"])
    cfg = json.loads((bases["llama"] / "config.json").read_text())
    for hf, gg, heads in (("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", cfg["num_attention_heads"]),
                          ("model.layers.1.self_attn.k_proj.weight", "blk.1.attn_k.weight", cfg["num_key_value_heads"]),
                          ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight", None)):
        A, B = tensors[gg + ".lora_a"].double(), tensors[gg + ".lora_b"].double()
        r = A.shape[0]
        expected = loratools.delta(ours.modules[hf], dtype=torch.float64)
        if heads:
            expected = _llama_permute(expected, heads)
        assert_close_fp32((alpha / r) * B @ A, expected, gg)


@pytest.mark.parametrize("dtype,gtype,ftype", [(None, "F32", 0), ("fp16", "F16", 1), ("bf16", "BF16", 32)])
def test_gguf_out_is_one_file_in_the_asked_dtype(bases, adapters, tmp_path: Path, dtype, gtype, ftype) -> None:
    """A path ending in .gguf is the file llama.cpp opens (not a folder); --dtype sets the tensor
    type; general.* carries what llama.cpp's own converter writes; ΔW survives within the dtype."""
    import gguf

    out = tmp_path / "my-lora.gguf"
    args = ["convert", adapters["all-linear"], out, "--to", "gguf", "--base", bases["llama"], "-q"]
    code, text = run(*args, *(["--dtype", dtype] if dtype else []))
    assert code == 0, text
    assert out.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["my-lora.gguf"]
    reader = gguf.GGUFReader(str(out))
    assert {t.tensor_type.name for t in reader.tensors} == {gtype}
    assert reader.get_field("general.file_type").contents() == ftype
    assert reader.get_field("general.name").contents() == "my-lora"
    assert reader.get_field("general.quantization_version").contents() == gguf.GGML_QUANT_VERSION
    assert "lora" in reader.get_field("general.tags").contents()
    back = loratools.load_adapter(out, base=bases["llama"])
    ours = loratools.load_adapter(adapters["all-linear"], base=bases["llama"])
    tol = {None: 1e-6, "fp16": 2e-3, "bf16": 2e-2}[dtype]
    for name, m in ours.modules.items():
        want = loratools.delta(m, dtype=torch.float64)
        got = loratools.delta(back.modules[name], dtype=torch.float64)
        assert float((got - want).abs().max()) <= tol * float(want.abs().max()), name
    # loratools wrote it, so --overwrite may replace it; a .gguf loratools did not write is kept
    code, text = run(*args, "--overwrite")
    assert code == 0, text


def test_gguf_embedding_lora_a_is_transposed(bases, adapters, tmp_path: Path) -> None:
    import gguf

    loratools.convert(adapters["embedding"], tmp_path / "g", to="gguf", base=bases["llama"])
    reader = gguf.GGUFReader(str(tmp_path / "g" / "adapter.gguf"))
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    assert shapes["token_embd.weight.lora_a"] == (256, 4) and shapes["token_embd.weight.lora_b"] == (64, 4)


# --- detection and serving ------------------------------------------------------------------------


def test_detection_by_content_and_from_override(bases, adapters, tmp_path: Path) -> None:
    loratools.convert(adapters["patterns"], tmp_path / "k", to="kohya", base=bases["llama"])
    loratools.convert(adapters["patterns"], tmp_path / "d", to="diffusers", base=bases["llama"])
    (tmp_path / "k" / "pytorch_lora_weights.safetensors").rename(tmp_path / "anything.safetensors")
    (tmp_path / "d" / "pytorch_lora_weights.safetensors").rename(tmp_path / "other.safetensors")
    assert loratools.load_adapter(tmp_path / "anything.safetensors").format == "kohya"
    assert loratools.load_adapter(tmp_path / "other.safetensors").format == "diffusers"
    code, text = run("info", tmp_path / "other.safetensors", "--from", "kohya")
    assert code == 1 and "Traceback" not in text


def test_convert_for_vllm_and_tgi(bases, adapters, tmp_path: Path) -> None:
    from safetensors import safe_open

    code, text = run("convert", adapters["patterns"], tmp_path / "v", "--to", "peft", "--for", "vllm")
    assert code == 0 and "folded" in text and "padded" in text
    cfg = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert not cfg["rank_pattern"] and not cfg["alpha_pattern"] and cfg["lora_alpha"] == cfg["r"] == 6
    with safe_open(str(tmp_path / "v" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_shape()[0] for k in f.keys() if "lora_A" in k} == {6}
    oracle = models.peft_merged_state_dict(bases["llama"], [adapters["patterns"]])
    for k, v in models.peft_merged_state_dict(bases["llama"], [tmp_path / "v"]).items():
        assert_close_fp32(v, oracle[k], k)
    code, text = run("convert", adapters["modules-to-save"], tmp_path / "x", "--to", "peft", "--for", "vllm")
    assert code == 1 and "lm_head" in text
    code, text = run("convert", adapters["all-linear"], tmp_path / "y", "--to", "peft", "--for", "vllm",
                     "--max-rank", "4")
    assert code == 1 and "resize" in text
    # TGI: a module type missing from one layer gets zero factors there
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "adapter_config.json").write_bytes((adapters["second"] / "adapter_config.json").read_bytes())
    sd = load_file(str(adapters["second"] / "adapter_model.safetensors"))
    save_file({k: v for k, v in sd.items() if "layers.0.self_attn.q_proj" not in k},
              str(partial / "adapter_model.safetensors"))
    code, text = run("convert", partial, tmp_path / "t", "--to", "peft", "--for", "tgi")
    assert code == 0 and "added 1 zero module" in text
    t = load_file(str(tmp_path / "t" / "adapter_model.safetensors"))
    assert float(t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].abs().max()) == 0


def test_convert_for_vllm_keeps_embedding_lora(bases, adapters, tmp_path: Path) -> None:
    """PEFT's unchanged copy of the base embedding (base_layer) is no part of the adapter and vLLM
    skips it: it is left out, the embedding LoRA kept; PEFT merges the result to the same model."""
    code, text = run("convert", adapters["embedding"], tmp_path / "v", "--to", "peft", "--for", "vllm")
    assert code == 0 and "left out PEFT's copy" in text, text
    sd = load_file(str(tmp_path / "v" / "adapter_model.safetensors"))
    assert any("lora_embedding_A" in k for k in sd) and not any("base_layer" in k for k in sd)
    oracle = models.peft_merged_state_dict(bases["llama"], [adapters["embedding"]])
    for k, v in models.peft_merged_state_dict(bases["llama"], [tmp_path / "v"]).items():
        assert_close_fp32(v, oracle[k], k)


# --- diffusers pipeline folders -----------------------------------------------------------------------


def _pipeline(sd_parts, root: Path) -> Path:
    """A diffusers pipeline folder: model_index.json, unet/, text_encoder/, scheduler/."""
    import shutil

    pipe = root / "pipe"
    shutil.copytree(sd_parts["unet"], pipe / "unet")
    shutil.copytree(sd_parts["clip"], pipe / "text_encoder")
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "DDIMScheduler"}')
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"],
                                                       "text_encoder": ["transformers", "CLIPTextModel"]}))
    return pipe


def test_kohya_and_diffusers_files_merge_into_a_pipeline_folder(sd_parts, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel
    from peft import PeftModel
    from transformers import CLIPTextModel

    pipe = _pipeline(sd_parts, tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    loratools.convert(sd_parts["unet-lora"], a, to="kohya", base=sd_parts["unet"])
    loratools.convert(sd_parts["clip-lora"], b, to="kohya", base=sd_parts["clip"])
    both = {**load_file(str(a / "pytorch_lora_weights.safetensors")),
            **load_file(str(b / "pytorch_lora_weights.safetensors"))}
    save_file(both, str(tmp_path / "sd-lora.safetensors"))  # a kohya file as A1111 users have them
    code, text = run("merge", pipe, tmp_path / "sd-lora.safetensors", tmp_path / "merged", "-q")
    assert code == 0, text
    out = tmp_path / "merged"
    assert (out / "scheduler" / "scheduler_config.json").read_text() == '{"_class_name": "DDIMScheduler"}'
    assert (out / "model_index.json").exists() and (out / "unet" / "config.json").exists()
    unet = PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained(sd_parts["unet"]),
                                     str(sd_parts["unet-lora"])).merge_and_unload().state_dict()
    clip = PeftModel.from_pretrained(CLIPTextModel.from_pretrained(sd_parts["clip"]),
                                     str(sd_parts["clip-lora"])).merge_and_unload().state_dict()
    for k, v in read_tensors(out / "unet").items():
        assert_close_fp32(v, unet[k], f"unet {k}")
    for k, v in read_tensors(out / "text_encoder").items():
        assert_close_fp32(v, clip[k], f"text_encoder {k}")
    # diffusers' own format names its components: the UNet part alone touches only unet/
    loratools.convert(sd_parts["unet-lora"], tmp_path / "d", to="diffusers", base=pipe / "unet")
    result = loratools.merge(pipe, [tmp_path / "d"], tmp_path / "m2", device="cpu")
    assert set(result.plans) == {"unet"} and result.verify.ok
    assert (tmp_path / "m2" / "text_encoder" / "model.safetensors").read_bytes() == (
        pipe / "text_encoder" / "model.safetensors").read_bytes()
    # convert binds to a pipeline folder as merge does: the kohya file becomes one diffusers file
    # with unet. and text_encoder. names, which merges into the pipeline to the same tensors
    code, text = run("convert", tmp_path / "sd-lora.safetensors", tmp_path / "as-diffusers", "--to", "diffusers",
                     "--base", pipe, "-q")
    assert code == 0, text
    keys = load_file(str(tmp_path / "as-diffusers" / "pytorch_lora_weights.safetensors")).keys()
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder"}
    again = loratools.merge(pipe, [tmp_path / "as-diffusers"], tmp_path / "m3", device="cpu")
    assert set(again.plans) == {"unet", "text_encoder"}
    for comp in ("unet", "text_encoder"):
        for k, v in read_tensors(tmp_path / "m3" / comp).items():
            assert_close_fp32(v, read_tensors(out / comp)[k], f"{comp} {k}")
    # loratools verify checks a pipeline component by component
    code, text = run("verify", pipe, tmp_path / "sd-lora.safetensors", out, "--forward")
    assert code == 0 and "verify OK" in text, text
    # and out again, component by component, checked against each component's record
    loratools.unmerge(out, [tmp_path / "sd-lora.safetensors"], tmp_path / "back", device="cpu")
    for comp in ("unet", "text_encoder"):
        original = read_tensors(pipe / comp)
        for k, v in read_tensors(tmp_path / "back" / comp).items():
            assert_close_fp32(v, original[k], f"{comp} {k}", rtol=4e-6)
