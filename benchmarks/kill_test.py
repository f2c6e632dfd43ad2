"""Crash safety: `kill -9` at random moments of a merge that overwrites a good OUT.

For each round: a merge with --overwrite onto a complete earlier merge is started and killed with
SIGKILL after a random delay (seeded). Then, before anything else runs, OUT must be either the
previous output, bit for bit, or the new one complete — or absent only in the instant between the
two renames of the final swap, with the previous output intact beside it. The next run must clean
up whatever the killed one left (saying so), and afterwards nothing but OUT may remain.

    python benchmarks/kill_test.py [--rounds 20] [--seed 0] [--mb 64]

Prints one line per round and a summary; exits 1 if any round breaks a promise.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and ".loratools" not in p.parts:
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def make_inputs(root: Path, mb: int) -> tuple[Path, Path]:
    """A base of a few 1024×512 fp32 matrices (about ``mb`` MB, 4 shards) and a raw LoRA on all."""
    g = torch.Generator().manual_seed(0)
    base = root / "base"
    base.mkdir()
    n = max(4, mb // 2)
    names = [f"layers.{i}.proj.weight" for i in range(n)]
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for i, name in enumerate(names):
        shards.setdefault(f"model-{i % 4 + 1:05d}-of-00004.safetensors", {})[name] = torch.randn(
            1024, 512, generator=g)
    weight_map = {}
    for fname, tensors in shards.items():
        save_file(tensors, base / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
    import json

    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (base / "config.json").write_text("{}")
    adapter = root / "lora.safetensors"
    save_file({f"{name.removesuffix('.weight')}.lora_{ab}.weight": (torch.randn(8, 512, generator=g) if ab == "A"
                                                                     else torch.randn(1024, 8, generator=g)) * 0.01
               for name in names for ab in "AB"}, adapter)
    return base, adapter


def merge_cmd(base: Path, adapter: Path, out: Path, weight: float) -> list[str]:
    return [sys.executable, "-m", "loratools", "merge", str(base), str(adapter), str(out), "--overwrite", "-q",
            "--device", "cpu", "--weight", str(weight)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mb", type=int, default=64)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="loratools-kill-"))
    base, adapter = make_inputs(root, args.mb)
    out = root / "out"
    t0 = time.perf_counter()
    subprocess.run(merge_cmd(base, adapter, out, 1.0), check=True)
    duration = time.perf_counter() - t0
    good = {1.0: digest(out)}
    subprocess.run(merge_cmd(base, adapter, root / "ref2", 2.0), check=True)
    good[2.0] = digest(root / "ref2")
    inputs_before = digest(base) + hashlib.sha256(adapter.read_bytes()).hexdigest()
    print(f"one merge takes {duration:.2f} s; killing at uniform random moments in [0, {duration * 1.1:.2f}] s")
    outcomes: dict[str, int] = {}
    broken = 0
    current = 1.0
    for i in range(args.rounds):
        weight = 2.0 if current == 1.0 else 1.0
        delay = rng.uniform(0, duration * 1.1)
        proc = subprocess.Popen(merge_cmd(base, adapter, out, weight), stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        left = sorted(p.name for p in root.iterdir() if p.name.startswith(".out."))
        if out.exists():
            d = digest(out)
            state = "old" if d == good[current] else "new" if d == good[weight] else "DAMAGED"
        else:
            state = "absent" if any(n.startswith(".out.loratools-old-") for n in left) else "LOST"
        ok = state in ("old", "new", "absent")
        # the next run: cleans what the killed one left, then writes OUT completely
        nxt = subprocess.run(merge_cmd(base, adapter, out, weight), capture_output=True, text=True)
        cleaned = "interrupted run" in nxt.stderr
        remains = sorted(p.name for p in root.iterdir() if p.name.startswith(".out."))
        ok = ok and nxt.returncode == 0 and digest(out) == good[weight] and not remains and (cleaned or not left)
        current = weight
        kind = state + (", temporaries left" if left else ", nothing left")
        outcomes[kind] = outcomes.get(kind, 0) + 1
        broken += not ok
        print(f"round {i + 1:2d}: killed after {delay:.2f} s → OUT {state}; left {len(left)} temporary entr"
              f"{'y' if len(left) == 1 else 'ies'}; next run {'cleaned them' if cleaned else 'found none'}"
              f"{'' if ok else '  <-- BROKEN'}")
    intact = inputs_before == digest(base) + hashlib.sha256(adapter.read_bytes()).hexdigest()
    print(f"\n{args.rounds} kills: " + ", ".join(f"{v} × {k}" for k, v in sorted(outcomes.items())))
    print(f"inputs unchanged: {intact}; rounds that broke a promise: {broken}")
    return 1 if broken or not intact else 0


if __name__ == "__main__":
    sys.exit(main())
