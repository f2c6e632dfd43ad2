"""Merge benchmark: a TinyLlama-shaped checkpoint (1.1B parameters, bf16, 1 GB shards) or a
Llama-3.2-3B-shaped one (--model 3b), and an r=16 all-linear PEFT adapter; merged by loratools (default
verification, --no-verify, --verify-full, --reversible), unmerged, swapped, merged by PEFT
(from_pretrained + merge_and_unload + save_pretrained), and copied with ``cp -r`` for reference.
Prints the median wall time, the peak memory (max RSS of the process that did the work) and the
ratios to cp and to PEFT, side by side.

    python benchmarks/bench_merge.py [--model 1.1b|3b] [--runs 3] [--skip-peft] [--only LABELS] [--keep]

The base and adapters are generated once in --workdir (random values, real shapes and names,
written as transformers shards them). Needs the `test` extra (peft, transformers). Each tool runs in
its own process; the file cache is warm for all of them (the base is read once before timing) and
``sync`` runs before each run, so none pays for the write-back of the one before.
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
LLAMA32_3B = dict(  # Llama-3.2-3B's widths (tied embeddings, 128k vocabulary)
    hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=2048, rms_norm_eps=1e-5,
    tie_word_embeddings=True, model_type="llama", architectures=["LlamaForCausalLM"], torch_dtype="bfloat16",
)
SHAPES = {"1.1b": TINYLLAMA, "3b": LLAMA32_3B}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_base(path: Path, layers: int, shape: dict) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**shape, "num_hidden_layers": layers})
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    if cfg.tie_word_embeddings:  # saved once, as transformers does
        shapes.pop("lm_head.weight", None)
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


def make_second(path: Path, base: Path) -> None:
    """A second adapter of the same shape (the NEW side of swap)."""
    import torch
    from safetensors.torch import load_file, save_file

    first = path.parent / path.name.replace("lora2-", "lora-")
    path.mkdir(parents=True)
    tensors = {k: torch.flip(v, dims=[0]).contiguous() for k, v in load_file(str(first / "adapter_model.safetensors")).items()}
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    shutil.copy(first / "adapter_config.json", path / "adapter_config.json")


def _sync() -> None:
    """Start every run with no dirty pages of the previous one still being written back."""
    if hasattr(os, "sync"):
        os.sync()


def median_run(cmd: list[str], runs: int, out: Path | None, keep: bool) -> tuple[float, float]:
    """Median wall time and the largest peak RSS of ``runs`` runs."""
    times, peaks = [], []
    for _ in range(runs):
        if out is not None and out.exists():
            shutil.rmtree(out)
        _sync()
        secs, mb = measure(cmd)
        times.append(secs)
        peaks.append(mb)
    if out is not None and not keep:
        shutil.rmtree(out, ignore_errors=True)
    times.sort()
    return times[len(times) // 2], max(peaks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="bench-work")
    ap.add_argument("--model", choices=sorted(SHAPES), default="1.1b", help="model shape (default 1.1b: TinyLlama)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers, for a quick look")
    ap.add_argument("--runs", type=int, default=3, help="runs per contender; the median is printed")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--only", default=None, help="labels to run, separated by | (or commas where no label has one); cp always runs")
    ap.add_argument("--keep", action="store_true", help="keep the outputs")
    args = ap.parse_args()
    shape = SHAPES[args.model]
    layers = args.layers or shape["num_hidden_layers"]
    work = Path(args.workdir)
    tag = f"{args.model}-{layers}l"
    base, adapter, second = work / f"base-{tag}", work / f"lora-r16-{tag}", work / f"lora2-r16-{tag}"
    old = work / f"tinyllama-{layers}l"  # the name earlier versions of this script used
    if args.model == "1.1b" and old.exists() and not base.exists():
        old.rename(base)
    if not base.exists():
        t = time.perf_counter()
        make_base(base, layers, shape)
        print(f"generated base in {time.perf_counter() - t:.0f} s")
    if not adapter.exists():
        make_adapter(adapter, base)
    if not second.exists():
        make_second(second, base)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    for p in base.glob("*.safetensors"):  # warm the file cache so every contender starts equal
        with open(p, "rb") as f:
            while f.read(1 << 26):
                pass
    lt = [sys.executable, "-m", "loratools"]
    merged = work / f"merged-{tag}"
    if not merged.exists():  # the input of unmerge and swap: a default merge
        subprocess.run(lt + ["merge", str(base), str(adapter), str(merged), "-q"], check=True)
    merged_rev = work / f"merged-rev-{tag}"
    if not merged_rev.exists():
        subprocess.run(lt + ["merge", str(base), str(adapter), str(merged_rev), "-q", "--reversible"], check=True)
    out = work / "out"
    runs: dict[str, list[str]] = {
        "cp -r": ["cp", "-r", str(base), str(out)],
        "merge (default, verified)": lt + ["merge", str(base), str(adapter), str(out), "-q"],
        "merge --no-verify": lt + ["merge", str(base), str(adapter), str(out), "-q", "--no-verify"],
        "merge --verify-full": lt + ["merge", str(base), str(adapter), str(out), "-q", "--verify-full"],
        "merge --reversible": lt + ["merge", str(base), str(adapter), str(out), "-q", "--reversible"],
        "unmerge": lt + ["unmerge", str(merged), str(adapter), str(out), "-q"],
        "unmerge (exact, of --reversible)": lt + ["unmerge", str(merged_rev), str(adapter), str(out), "-q"],
        "swap": lt + ["swap", str(merged), str(adapter), str(second), str(out), "-q"],
    }
    if not args.skip_peft:
        runs["PEFT merge_and_unload"] = [sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(out)]
    if args.only:
        wanted = {w.strip() for w in args.only.split("|" if "|" in args.only else ",")}  # labels hold commas
        runs = {k: v for k, v in runs.items() if k == "cp -r" or k in wanted}
    params = size / 2 / 1e9
    print(f"base: {args.model} shape, {layers} layers, {params:.2f}B parameters, bf16, {size / 1e9:.2f} GB in "
          f"{len(list(base.glob('*.safetensors')))} shards; adapter r=16 on {len(TARGETS)} projections per layer")
    print(f"machine: {os.cpu_count()} cores; median of {args.runs} run(s), page cache warm, sync before each run")
    print(f"{'':34} {'wall s':>8} {'peak RSS MB':>12} {'× cp':>7} {'× PEFT':>7}")
    results: dict[str, tuple[float, float]] = {}
    for label, cmd in runs.items():
        results[label] = median_run(cmd, args.runs, out, args.keep and label != "cp -r")
    cp = results["cp -r"][0]
    peft = results.get("PEFT merge_and_unload", (None, None))[0]
    for label, (secs, mb) in results.items():
        ratio_peft = f"{secs / peft:7.2f}" if peft else f"{'-':>7}"
        print(f"{label:34} {secs:8.2f} {mb:12.0f} {secs / cp:7.2f} {ratio_peft}", flush=True)
    for p in (merged, merged_rev):
        undo = p / ".loratools" / "undo.safetensors"
        if undo.exists():
            print(f"undo data of {p.name}: {undo.stat().st_size / 1e6:.1f} MB "
                  f"({100 * undo.stat().st_size / size:.2f}% of the weights)")


if __name__ == "__main__":
    main()
