"""Raw state dicts: a module's own weights saved beside LoRA factors that people wrote themselves.

The factors are found by name pairs under a common prefix — ``lora_a``/``lora_b``,
``lora_A``/``lora_B`` (also as ``nn.Linear`` submodules: ``….lora_A.weight``), ``U``/``V``,
``lora_up``/``lora_down`` — but **names do not tell the orientation**: one codebase keeps
``lora_a`` (out, r) and adds ``lora_a @ lora_b``, another keeps ``lora_A`` (in, r) and computes
``x @ lora_A @ lora_B``. So the reader only decides which factor comes first in the product (the
one whose columns match the other's rows); whether ΔW is that product or its transpose is decided
when binding to the base (``layout.py``): from a non-square base's shape, else ``--layout``, else
the orientation every non-square pair of the file agrees on, else an error.

Every other key of the file is a base tensor (consumed as such when the file is also BASE).
No scale is stored: it lives in the code that used the factors; it is 1 here, and ``--weight``
(merge) or ``scale=`` (load_adapter / convert) supplies it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..adapter import Adapter, LoraModule, lowrank_module
from ..checkpoint.reader import PICKLE_SUFFIXES, load_state_dict
from ..checkpoint.safetensors_io import read_header
from ..errors import AdapterFormatError, AdapterNotFoundError, LayoutAmbiguousError, UnsupportedAdapterError
from ..jsonio import clip
from ..layout import PAIRS, split_key
from .common import check_factor, check_rank, check_scale
from .keys import group_keys

NAME = "raw"
SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)

def detect(path: Path) -> bool:
    if not path.is_file() or path.suffix not in SUFFIXES:
        return False
    if path.suffix == ".safetensors":
        names = list(read_header(path).tensors)  # a broken header raises CorruptFileError: broken, not "no"
    else:
        return True  # reading a pickle to peek is the same cost as reading it; read() decides
    return any(split_key(n) for n in names)


def order_pair(prefix: str, x: tuple[str, torch.Tensor], y: tuple[str, torch.Tensor]) -> tuple[
        tuple[str, torch.Tensor], tuple[str, torch.Tensor]]:
    """(first, second) such that first @ second is defined: first (n1, r), second (r, n2)."""
    (_, X), (_, Y) = x, y
    xy = X.shape[1] == Y.shape[0]
    yx = Y.shape[1] == X.shape[0]
    if xy and yx:
        if X.shape[0] == X.shape[1]:
            raise LayoutAmbiguousError(
                f"LoRA factors {clip(x[0])} {tuple(X.shape)} and {clip(y[0])} {tuple(Y.shape)} are square: their rank and "
                "order cannot be told from shapes.",
                tensor=prefix,
                hint="loratools reads low-rank factors; square factors are not a LoRA pair.",
            )
        # both orders chain: the shared dimension of a LoRA is its (smaller) rank
        return (x, y) if X.shape[1] < X.shape[0] else (y, x)
    if xy:
        return x, y
    if yx:
        return y, x
    raise AdapterFormatError(
        f"LoRA factors {clip(x[0])} {tuple(X.shape)} and {clip(y[0])} {tuple(Y.shape)} share no dimension: they cannot be "
        "multiplied in either order.",
        tensor=prefix,
    )


def _linear_convention(first: str, second: str) -> bool | None:
    """False (ΔW = first @ second as stored, (out, in)) when both factors are the ``.weight`` of
    ``nn.Linear`` submodules named the PyTorch way — ``lora_B``/``lora_up`` (out, r) first,
    ``lora_A``/``lora_down`` (r, in) second, as PEFT and most LoRA code store them: the names
    then carry the orientation, square or not. None (shapes, ``--layout`` or agreement decide)
    for bare parameters such as ``lora_a`` or ``U``, whose names say nothing."""
    a, b = split_key(second), split_key(first)
    if not (first.endswith(".weight") and second.endswith(".weight")) or a is None or b is None:
        return None
    partner = {"lora_A": "lora_B", "lora_down": "lora_up"}
    return False if partner.get(a[1]) == b[1] else None


def read(path: Path, *, scale: float = 1.0, **_: object) -> Adapter:
    if not path.is_file():
        raise AdapterNotFoundError(f"Adapter not found: {path}.", path=path)
    sd = load_state_dict(path)
    try:
        named, base_keys = group_keys(sd, split_key)  # every other key is a base tensor
    except AdapterFormatError as e:
        raise AdapterFormatError(f"{path}: {e.message} (several adapters in one state dict?)", path=path,
                                 tensor=e.tensor, hint="Keep one adapter's factors in the file, or save the adapter "
                                 "with PEFT's save_pretrained.") from None
    groups = {prefix: {name: (key, sd[key]) for name, key in roles.items()} for prefix, roles in named.items()}
    modules: dict[str, LoraModule] = {}
    leftovers: list[str] = []
    for prefix, found in sorted(groups.items()):
        pair = next((p for p in PAIRS if p[0] in found and p[1] in found), None)
        if pair is None or len(found) != 2:
            leftovers.extend(k for k, _ in found.values())
            continue
        x, y = found[pair[0]], found[pair[1]]
        for key, t in (x, y):
            if t.dim() != 2:
                raise UnsupportedAdapterError(
                    f"{path}: {clip(key)} has shape {tuple(t.shape)}; raw factor pairs must be 2-D matrices.",
                    path=path,
                    tensor=key,
                )
            check_factor(t, key, path)
        check_rank(path, prefix or "the file's factors", tuple(x[1].shape), tuple(y[1].shape))
        try:
            first, second = order_pair(prefix, x, y)
        except AdapterFormatError as e:
            raise AdapterFormatError(f"{path}: {e.message}", path=path, tensor=e.tensor, hint=e.hint) from None
        except LayoutAmbiguousError as e:
            raise LayoutAmbiguousError(f"{path}: {e.message}", path=path, tensor=e.tensor, hint=e.hint) from None
        B, A = first[1], second[1]
        target = f"{prefix}.weight" if prefix else "weight"
        modules[target] = lowrank_module(
            target,
            A,
            B,
            check_scale(path, prefix or "the file's factors", float(scale)),
            None,
            kind="linear",
            transposed=_linear_convention(first[0], second[0]),
            source_keys=(first[0], second[0]),
        )
    if leftovers:
        raise AdapterFormatError(
            f"{path}: LoRA factor tensors without a partner: {', '.join(clip(k) for k in sorted(leftovers)[:8])}.",
            path=path,
            hint="Factors are paired by a common prefix and the names " + ", ".join("/".join(p) for p in PAIRS) + ".",
        )
    if not modules:
        raise AdapterFormatError(f"{path} holds no LoRA factor pairs.", path=path)
    return Adapter(
        modules=modules,
        meta={"format": NAME, "base_keys": base_keys, "sibling_binding": True, "factor_orientation": True},
        path=path,
        files=[path],
    )
