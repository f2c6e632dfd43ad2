"""Tiny real models and adapters, made with transformers and peft themselves (seeded).

These are the oracles' raw material: a base saved by ``save_pretrained``, an adapter saved by
PEFT's ``save_pretrained``; tests then compare loratools' output with what PEFT and transformers
compute from the same files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


def save_tokenizer(path: Path, vocab_size: int = 256) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, vocab_size):
        vocab[f"t{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


def save_tiny_llama(
    path: Path, *, dtype: torch.dtype = torch.float32, max_shard_size: str | None = None, seed: int = 0,
    tokenizer: bool = True, **overrides: Any,
) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**LLAMA, **overrides})
    model = LlamaForCausalLM(cfg).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    if tokenizer:
        save_tokenizer(path, cfg.vocab_size)
    return Path(path)


def save_tiny_gpt2(path: Path, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64, tie_word_embeddings=False)
    GPT2LMHeadModel(cfg).to(dtype).save_pretrained(path)
    return Path(path)


class ConvNet(nn.Module):
    """A small UNet-like block: 3×3 and 1×1 convs, a linear head with a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1)
        self.proj = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(torch.relu(self.conv_in(x)))
        return self.head(h.mean(dim=(2, 3)))


def save_convnet(path: Path, *, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    save_file(ConvNet().state_dict(), str(path))
    return Path(path)


def load_convnet(path: Path) -> ConvNet:
    from safetensors.torch import load_file

    net = ConvNet()
    net.load_state_dict(load_file(str(path)))
    return net


def load_base(base: Path, *, dtype: torch.dtype | None = None) -> nn.Module:
    """transformers' own loading of a base folder, or the ConvNet for a .safetensors file."""
    if base.suffix == ".safetensors":
        return load_convnet(base)
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype} if dtype is not None else {}
    return AutoModelForCausalLM.from_pretrained(base, **kwargs)


def perturb_adapter(model: nn.Module, seed: int) -> None:
    """Make every adapter tensor non-trivial: DoRA magnitudes, lora biases and saved modules get noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * (torch.rand(p.shape, generator=g) - 0.5))
            elif "lora_B" in name and name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
            elif "lora_embedding_B" in name or ("lora_B" in name and p.abs().max() == 0):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def make_peft_adapter(base: Path, out: Path, lora: dict[str, Any], *, seed: int = 1) -> Path:
    """A PEFT adapter on ``base`` with ``LoraConfig(**lora)``, non-zero and saved by PEFT."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = load_base(Path(base), dtype=torch.float32)
    cfg = LoraConfig(**{"init_lora_weights": False, **lora})
    peft_model = get_peft_model(model, cfg)
    perturb_adapter(peft_model, seed)
    peft_model.save_pretrained(out)
    return Path(out)


def peft_merged_state_dict(base: Path, adapters: list[Path], weights: list[float] | None = None,
                           *, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The oracle: PEFT's merge_and_unload of the adapters (one after the other) onto transformers' base."""
    from peft import PeftModel

    model = load_base(Path(base), dtype=dtype)
    weights = weights or [1.0] * len(adapters)
    pm = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="a0")
    for i, a in enumerate(adapters[1:], start=1):
        pm.load_adapter(str(a), adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapters))]
    for name, w in zip(names, weights):
        if w != 1.0:  # PEFT's own way to weight an adapter: scale its LoRA layers
            for module in pm.modules():
                scaling = getattr(module, "scaling", None)
                if isinstance(scaling, dict) and name in scaling:
                    module.scaling[name] *= w
    pm.base_model.set_adapter(names)
    merged = pm.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def save_tiny_unet(path: Path, *, seed: int = 0) -> Path:
    """A tiny SD1-style UNet saved by diffusers (1×1 conv proj_in/proj_out, attention, resnets)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4, use_linear_projection=False,
    )
    unet.save_pretrained(path)
    return Path(path)


def save_tiny_clip(path: Path, *, seed: int = 0) -> Path:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16)
    CLIPTextModel(cfg).save_pretrained(path)
    return Path(path)


def make_peft_adapter_on(model: nn.Module, out: Path, lora: dict[str, Any], *, seed: int = 1) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(**{"init_lora_weights": False, **lora}))
    perturb_adapter(peft_model, seed)
    peft_model.save_pretrained(out)
    return Path(out)
