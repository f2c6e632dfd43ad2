"""What loratools writes, loaded by the runtimes themselves: MLX-LM (mlx[cpu] + mlx-lm wheels) loads
each converted adapter onto the base and its logits are compared with PEFT's un-merged forward pass.
llama.cpp is in tests/test_interop.py (opt-in: it needs llama-cpp-python built from source)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import loratools

from . import models

mx = pytest.importorskip("mlx.core", reason="mlx[cpu] and mlx-lm are test dependencies (pip install -e '.[test]')")
mlx_utils = pytest.importorskip("mlx_lm.utils")
mlx_tuner = pytest.importorskip("mlx_lm.tuner.utils")

TOKENS = [[1, 5, 9, 20, 33, 7, 101, 250]]
CASES = {
    "all-linear": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"],
                     rank_pattern={"layers.1.self_attn.q_proj": 2, "k_proj": 6}, alpha_pattern={"down_proj": 32}),
    "rslora": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"]),
    "embedding": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    "embeddings-lm_head": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"]),
    "first-layer-only": dict(r=4, lora_alpha=8, target_modules=["o_proj", "gate_proj"], layers_to_transform=[0],
                             layers_pattern="layers"),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], use_dora=True),
}


def peft_logits(base: Path, adapter: Path) -> np.ndarray:
    from peft import PeftModel

    pm = PeftModel.from_pretrained(models.load_base(base), str(adapter)).eval()
    with torch.no_grad():
        return pm(torch.tensor(TOKENS)).logits.numpy()


def mlx_logits(base: Path, adapter: Path) -> np.ndarray:
    model, _ = mlx_utils.load_model(base)
    mlx_tuner.load_adapters(model, str(adapter))
    return np.array(model(mx.array(TOKENS)).astype(mx.float32))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("with_base", [True, False])
def test_mlx_lm_loads_what_loratools_writes(bases, tmp_path: Path, name: str, with_base: bool) -> None:
    base = bases["llama"]
    adapter = models.make_peft_adapter(base, tmp_path / "peft", CASES[name], seed=7)
    out = tmp_path / "mlx"
    loratools.convert(adapter, out, to="mlx", base=base if with_base else None)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["model"] is None  # a local path never goes into the file
    got, want = mlx_logits(base, out), peft_logits(base, adapter)
    assert got.shape == want.shape
    err = float(np.abs(got - want).max())
    print(f"MLX-LM adapter {name} (base given: {with_base}): max |Δlogit| vs PEFT {err:.1e}")
    assert err < 2e-5 * max(1.0, float(np.abs(want).max())), name


MERGED = {
    "all-linear": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], use_dora=True),
    "modules_to_save": dict(r=4, lora_alpha=8, target_modules=["v_proj"], modules_to_save=["lm_head"]),
    "embeddings-lm_head": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"]),
}


@pytest.mark.parametrize("name", sorted(MERGED))
def test_merged_models_load_in_mlx_lm_and_transformers(bases, tmp_path: Path, name: str) -> None:
    """What `merge` writes is a plain model: MLX-LM's own loader and transformers take the folder as it
    is — the base's files and nothing else at its root (DoRA's undo data goes to the hidden
    ``.loratools/`` folder no loader reads) — and the logits are PEFT's un-merged forward pass."""
    base = bases["llama"]
    adapter = models.make_peft_adapter(base, tmp_path / "peft", MERGED[name], seed=5)
    out = tmp_path / "merged"
    loratools.merge(base, [adapter], out)
    result_names = sorted(p.name for p in out.iterdir() if p.name != ".loratools")  # undo data: no loader looks there
    assert result_names == sorted(p.name for p in base.iterdir())
    want = peft_logits(base, adapter)
    model, _ = mlx_utils.load_model(out)
    got = np.array(model(mx.array(TOKENS)).astype(mx.float32))
    with torch.no_grad():
        tf = models.load_base(out)(torch.tensor(TOKENS)).logits.numpy()
    scale = max(1.0, float(np.abs(want).max()))
    err, tf_err = float(np.abs(got - want).max()), float(np.abs(tf - want).max())
    print(f"merged {name}: max |Δlogit| vs PEFT: MLX-LM {err:.1e}, transformers {tf_err:.1e}")
    assert err < 2e-5 * scale and tf_err < 2e-5 * scale


@pytest.mark.parametrize("name", ["embeddings-lm_head", "first-layer-only", "patterns"])
def test_mlx_lm_fuse_takes_what_loratools_writes(bases, tmp_path: Path, name: str) -> None:
    """mlx_lm's own ``fuse`` command merges loratools' MLX adapter into the base (it failed on
    embed_tokens / lm_head keys and on num_layers), and the fused model gives PEFT's logits."""
    import subprocess
    import sys

    base = bases["llama"]
    adapter = models.make_peft_adapter(base, tmp_path / "peft", CASES[name], seed=7)
    out = tmp_path / "mlx"
    loratools.convert(adapter, out, to="mlx", base=base)
    fused = tmp_path / "fused"
    proc = subprocess.run([sys.executable, "-m", "mlx_lm", "fuse", "--model", str(base), "--adapter-path", str(out),
                           "--save-path", str(fused)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model, _ = mlx_utils.load_model(fused)
    got = np.array(model(mx.array(TOKENS)).astype(mx.float32))
    want = peft_logits(base, adapter)
    err = float(np.abs(got - want).max())
    print(f"mlx_lm fuse {name}: max |Δlogit| vs PEFT {err:.1e}")
    assert err < 2e-5 * max(1.0, float(np.abs(want).max()))
