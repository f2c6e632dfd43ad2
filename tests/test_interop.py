"""llama.cpp itself loads the GGUF adapters loratools writes (opt-in: `-m interop`).

Needs llama-cpp-python built from its sdist and llama.cpp's converter scripts (the sdist's
``vendor/llama.cpp``), named by ``LORATOOLS_LLAMA_CPP``; see docs/formats.md ("Interop tests"):

    CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install llama-cpp-python
    pip download --no-deps --no-binary :all: -d /tmp/llsrc llama-cpp-python && tar xzf /tmp/llsrc/*.tar.gz -C /tmp/llsrc
    LORATOOLS_LLAMA_CPP=$(ls -d /tmp/llsrc/llama_cpp_python-*/vendor/llama.cpp) python -m pytest -m interop

For each adapter kind: the tiny llama base goes to GGUF through llama.cpp's own
``convert_hf_to_gguf.py``; the PEFT adapter goes to GGUF through loratools and, as the oracle
converter, through llama.cpp's ``convert_lora_to_gguf.py``; llama.cpp (in a subprocess: a crash
fails the test, not the run) evaluates the same tokens with each, and PEFT's un-merged forward
pass is the reference for the logits.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import loratools

from . import models

pytestmark = pytest.mark.interop

TOKENS = [1, 5, 9, 20, 33, 7, 101, 250]
CASES = {
    "all-linear": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"],
                     rank_pattern={"layers.1.self_attn.q_proj": 2, "k_proj": 6}, alpha_pattern={"down_proj": 32}),
    "rslora": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"]),
    "one-layer": dict(r=4, lora_alpha=8, target_modules=["o_proj", "gate_proj"], layers_to_transform=[0],
                      layers_pattern="layers"),
    "embedding": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    "embeddings-lm_head": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"]),
}
MERGED = {
    "all-linear": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], use_dora=True),
    "modules_to_save": dict(r=4, lora_alpha=8, target_modules=["v_proj"], modules_to_save=["lm_head"]),
}
RUN = """
import json, sys
from llama_cpp import Llama
kw = dict(model_path=sys.argv[1], logits_all=True, n_ctx=64, verbose=False, n_threads=1)
if sys.argv[2] != "-":
    kw["lora_path"] = sys.argv[2]
