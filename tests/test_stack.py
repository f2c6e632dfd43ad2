"""stack, resize, extract — against PEFT (loading and merging the results, its own merge_utils
definitions, add_weighted_adapter's cat) and float64 arithmetic (torch.linalg.svdvals for the
Eckart–Young bound)."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loratools
from tests import models
from tests.helpers import assert_close_fp32, read_tensors


def deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW per target from the raw PEFT files (float64): scale·B@A with scale from the config."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for k, A in sd.items():
        if not k.endswith("lora_A.weight"):
            continue
        module = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        r = A.shape[0]
        alpha = cfg["lora_alpha"]
        for pat, a in (cfg.get("alpha_pattern") or {}).items():
            import re

            if re.match(rf"(.*\.)?({pat})$", module):
                alpha = a
                break
        B = sd[k.replace("lora_A", "lora_B")]
        scale = alpha / r ** 0.5 if cfg.get("use_rslora") else alpha / r
        out[module + ".weight"] = scale * (B.double().reshape(B.shape[0], r) @ A.double().reshape(r, -1))
    return out


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    return models.peft_merged_state_dict(base, [adapter])


def test_cat_is_exact_and_matches_merging_both(bases, adapters, tmp_path: Path) -> None:
    a, b = adapters["all-linear"], adapters["second"]
    result = loratools.stack([a, b], tmp_path / "cat", method="cat", weights=[1.0, 0.5])
    q = next(m for m in result.modules if m.target == "model.layers.0.self_attn.q_proj.weight")
    assert q.rank == 8 + 2 and q.relative_error == 0
    ours = peft_merged(bases["llama"], tmp_path / "cat")  # PEFT loads the stacked adapter itself
    oracle = models.peft_merged_state_dict(bases["llama"], [a, b], [1.0, 0.5])
    for k, v in ours.items():
        assert_close_fp32(v, oracle[k], k)


def test_cat_matches_peft_add_weighted_adapter(bases, adapters, tmp_path: Path) -> None:
    from peft import PeftModel

    a, b = adapters["all-linear"], adapters["rslora"]
    loratools.stack([a, b], tmp_path / "cat", method="cat", weights=[0.7, 1.3])
    pm = PeftModel.from_pretrained(models.load_base(bases["llama"]), str(a), adapter_name="a")
    pm.load_adapter(str(b), adapter_name="b")
    pm.add_weighted_adapter(["a", "b"], [0.7, 1.3], adapter_name="ab", combination_type="cat")
    pm.set_adapter("ab")
    oracle = {k: v.clone() for k, v in pm.merge_and_unload(adapter_names=["ab"]).state_dict().items()}
    for k, v in peft_merged(bases["llama"], tmp_path / "cat").items():
        assert_close_fp32(v, oracle[k], k)


@pytest.mark.parametrize("rank", [1, 3, 10])
def test_svd_reaches_the_eckart_young_bound(rank: int, adapters, tmp_path: Path) -> None:
    a, b = adapters["all-linear"], adapters["second"]
    result = loratools.stack([a, b], tmp_path / "svd", method="svd", weights=[1.0, -0.5], rank=rank)
    da, db = deltas(a), deltas(b)
    got = deltas(tmp_path / "svd")
    reports = {m.target: m for m in result.modules}
    for target, approx in got.items():
        M = da.get(target, 0) - 0.5 * db.get(target, torch.zeros_like(approx))
        s = torch.linalg.svdvals(M)
        bound = float(torch.sqrt((s[rank:] ** 2).sum()))
        err = float(torch.linalg.matrix_norm(M - approx))
        norm = float(torch.linalg.matrix_norm(M))
        # the factors are stored in float32 like the inputs: that rounding (~1e-7·‖M‖) is the only slack
        assert err == pytest.approx(bound, rel=1e-5, abs=1e-6 * norm), target
        assert reports[target].relative_error == pytest.approx(bound / norm, rel=1e-9, abs=1e-12)
        assert reports[target].rank == min(rank, 8 + (2 if target in db else 0))


def test_linear_is_svd_of_the_weighted_sum(adapters, tmp_path: Path) -> None:
    a, b = adapters["all-linear"], adapters["patterns"]
    loratools.stack([a, b], tmp_path / "lin", method="linear", weights=[0.3, 0.9], rank=4)
    loratools.stack([a, b], tmp_path / "svd", method="svd", weights=[0.3, 0.9], rank=4)
    x, y = deltas(tmp_path / "lin"), deltas(tmp_path / "svd")
    assert all(torch.allclose(x[k], y[k]) for k in x)


@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "dare_linear", "dare_ties"])
def test_ties_dare_match_peft_merge_utils_on_delta(method: str, adapters, tmp_path: Path) -> None:
    from peft.utils import merge_utils

    a, b = adapters["all-linear"], adapters["rslora"]
    weights, density, seed = [1.0, 0.6], 0.4, 7
    loratools.stack([a, b], tmp_path / method, method=method, weights=weights, density=density, seed=seed, rank=64)
    da, db = deltas(a), deltas(b)
    got = deltas(tmp_path / method)
    w = torch.tensor(weights, dtype=torch.float64)
    for target, approx in got.items():
        tasks = [da[target], db.get(target, torch.zeros_like(da[target]))]
        torch.manual_seed((seed + zlib.crc32(target.encode())) % 2**63)  # the module's generator, as documented
        if method == "ties":
            ref = merge_utils.ties(tasks, w, density)
        elif method == "magnitude_prune":
            ref = merge_utils.magnitude_prune(tasks, w, density)
        elif method == "dare_linear":
            ref = merge_utils.dare_linear(tasks, w, density)
        else:
            ref = merge_utils.dare_ties(tasks, w, density)
        assert_close_fp32(approx, ref, target, rtol=1e-6)  # rank 64 = full rank: the factorization is exact


def test_stack_conv_embedding_and_bias_modules(bases, adapters, tmp_path: Path) -> None:
    from peft import PeftModel

    for name, base in (("conv", bases["conv"]), ("embedding", bases["llama"])):
        out = tmp_path / name
        loratools.stack([adapters[name], adapters[name]], out, method="cat", weights=[0.5, 0.5])
        model = models.load_base(base)
        pm = PeftModel.from_pretrained(model, str(out)).merge_and_unload()
        oracle = models.peft_merged_state_dict(base, [adapters[name]])
        for k, v in pm.state_dict().items():
            if k in oracle:
                assert_close_fp32(v, oracle[k], f"{name}: {k}")


def test_stack_refuses_dora_and_bad_arguments(adapters, tmp_path: Path) -> None:
    with pytest.raises(loratools.UnsupportedAdapterError, match="DoRA"):
        loratools.stack([adapters["dora"], adapters["second"]], tmp_path / "x", method="cat")
    with pytest.raises(loratools.InvalidArgumentError, match="density"):
        loratools.stack([adapters["all-linear"]], tmp_path / "x", method="ties")
    with pytest.raises(loratools.InvalidArgumentError, match="exact"):
        loratools.stack([adapters["all-linear"]], tmp_path / "x", method="cat", rank=2)
    assert not (tmp_path / "x").exists()


def test_resize_rank_and_energy(adapters, tmp_path: Path) -> None:
    a = adapters["all-linear"]
    result = loratools.resize(a, tmp_path / "r2", rank=2)
    full, small = deltas(a), deltas(tmp_path / "r2")
    for m in result.modules:
        M = full[m.target]
        s = torch.linalg.svdvals(M)
        assert float(torch.linalg.matrix_norm(M - small[m.target])) == pytest.approx(
            float(torch.sqrt((s[2:] ** 2).sum())), rel=1e-5)
    result = loratools.resize(a, tmp_path / "e", energy=0.9)
    for m in result.modules:
        s2 = torch.linalg.svdvals(full[m.target]) ** 2
        frac = torch.cumsum(s2, 0) / s2.sum()
        assert frac[m.rank - 1] >= 0.9 - 1e-9 and (m.rank == 1 or frac[m.rank - 2] < 0.9)


def test_extract_recovers_a_merged_adapter(bases, adapters, tmp_path: Path) -> None:
    base, adapter = bases["llama"], adapters["all-linear"]
    loratools.merge(base, [adapter], tmp_path / "tuned", device="cpu")
    result = loratools.extract(base, tmp_path / "tuned", tmp_path / "lora", rank=8)
    assert len(result.modules) == 14 and max(m.relative_error for m in result.modules) < 1e-5
    tuned = read_tensors(tmp_path / "tuned")
    for k, v in peft_merged(base, tmp_path / "lora").items():  # PEFT loads the extracted adapter
        if k in tuned:
            assert_close_fp32(v, tuned[k], k, rtol=1e-5)


def test_extract_gpt2_conv1d_norms_and_embeddings(bases, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    base = bases["gpt2"]
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    (tuned / "config.json").write_bytes((base / "config.json").read_bytes())
    sd = read_tensors(base)
    g = torch.Generator().manual_seed(5)
    for k in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"):
        sd[k] = sd[k] + 0.01 * torch.randn(sd[k].shape[0], 2, generator=g) @ torch.randn(2, sd[k].shape[1], generator=g)
    sd["transformer.ln_f.weight"] = sd["transformer.ln_f.weight"] + 0.1
    sd["transformer.wte.weight"] = sd["transformer.wte.weight"] * 1.01
    save_file(sd, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    result = loratools.extract(base, tuned, tmp_path / "lora", rank=2)
    assert result.replacements == ["transformer.ln_f.bias", "transformer.ln_f.weight", "transformer.wte.weight"]
    assert all(m.relative_error < 1e-5 for m in result.modules)
    merged = peft_merged(base, tmp_path / "lora")
    for k, v in sd.items():
        if k in merged:
            assert_close_fp32(merged[k], v, k, rtol=1e-5)
    skipped = loratools.extract(base, tuned, tmp_path / "lora2", rank=2, embeddings="skip", norms="skip")
    assert skipped.replacements == [] and len(skipped.skipped) == 2


def test_randomized_truncation_is_as_good_as_the_exact_one() -> None:
    """extract's fast path (small rank of a large matrix): the error it reports is the error of the
    factors it returns, within 0.1 % of the Eckart–Young optimum of a full SVD."""
    from loratools.ops.algebra import factorize_dense

    g = torch.Generator().manual_seed(0)
    n = 512
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    M = ((U * torch.exp(-torch.arange(n, dtype=torch.float64) / 20)) @ V.T).float()
    fast = factorize_dense(M, rank=16)
    exact = factorize_dense(M, rank=16, randomized=False)
    assert fast.randomized and not exact.randomized
    achieved = float(torch.linalg.norm(M.double() - fast.B.double() @ fast.A.double()) / torch.linalg.norm(M.double()))
    assert abs(achieved - fast.relative_error) <= 1e-4 * achieved
    assert exact.relative_error <= fast.relative_error <= exact.relative_error * 1.001
