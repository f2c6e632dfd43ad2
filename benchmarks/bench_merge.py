"""Merge benchmark: a TinyLlama-shaped checkpoint (1.1B parameters, bf16, 1 GB shards) and an r=16
all-linear PEFT adapter, merged by loratools, by PEFT (from_pretrained + merge_and_unload +
save_pretrained), and copied with ``cp -r`` for reference. Prints wall time and peak memory (max RSS
of the process that did the work) side by side.

    python benchmarks/bench_merge.py [--workdir bench-work] [--layers 22] [--keep]

The base and adapter are generated once in --workdir (random values, real TinyLlama shapes and
names, written as transformers shards them). Needs the `test` extra (peft, transformers).
Each tool runs in its own process; the file cache is warm for all of them (the base is read once
before timing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

TINYLLAMA = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
    num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
    tie_word_embeddings=False, model_type="llama", architectures=["LlamaForCausalLM"], torch_dtype="bfloat16",
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_base(path: Path, layers: int) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**TINYLLAMA, "num_hidden_layers": layers})
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    path.mkdir(parents=True)
    cfg.save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    limit, shards, current, size = 10**9, [], {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape) * 2
        if current and size + n > limit:
            shards.append(current)
            current, size = {}, 0
        current[name] = shape
        size += n
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for n, s in shard.items()}
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    total = sum(math.prod(s) * 2 for s in shapes.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def make_adapter(path: Path, base: Path, r: int = 16) -> None:
    import torch
    from peft import LoraConfig
    from safetensors import safe_open
    from safetensors.torch import save_file

    index = json.loads((base / "model.safetensors.index.json").read_text())
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name, fname in index["weight_map"].items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in TARGETS:
            continue
        with safe_open(str(base / fname), "pt") as f:
            out_f, in_f = f.get_slice(name).get_shape()
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, in_f, generator=g) / math.sqrt(in_f)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.01
    path.mkdir(parents=True)
    LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, task_type="CAUSAL_LM").save_pretrained(str(path))
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})


PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size="1GB")
"""

MEASURE = """
import resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:]).returncode
dt = time.perf_counter() - t
print(f"{rc} {dt:.3f} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}")
"""


def measure(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of a command run in its own process."""
    proc = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    try:
        rc, secs, kb = last.split()
    except ValueError:
        raise SystemExit(f"measurement failed for {cmd}:\n{proc.stdout}\n{proc.stderr}")
    if rc != "0":
        raise SystemExit(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
    return float(secs), int(kb) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="bench-work")
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the outputs")
    args = ap.parse_args()
    work = Path(args.workdir)
    base, adapter = work / f"tinyllama-{args.layers}l", work / f"lora-r16-{args.layers}l"
    if not base.exists():
        t = time.perf_counter()
        make_base(base, args.layers)
        print(f"generated base in {time.perf_counter() - t:.0f} s")
    if not adapter.exists():
        make_adapter(adapter, base)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    for p in base.glob("*.safetensors"):  # warm the file cache so every contender starts equal
        with open(p, "rb") as f:
            while f.read(1 << 26):
                pass
    loratools = [sys.executable, "-m", "loratools"]
    runs = {
        "cp -r": ["cp", "-r", str(base), str(work / "out-cp")],
        "loratools merge": loratools + ["merge", str(base), str(adapter), str(work / "out-lt"), "-q"],
        "loratools merge --no-verify": loratools
        + ["merge", str(base), str(adapter), str(work / "out-lt-nv"), "-q", "--no-verify"],
        "loratools merge --reversible": loratools
        + ["merge", str(base), str(adapter), str(work / "out-lt-rev"), "-q", "--reversible", "--no-verify"],
    }
    if not args.skip_peft:
        runs["PEFT merge_and_unload"] = [sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter),
                                         str(work / "out-peft")]
    params = size / 2 / 1e9
    print(f"base: {params:.2f}B parameters, bf16, {size / 1e9:.2f} GB in "
          f"{len(list(base.glob('*.safetensors')))} shards; adapter r=16 on {len(TARGETS)} projections per layer")
    print(f"machine: {os.cpu_count()} cores; torch threads default")
    print(f"{'':32} {'wall s':>8} {'peak RSS MB':>12}")
    for label, cmd in runs.items():
        out = next(Path(c) for c in cmd if Path(c).parent == work and Path(c).name.startswith("out-"))
        if out.exists():
            shutil.rmtree(out)
        secs, mb = measure(cmd)
        extra = ""
        undo = out / "loratools_undo.safetensors"
        if undo.exists():
            extra = f"   undo data {undo.stat().st_size / 1e6:.1f} MB ({100 * undo.stat().st_size / size:.2f}% of the weights)"
        print(f"{label:32} {secs:8.1f} {mb:12.0f}{extra}", flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
