"""unmerge and swap: round trips against the base itself, swaps against PEFT merging the new adapter,
provenance checks, exact undo, DoRA and modules_to_save."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import loratools
from loratools.cli import cli
from tests import models
from tests.helpers import assert_close_fp32, bf16_ulp, read_tensors


def run(*args: object) -> tuple[int, str]:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.output + (r.stderr if r.stderr_bytes is not None else "")


@pytest.mark.parametrize("name", ["all-linear", "dora", "modules-to-save", "embedding", "rslora"])
def test_fp32_round_trip_within_1e6(name: str, bases, adapters, tmp_path: Path) -> None:
    base = bases["llama"]
    loratools.merge(base, [adapters[name]], tmp_path / "m", device="cpu")
    result = loratools.unmerge(tmp_path / "m", [adapters[name]], tmp_path / "u", device="cpu")
    assert result.verify.ok
    original, back = read_tensors(base), read_tensors(tmp_path / "u")
    assert original.keys() == back.keys()
    for k, w in original.items():
        scale = float(w.abs().max())
        assert float((back[k] - w).abs().max()) <= 1e-6 * scale * 4, k  # a few fp32 roundings of the largest value
    assert not (tmp_path / "u" / ".loratools").exists()


def test_bf16_round_trip_within_one_ulp(bases, adapters, tmp_path: Path) -> None:
    """round(round(W+ΔW) − ΔW) is within one ulp of the merged value (the granularity the merged
    model stored it at); wherever |ΔW| ≤ |W| that is within one ulp of W itself; with a trained-size
    adapter nearly every element comes back exactly."""
    base = bases["llama-bf16"]
    small = tmp_path / "small"
    shutil.copytree(adapters["all-linear"], small)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(small / "adapter_model.safetensors"))
    save_file({k: v * (0.01 if "lora_B" in k else 1.0) for k, v in sd.items()}, str(small / "adapter_model.safetensors"))
    for adapter in (adapters["all-linear"], small):
        out_m, out_u = tmp_path / f"m-{adapter.name}", tmp_path / f"u-{adapter.name}"
        loratools.merge(base, [adapter], out_m, device="cpu")
        loratools.unmerge(out_m, [adapter], out_u, device="cpu")
        merged, back = read_tensors(out_m), read_tensors(out_u)
        modules = loratools.load_adapter(adapter).modules
        exact = total = 0
        for k, w in read_tensors(base).items():
            err = (back[k].double() - w.double()).abs()
            assert bool((err <= bf16_ulp(merged[k].double())).all()), k
            if k in modules:
                small_delta = loratools.delta(modules[k], dtype=torch.float64).abs() <= w.double().abs()
                assert bool((err <= bf16_ulp(w.double()))[small_delta].all()), k
            exact += int((err == 0).sum())
            total += w.numel()
        if adapter == small:
            assert exact / total > 0.95


@pytest.mark.parametrize("base_name", ["llama", "llama-bf16"])
def test_reversible_merge_unmerges_bit_for_bit(base_name: str, bases, adapters, tmp_path: Path) -> None:
    base = bases[base_name]
    a, b = adapters["all-linear"], adapters["second"]
    merged = loratools.merge(base, [a, b], tmp_path / "m", weights=[1.0, 0.5], device="cpu", reversible=True)
    weights_bytes = sum(p.stat().st_size for p in (tmp_path / "m").glob("model*.safetensors"))
    assert 0 < merged.undo_bytes < weights_bytes
    loratools.unmerge(tmp_path / "m", [a, b], tmp_path / "u", device="cpu")
    original, back = read_tensors(base), read_tensors(tmp_path / "u")
    for k in original:
        assert torch.equal(original[k].view(torch.uint8), back[k].view(torch.uint8)), k
    # without the undo data the same unmerge is only within rounding: the data is what made it exact
    loratools.unmerge(tmp_path / "m", [a, b], tmp_path / "v", device="cpu", exact=False)
    approx = read_tensors(tmp_path / "v")
    assert any(not torch.equal(original[k], approx[k]) for k in original)


def test_partial_unmerge_leaves_the_other_adapter(bases, adapters, tmp_path: Path) -> None:
    a, b = adapters["all-linear"], adapters["second"]
    loratools.merge(bases["llama"], [a, b], tmp_path / "ab", device="cpu", weights=[1.0, 0.5])
    result = loratools.unmerge(tmp_path / "ab", [b], tmp_path / "a", device="cpu")  # weight 0.5 from the record
    assert result.plan.adapters[0].weight == 0.5
    oracle = models.peft_merged_state_dict(bases["llama"], [a])
    for k, v in read_tensors(tmp_path / "a").items():
        assert_close_fp32(v, oracle[k], k)
    record = json.loads(_meta(tmp_path / "a")["loratools"])
    assert [e["sha256"] for e in record["adapters"]] == [result.plan.adapters[0].sha256 and
                                                         loratools.ops.plan.file_sha256([a / "adapter_model.safetensors"])]


def _meta(folder: Path) -> dict:
    from tests.helpers import file_metadata

    return file_metadata(next(folder.glob("model*.safetensors")))


def test_swap_equals_merging_the_new_adapter(bases, adapters, tmp_path: Path) -> None:
    base, old, new = bases["llama"], adapters["all-linear"], adapters["patterns"]
    loratools.merge(base, [old], tmp_path / "m", device="cpu")
    code, text = run("swap", tmp_path / "m", old, new, tmp_path / "s", "-q")
    assert code == 0, text
    oracle = models.peft_merged_state_dict(base, [new])
    for k, v in read_tensors(tmp_path / "s").items():
        assert_close_fp32(v, oracle[k], k, rtol=4e-6 * 5)
    record = json.loads(_meta(tmp_path / "s")["loratools"])
    assert [e["path"] for e in record["adapters"]] == [new.name]  # a name, never a local absolute path


@pytest.mark.parametrize("precision", ["fp32", "fp64"])
def test_swap_bf16_is_one_rounding(precision: str, bases, adapters, tmp_path: Path) -> None:
    """W'' = round(W' − ΔW_old + ΔW_new) against float64 from the merged file and the raw factors.

    With fp64 arithmetic the result is the correctly rounded value (≤ ½ ulp); with fp32 the sum
    may cancel, so the fp32 forward-error bound (r+4)·2⁻²⁴·(|W'| + Σ|B||A|) is added."""
    from safetensors.torch import load_file

    base, old, new = bases["llama-bf16"], adapters["all-linear"], adapters["second"]
    loratools.merge(base, [old], tmp_path / "m", device="cpu")
    loratools.swap(tmp_path / "m", old, new, tmp_path / "s", device="cpu", weight=0.75, precision=precision)
    merged, swapped = read_tensors(tmp_path / "m"), read_tensors(tmp_path / "s")
    terms = []
    for adapter, w in ((old, -1.0), (new, 0.75)):
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        terms.append((load_file(str(adapter / "adapter_model.safetensors")), w * cfg["lora_alpha"] / cfg["r"]))
    for k, W in merged.items():
        ref = W.double()
        mag = W.double().abs()
        for factors, s in terms:
            a_key = "base_model.model." + k.removesuffix(".weight") + ".lora_A.weight"
            if a_key in factors:
                A, B = factors[a_key].double(), factors[a_key.replace("lora_A", "lora_B")].double()
                ref = ref + s * (B @ A)
                mag = mag + abs(s) * (B.abs() @ A.abs())
        err = (swapped[k].double() - ref).abs()
        if precision == "fp64":
            assert bool((err <= bf16_ulp(ref) / 2 * (1 + 1e-9)).all()), k
        else:
            assert bool((err <= bf16_ulp(ref) + 24 * 2.0**-24 * mag).all()), k


def test_unmerge_refuses_an_adapter_that_was_not_merged(bases, adapters, tmp_path: Path) -> None:
    loratools.merge(bases["llama"], [adapters["all-linear"]], tmp_path / "m", device="cpu")
    code, text = run("unmerge", tmp_path / "m", adapters["second"], tmp_path / "u")
    assert code == 1 and "was not merged" in text and str(adapters["second"]) in text
    assert "all-linear (weight 1.0)" in text and not (tmp_path / "u").exists()
    code, text = run("unmerge", tmp_path / "m", adapters["all-linear"], tmp_path / "u", "--weight", "0.5")
    assert code == 1 and "weight 1" in text
    code, text = run("unmerge", tmp_path / "m", adapters["second"], tmp_path / "u", "--force", "-q")
    assert code == 0 and "--force" in text
    code, text = run("swap", tmp_path / "m", adapters["second"], adapters["all-linear"], tmp_path / "s")
    assert code == 1 and "was not merged" in text


def test_unmerge_of_a_model_merged_elsewhere_warns(bases, adapters, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM
    from peft import PeftModel

    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bases["llama"]), str(adapters["second"]))
    pm.merge_and_unload().save_pretrained(tmp_path / "peft-merged")
    code, text = run("unmerge", tmp_path / "peft-merged", adapters["second"], tmp_path / "u", "-q")
    assert code == 0 and "no loratools record" in text
    for k, w in read_tensors(bases["llama"]).items():
        assert_close_fp32(read_tensors(tmp_path / "u")[k], w, k, rtol=1e-6 * 4)


def test_dora_unmerge_needs_the_stored_norms(bases, adapters, tmp_path: Path) -> None:
    loratools.merge(bases["llama"], [adapters["dora"]], tmp_path / "m", device="cpu")
    shutil.copytree(tmp_path / "m", tmp_path / "m2")
    shutil.rmtree(tmp_path / "m2" / ".loratools")
    code, text = run("unmerge", tmp_path / "m2", adapters["dora"], tmp_path / "u")
    assert code == 1 and "row norms" in text and not (tmp_path / "u").exists()


def test_single_file_reversible_keeps_undo_beside(bases, adapters, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    loratools.merge(bases["conv"], [adapters["conv"]], out, device="cpu", reversible=True)
    assert (tmp_path / ".m.safetensors.loratools" / "undo.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["m.safetensors"]
    loratools.unmerge(out, [adapters["conv"]], tmp_path / "u.safetensors", device="cpu")
    original, back = read_tensors(bases["conv"]), read_tensors(tmp_path / "u.safetensors")
    assert all(torch.equal(original[k], back[k]) for k in original)


def test_undo_data_of_earlier_versions_is_still_read(bases, adapters, tmp_path: Path) -> None:
    """Merges written before the undo data moved into .loratools/ kept it beside the shards."""
    loratools.merge(bases["llama"], [adapters["dora"]], tmp_path / "m", device="cpu")
    (tmp_path / "m" / ".loratools" / "undo.safetensors").rename(tmp_path / "m" / "loratools_undo.safetensors")
    (tmp_path / "m" / ".loratools").rmdir()
    result = loratools.unmerge(tmp_path / "m", [adapters["dora"]], tmp_path / "u", device="cpu")
    assert result.verify.ok


def test_undo_data_of_earlier_versions_still_restores_bit_for_bit(bases, adapters, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Reversible merges now form each product in its own buffer (kernels.apply_products) and say so
    in their undo record ("kernel": "mm-add"); undo data of earlier versions (addmm sums, and no
    kernel named or "addmm") is still undone with addmm, bit for bit — and a kernel this version
    does not know is refused."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from loratools.ops import kernels, undo

    base, a = bases["llama-bf16"], adapters["all-linear"]
    # an earlier version's reversible merge: addmm there and back, its record naming no kernel
    monkeypatch.setattr(kernels, "apply_products", lambda S, W, terms, i, j, P: kernels.apply_block(S, W, terms, i, j))
    monkeypatch.setattr(kernels, "remove_products", lambda S, out, terms, i, j, P: kernels.apply_block(
        S, out, [(L, R, -x) for L, R, x in terms], i, j))
    monkeypatch.setattr(undo, "KERNEL", "addmm")
    loratools.merge(base, [a], tmp_path / "old", device="cpu", reversible=True)
    monkeypatch.undo()
    path = tmp_path / "old" / ".loratools" / "undo.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    record = json.loads(meta["loratools"])
    assert record.pop("kernel") == "addmm"
    save_file(tensors, str(path), metadata={**meta, "loratools": json.dumps(record)})
    loratools.unmerge(tmp_path / "old", [a], tmp_path / "u", device="cpu")
    original, back = read_tensors(base), read_tensors(tmp_path / "u")
    for k in original:
        assert torch.equal(original[k].view(torch.uint8), back[k].view(torch.uint8)), k
    record["kernel"] = "something-newer"
    save_file(tensors, str(path), metadata={**meta, "loratools": json.dumps(record)})
    code, text = run("unmerge", tmp_path / "old", a, tmp_path / "w", "-q")
    assert code == 1 and "kernel" in text and not (tmp_path / "w").exists()