llm = Llama(**kw)
llm.eval(json.loads(sys.argv[3]))
print(json.dumps([[float(x) for x in row] for row in llm.scores[: llm.n_tokens]]))
"""


def llama_dir() -> Path:
    where = os.environ.get("LORATOOLS_LLAMA_CPP")
    if not where or not (Path(where) / "convert_hf_to_gguf.py").is_file():
        pytest.fail("the interop group needs LORATOOLS_LLAMA_CPP=<llama.cpp source with convert_hf_to_gguf.py> "
                    "and llama-cpp-python installed (see this file's docstring)")
    return Path(where)


@pytest.fixture(scope="module")
def gguf_base(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny llama (HF) with a sentencepiece tokenizer llama.cpp's converter knows, and its GGUF."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("interop")
    base = models.save_tiny_llama(root / "llama")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(400)]
    (root / "text.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(3000)))
    spm.SentencePieceTrainer.train(input=str(root / "text.txt"), model_prefix=str(root / "sp"), vocab_size=256,
                                   model_type="unigram", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (base / f).unlink(missing_ok=True)
    shutil.copy(root / "sp.model", base / "tokenizer.model")
    out = root / "base.gguf"
    proc = subprocess.run([sys.executable, str(llama_dir() / "convert_hf_to_gguf.py"), str(base), "--outfile", str(out),
                           "--outtype", "f32"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return base, out


def llama_logits(model: Path, lora: Path | None) -> np.ndarray:
    proc = subprocess.run([sys.executable, "-c", RUN, str(model), str(lora) if lora else "-", json.dumps(TOKENS)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"llama.cpp failed (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return np.array(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("name", sorted(CASES))
def test_llama_cpp_loads_loratools_gguf(gguf_base, tmp_path: Path, name: str) -> None:
    from peft import PeftModel

    base, base_gguf = gguf_base
    adapter = models.make_peft_adapter(base, tmp_path / "peft", CASES[name], seed=11)
    ours = tmp_path / "ours.gguf"
    loratools.convert(adapter, ours, to="gguf", base=base)
    theirs = tmp_path / "theirs.gguf"
    proc = subprocess.run([sys.executable, str(llama_dir() / "convert_lora_to_gguf.py"), str(adapter), "--base",
                           str(base), "--outfile", str(theirs), "--outtype", "f32"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pm = PeftModel.from_pretrained(models.load_base(base), str(adapter)).eval()
    with torch.no_grad():
        reference = pm(torch.tensor([TOKENS])).logits[0].numpy()
    plain = llama_logits(base_gguf, None)
    got, oracle = llama_logits(base_gguf, ours), llama_logits(base_gguf, theirs)
    scale = max(1.0, float(np.abs(reference).max()))
    ours_err, theirs_err = float(np.abs(got - reference).max()), float(np.abs(oracle - reference).max())
    print(f"{name}: max |Δlogit| vs PEFT: loratools {ours_err:.2e}, convert_lora_to_gguf {theirs_err:.2e}")
    assert ours_err <= 1e-3 * scale, "llama.cpp's logits with loratools' adapter differ from PEFT's"
    assert float(np.abs(got - plain).max()) > 1e-3 * scale  # the adapter was applied at all
    if theirs_err <= 1e-3 * scale:  # where llama.cpp's own converter is right, both files are the same model
        assert float(np.abs(got - oracle).max()) <= 1e-4 * scale


@pytest.mark.parametrize("name", sorted(MERGED))
def test_llama_cpp_converts_and_runs_a_merged_model(gguf_base, tmp_path: Path, name: str) -> None:
    """A merged model goes to GGUF through llama.cpp's own convert_hf_to_gguf.py as it is (nothing of
    loratools' at its root gets in the way) and llama.cpp's logits are PEFT's un-merged forward pass."""
    from peft import PeftModel

    base, _ = gguf_base
    adapter = models.make_peft_adapter(base, tmp_path / "peft", MERGED[name], seed=13)
    out = tmp_path / "merged"
    loratools.merge(base, [adapter], out)
    gguf = tmp_path / "merged.gguf"
    proc = subprocess.run([sys.executable, str(llama_dir() / "convert_hf_to_gguf.py"), str(out), "--outfile", str(gguf),
                           "--outtype", "f32"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pm = PeftModel.from_pretrained(models.load_base(base), str(adapter)).eval()
    with torch.no_grad():
        reference = pm(torch.tensor([TOKENS])).logits[0].numpy()
    got = llama_logits(gguf, None)
    err = float(np.abs(got - reference).max())
    print(f"merged {name}: llama.cpp max |Δlogit| vs PEFT {err:.2e}")
    assert err <= 1e-3 * max(1.0, float(np.abs(reference).max()))


ARCHITECTURES = {  # transformers config class, model class, LoRA targets — tiny, no tokenizer needed
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"], {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"], {}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", ["q_proj", "k_proj", "up_proj", "down_proj"], {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], {"pad_token_id": 0}),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_gguf_adapters_for_more_architectures_equal_llama_cpp_converter(tmp_path: Path, arch: str) -> None:
    """For each architecture loratools writes GGUF adapters for beyond llama/mistral/qwen2, the tensor
    names and every module's effective ΔW (alpha / r · B @ A) equal llama.cpp's convert_lora_to_gguf.py's."""
    import gguf
    import transformers

    cfg_name, cls_name, targets, extra = ARCHITECTURES[arch]
    kv = 2 if arch != "phi3" else 4
    cfg = getattr(transformers, cfg_name)(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=kv, head_dim=8, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(cfg)
    model.save_pretrained(tmp_path / "base")
    adapter = models.make_peft_adapter_on(model, tmp_path / "peft", dict(r=4, lora_alpha=8, target_modules=targets),
                                          seed=2)
    theirs = tmp_path / "theirs.gguf"
    proc = subprocess.run([sys.executable, str(llama_dir() / "convert_lora_to_gguf.py"), str(adapter), "--base",
                           str(tmp_path / "base"), "--outfile", str(theirs), "--outtype", "f32"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = tmp_path / "ours.gguf"
    loratools.convert(adapter, ours, to="gguf", base=tmp_path / "base")

    def deltas(path: Path) -> dict[str, np.ndarray]:
        r = gguf.GGUFReader(str(path))
        alpha = float(r.fields["adapter.lora.alpha"].contents())
        t = {x.name: np.array(x.data).astype(np.float64) for x in r.tensors}
        return {k[:-7]: alpha / t[k].shape[0] * (t[k[:-1] + "b"] @ t[k]) for k in t if k.endswith(".lora_a")}

    a, b = deltas(theirs), deltas(ours)
    assert set(a) == set(b) and len(a) == 2 * len(targets)
    for k in a:
        assert np.allclose(b[k], a[k], rtol=0, atol=1e-6 * max(1.0, float(np.abs(a[k]).max()))), k
    # and llama.cpp's file reads back (with the base) to the PEFT adapter's ΔW
    want = loratools.load_adapter(adapter, base=tmp_path / "base")
    back = loratools.load_adapter(theirs, base=tmp_path / "base")
    assert set(back.modules) == set(want.modules)
    for k, m in want.modules.items():
        x, y = back.modules[k].delta.matrix(dtype=torch.float64), m.delta.matrix(dtype=torch.float64)
        assert torch.allclose(x, y, rtol=0, atol=1e-6 * max(1.0, float(y.abs().max()))), k


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_llama_cpp_runs_a_gguf_model_merged_by_loratools(gguf_base, tmp_path: Path, outtype: str) -> None:
    """merge BASE.gguf ADAPTER OUT.gguf on a base converted by llama.cpp's own convert_hf_to_gguf.py
    (f32, f16, q8_0): llama.cpp loads OUT, and its logits are PEFT's un-merged forward pass — within
    float32 (f32), f16 rounding, or Q8_0 requantization, which must still land nearer PEFT than the
    base without the adapter does."""
    from peft import PeftModel

    base, _ = gguf_base
    converted = tmp_path / f"base-{outtype}.gguf"
    proc = subprocess.run([sys.executable, str(llama_dir() / "convert_hf_to_gguf.py"), str(base), "--outfile",
                           str(converted), "--outtype", outtype], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    adapter = models.make_peft_adapter(base, tmp_path / "peft", MERGED["all-linear"], seed=17)
    merged = tmp_path / "merged.gguf"
    res = loratools.merge(converted, adapter, merged)
    assert res.verify.ok
    pm = PeftModel.from_pretrained(models.load_base(base), str(adapter)).eval()
    with torch.no_grad():
        reference = pm(torch.tensor([TOKENS])).logits[0].numpy()
    got, plain = llama_logits(merged, None), llama_logits(converted, None)
    # the best a GGUF of this type can do: PEFT's merge, saved, converted by llama.cpp at the same type
    pm.merge_and_unload().save_pretrained(tmp_path / "peft-merged")
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        if (base / f).is_file():
            shutil.copy(base / f, tmp_path / "peft-merged" / f)
    theirs = tmp_path / "peft-merged.gguf"
    proc = subprocess.run([sys.executable, str(llama_dir() / "convert_hf_to_gguf.py"), str(tmp_path / "peft-merged"),
                           "--outfile", str(theirs), "--outtype", outtype], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    oracle = llama_logits(theirs, None)
    scale = max(1.0, float(np.abs(reference).max()))
    err, without = float(np.abs(got - reference).max()), float(np.abs(plain - reference).max())
    best = float(np.abs(oracle - reference).max())
    print(f"GGUF {outtype} merged by loratools: llama.cpp max |Δlogit| vs PEFT {err:.2e} (PEFT's merge converted "
          f"at {outtype}: {best:.2e}; the base alone {without:.2e})")
    assert err <= {"f32": 1e-3, "f16": 2e-2, "q8_0": 1e-1}[outtype] * scale
    assert err < 0.5 * without and err <= 2 * best + 1e-3 * scale


MOE = {  # config class, model class, config keys, expert names on disk (HF per-expert), their parts
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(moe_intermediate_size=8, num_experts=4, head_dim=8),
                  "mlp.experts", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, head_dim=8), "block_sparse_moe.experts",
                ("w1", "w3", "w2")),
}


def _tiny_moe(arch: str, folder: Path) -> tuple[object, object]:
    import transformers

    cfg_name, cls_name, extra, _, _ = MOE[arch]
    cfg = getattr(transformers, cfg_name)(vocab_size=256, hidden_size=32, intermediate_size=8, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(cfg).eval()
    model.save_pretrained(folder)
    return cfg, model


@pytest.mark.parametrize("arch", sorted(MOE))
def test_gguf_expert_adapters_equal_llama_cpp_converter(tmp_path: Path, arch: str) -> None:
    """Per-expert LoRA (a legacy PEFT adapter: every expert's gate/up/down as nn.Linear modules) goes
    to GGUF stacked into ffn_*_exps lora_a (E, r, in) / lora_b (E, out, r): names and each expert's
    effective ΔW equal llama.cpp's convert_lora_to_gguf.py's, and its file reads back per expert."""
    import gguf
    from safetensors.torch import save_file

    cfg, _ = _tiny_moe(arch, tmp_path / "base")
    _, _, _, family, parts = MOE[arch]
    g = torch.Generator().manual_seed(3)
    sd = {}
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    for layer in range(2):
        for e in range(4):
            for part in parts:
                out_f, in_f = (cfg.hidden_size, inter) if part in ("down_proj", "w2") else (inter, cfg.hidden_size)
                stem = f"base_model.model.model.layers.{layer}.{family}.{e}.{part}"
                sd[stem + ".lora_A.weight"] = torch.randn(4, in_f, generator=g) * 0.2
                sd[stem + ".lora_B.weight"] = torch.randn(out_f, 4, generator=g) * 0.2
    (tmp_path / "peft").mkdir()
    save_file(sd, str(tmp_path / "peft" / "adapter_model.safetensors"))
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": list(parts), "base_model_name_or_path": None}))
    theirs = tmp_path / "theirs.gguf"
    proc = subprocess.run([sys.executable, str(llama_dir() / "convert_lora_to_gguf.py"), str(tmp_path / "peft"),
                           "--base", str(tmp_path / "base"), "--outfile", str(theirs), "--outtype", "f32"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = tmp_path / "ours.gguf"
    loratools.convert(tmp_path / "peft", ours, to="gguf", base=tmp_path / "base")

    def deltas(path: Path) -> dict[str, np.ndarray]:
        r = gguf.GGUFReader(str(path))
        alpha = float(r.fields["adapter.lora.alpha"].contents())
        t = {x.name: np.array(x.data).astype(np.float64) for x in r.tensors}
        return {k[:-7]: alpha / t[k].shape[-2] * (t[k[:-1] + "b"] @ t[k]) for k in t if k.endswith(".lora_a")}

    a, b = deltas(theirs), deltas(ours)
    assert set(a) == set(b) and len([k for k in a if "_exps" in k]) == 2 * 3
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert np.allclose(b[k], a[k], rtol=0, atol=1e-6 * max(1.0, float(np.abs(a[k]).max()))), k
    want = loratools.load_adapter(tmp_path / "peft", base=tmp_path / "base")
    for path in (theirs, ours):
        back = loratools.load_adapter(path, base=tmp_path / "base")
        assert set(back.modules) == set(want.modules)
        for k, m in want.modules.items():
            x, y = back.modules[k].delta.matrix(dtype=torch.float64), m.delta.matrix(dtype=torch.float64)
            assert torch.allclose(x, y, rtol=0, atol=1e-6 * max(1.0, float(y.abs().max()))), k


def test_llama_cpp_runs_mixtral_expert_lora_from_peft_target_parameters(gguf_base, tmp_path: Path) -> None:
    """A PEFT target_parameters adapter on a tiny Mixtral (experts fused in memory, per expert on disk)
    → loratools' GGUF (stacked expert factors) → llama.cpp with the base converted by its own
    convert_hf_to_gguf.py: logits equal PEFT's forward pass; and the same adapter merged into the
    GGUF model by loratools runs equal too."""
    import peft
    import sentencepiece  # noqa: F401 (the fixture's tokenizer)

    llama_base, _ = gguf_base
    cfg, model = _tiny_moe("mixtral", tmp_path / "base")
    shutil.copy(llama_base / "tokenizer.model", tmp_path / "base" / "tokenizer.model")
    base_gguf = tmp_path / "base.gguf"
    proc = subprocess.run([sys.executable, str(llama_dir() / "convert_hf_to_gguf.py"), str(tmp_path / "base"),
                           "--outfile", str(base_gguf), "--outtype", "f32"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                    target_parameters=["mlp.experts.gate_up_proj",
                                                                       "mlp.experts.down_proj"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        reference = pm(torch.tensor([TOKENS])).logits[0].numpy()
    ours = tmp_path / "ours.gguf"
    loratools.convert(tmp_path / "peft", ours, to="gguf", base=tmp_path / "base")
    got, plain = llama_logits(base_gguf, ours), llama_logits(base_gguf, None)
    scale = max(1.0, float(np.abs(reference).max()))
    err = float(np.abs(got - reference).max())
    merged = tmp_path / "merged.gguf"
    assert loratools.merge(base_gguf, tmp_path / "peft", merged).verify.ok
    merged_err = float(np.abs(llama_logits(merged, None) - reference).max())
    print(f"mixtral expert LoRA: llama.cpp max |Δlogit| vs PEFT {err:.2e} as an adapter, {merged_err:.2e} merged "
          f"(base alone {float(np.abs(plain - reference).max()):.2e})")
    assert err <= 1e-3 * scale and merged_err <= 1e-3 * scale
    assert float(np.abs(got - plain).max()) > 1e-2 * scale
