from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from tests import models

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _quiet_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="session")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny bases saved by transformers: fp32 sharded llama, bf16 single-file llama, gpt2, a conv net file."""
    root = tmp_path_factory.mktemp("bases")
    return {
        "llama": models.save_tiny_llama(root / "llama", max_shard_size="60KB"),
        "llama-bf16": models.save_tiny_llama(root / "llama-bf16", dtype=torch.bfloat16),
        "gpt2": models.save_tiny_gpt2(root / "gpt2"),
        "conv": models.save_convnet(root / "convnet.safetensors"),
    }


ADAPTERS: dict[str, tuple[str, dict]] = {
    # name: (base, LoraConfig kwargs)
    "all-linear": ("llama", dict(r=8, lora_alpha=16, target_modules="all-linear")),
    "rslora": ("llama", dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"])),
    "patterns": (
        "llama",
        dict(
            r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"],
            rank_pattern={"layers.1.self_attn.q_proj": 2, "k_proj": 6, "nothing_matches": 3},
            alpha_pattern={"down_proj": 32, "q_proj": 5},
        ),
    ),
    "regex-layers": ("llama", dict(r=4, lora_alpha=8, target_modules=r".*\.(q_proj|up_proj)",)),
    "layers-to-transform": (
        "llama", dict(r=4, lora_alpha=8, target_modules=["o_proj", "gate_proj"], layers_to_transform=[1],
                      layers_pattern="layers"),
    ),
    "embedding": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "lora-bias": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                               lora_bias=True)),
    "gpt2-no-fifo": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"])),
    "dora": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], use_dora=True)),
    "dora-gpt2": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], use_dora=True,
                               fan_in_fan_out=True)),
    "dora-embedding": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "v_proj"], use_dora=True)),
    "modules-to-save": ("llama", dict(r=4, lora_alpha=8, target_modules=["v_proj"], modules_to_save=["lm_head"])),
    "conv": ("conv", dict(r=3, lora_alpha=6, target_modules=["conv_in", "proj", "head"], lora_bias=True)),
    "conv-dora": ("conv", dict(r=3, lora_alpha=6, target_modules=["conv_in", "proj"], use_dora=True)),
    "second": ("llama", dict(r=2, lora_alpha=2, target_modules=["q_proj", "o_proj"])),
}


@pytest.fixture(scope="session")
def adapters(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    made: dict[str, Path] = {}
    for i, (name, (base, lora)) in enumerate(ADAPTERS.items()):
        made[name] = models.make_peft_adapter(bases[base], root / name, lora, seed=10 + i)
    # PEFT writes fan_in_fan_out=true once it has switched it on for Conv1D; configs written by hand or by
    # older versions say false, and PEFT flips it again when loading. Keep one such file.
    cfg_path = made["gpt2-no-fifo"] / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["fan_in_fan_out"] = False
    cfg_path.write_text(json.dumps(cfg))
    return made
