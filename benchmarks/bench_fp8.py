"""Merging into an FP8 block-quantized model, side by side with the bf16 merge and a copy.

The TinyLlama-shaped base of bench_merge.py (generated there if missing) quantized the
DeepSeek-V3 / Qwen3-FP8 way — every linear weight of the decoder as float8_e4m3fn codes with a
float32 ``weight_scale_inv`` per 128×128 block, quantization_config in config.json — and the
same r = 16 PEFT adapter. Prints wall time and peak RSS (median of --runs) of:

* ``cp -r`` of the FP8 base;
* ``loratools merge`` into it (requantized per block, default verification);
* ``loratools merge --dtype bf16`` (dequantized, scales dropped);
* the default merge into the bf16 base, for comparison.

    python benchmarks/bench_fp8.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_merge as bm  # noqa: E402


def quantize_base(src: Path, dst: Path) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    dst.mkdir(parents=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        out = {}
        with safe_open(str(src / shard), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if name.startswith("model.layers") and name.endswith("proj.weight"):
                    rows, cols = t.shape
                    blocks = t.float().reshape(rows // 128, 128, cols // 128, 128)
                    scale = blocks.abs().amax(dim=(1, 3)) / 448
                    out[name] = (blocks / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
                    out[name + "_scale_inv"] = scale
                else:
                    out[name] = t
        save_file(out, str(dst / shard), {"format": "pt"})
        weight_map.update({k: shard for k in out})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="bench-work")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = Path(args.workdir)
    shape = bm.SHAPES["1.1b"]
    layers = shape["num_hidden_layers"]
    base, adapter = work / f"base-1.1b-{layers}l", work / f"lora-r16-1.1b-{layers}l"
    if not base.exists():
        bm.make_base(base, layers, shape)
    if not adapter.exists():
        bm.make_adapter(adapter, base)
    fp8 = work / "base-fp8-1.1b"
    if not fp8.exists():
        quantize_base(base, fp8)
    size = sum(p.stat().st_size for p in fp8.glob("*.safetensors"))
    print(f"FP8 base: {size / 1e9:.2f} GB (e4m3 codes + float32 128×128 block scales); adapter r=16 on 7 "
          f"projections per layer; 2 cores; median of {args.runs}")
    lt = [sys.executable, "-m", "loratools"]
    out = work / "out-fp8"
    runs = {
        "cp -r (FP8 base)": ["cp", "-r", str(fp8), str(out)],
        "merge into FP8 (requantized)": lt + ["merge", str(fp8), str(adapter), str(out), "-q"],
        "merge into FP8 --dtype bf16": lt + ["merge", str(fp8), str(adapter), str(out), "-q", "--dtype", "bf16"],
        "merge into the bf16 base": lt + ["merge", str(base), str(adapter), str(out), "-q"],
    }
    print(f"{'':34} {'wall s':>8} {'peak RSS MB':>12}")
    for label, cmd in runs.items():
        secs, mb = bm.median_run(cmd, args.runs, out, False)
        print(f"{label:34} {secs:8.2f} {mb:12.0f}", flush=True)


if __name__ == "__main__":
    main()
