"""Raw state dicts in every layout: the modules' own forward pass is the oracle for merge, PEFT
loading the converted adapter onto plain nn.Linear modules is the oracle for convert."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import loratools
from loratools.cli import cli
from tests.helpers import assert_close_fp32
from tests.raw_models import STYLES, Net, PlainNet

SCALE = 1.75


def save_net(net: torch.nn.Module, path: Path) -> Path:
    sd = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


def plain_with(style: str, weights: dict[str, torch.Tensor], square_only: bool = False) -> PlainNet:
    plain = PlainNet(style, square_only)
    plain.load_state_dict(weights)
    return plain.eval()


def x_for(net: Net) -> torch.Tensor:
    return torch.randn(5, net.in_features(), generator=torch.Generator().manual_seed(3))


def run(*args: object) -> tuple[int, str]:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.output + (r.stderr if r.stderr_bytes is not None else "")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("style", sorted(STYLES))
def test_merge_raw_file_into_itself_reproduces_forward(style: str, suffix: str, tmp_path: Path) -> None:
    net = Net(style, scale=SCALE).eval()
    f = save_net(net, tmp_path / f"model{suffix}")
    out = tmp_path / "merged.safetensors"
    code, text = run("merge", f, f, out, "--weight", SCALE, "-q")
    assert code == 0, text
    merged = load_file(str(out))
    assert set(merged) == set(PlainNet(style).state_dict())  # the factors are folded in and left out
    plain = plain_with(style, merged)
    with torch.no_grad():
        x = x_for(net)
        assert_close_fp32(plain(x), net(x), f"{style} forward")


@pytest.mark.parametrize("style", sorted(STYLES))
def test_convert_raw_to_peft_loads_in_peft(style: str, tmp_path: Path) -> None:
    from peft import PeftModel

    net = Net(style, scale=SCALE).eval()
    f = save_net(net, tmp_path / "model.safetensors")
    out = tmp_path / "peft"
    code, text = run("convert", f, out, "--to", "peft", "--scale", SCALE)
    assert code == 0, text
    base_weights = {k: v for k, v in load_file(str(f)).items() if k in PlainNet(style).state_dict()}
    pm = PeftModel.from_pretrained(plain_with(style, base_weights), str(out)).eval()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and not cfg["fan_in_fan_out"]
    with torch.no_grad():
        x = x_for(net)
        assert_close_fp32(pm(x), net(x), f"{style} PEFT forward")


@pytest.mark.parametrize("style", ["out-r-in", "in-r-out", "uv", "b-out-a-in"])
def test_square_only_file_is_refused_without_layout(style: str, tmp_path: Path) -> None:
    net = Net(style, scale=1.0, square_only=True).eval()
    f = save_net(net, tmp_path / "square.safetensors")
    out = tmp_path / "m.safetensors"
    code, text = run("merge", f, f, out)
    assert code == 1 and "Traceback" not in text
    assert "second.weight" in text and "out-r-in" in text and "in-r-out" in text and "linear-ab" in text
    assert not out.exists()
    right = {"out-r-in": "out-r-in", "b-out-a-in": "out-r-in", "in-r-out": "in-r-out", "uv": "in-r-out"}[style]
    code, text = run("merge", f, f, out, "--layout", right, "-q")
    assert code == 0, text
    plain = plain_with(style, load_file(str(out)), square_only=True)
    with torch.no_grad():
        x = x_for(net)
        assert_close_fp32(plain(x), net(x), f"{style} square forward")
    # the wrong declaration gives the transposed ΔW: a different model, which is why we never guess
    wrong = "in-r-out" if right == "out-r-in" else "out-r-in"
    run("merge", f, f, tmp_path / "w.safetensors", "--layout", wrong, "-q")
    plain = plain_with(style, load_file(str(tmp_path / "w.safetensors")), square_only=True)
    with torch.no_grad():
        assert float((plain(x) - net(x)).abs().max()) > 1e-3


def test_linear_ab_checks_the_names(tmp_path: Path) -> None:
    ok = save_net(Net("b-out-a-in", scale=1.0, square_only=True), tmp_path / "ab.safetensors")
    code, text = run("merge", ok, ok, tmp_path / "o.safetensors", "--layout", "linear-ab", "-q")
    assert code == 0, text
    swapped = save_net(Net("out-r-in", scale=1.0, square_only=True), tmp_path / "swapped.safetensors")
    code, text = run("merge", swapped, swapped, tmp_path / "p.safetensors", "--layout", "linear-ab")
    assert code == 1 and "linear-ab" in text and not (tmp_path / "p.safetensors").exists()


def test_square_modules_follow_the_non_square_ones(tmp_path: Path) -> None:
    """No declaration, but the non-square pair of the file fixes the orientation of the square one."""
    for style in ("out-r-in", "in-r-out"):
        net = Net(style, scale=1.0).eval()
        a = loratools.load_adapter(save_net(net, tmp_path / f"{style}.safetensors"))
        assert set(a.modules) == {"first.weight", "second.weight"}
        for m in a.modules.values():
            assert m.transposed is False and m.delta.A.shape[1] == m.shape[1] and m.delta.B.shape[0] == m.shape[0]
        expected = (net.second.lora_a @ net.second.lora_b) if style == "out-r-in" else (
            net.second.lora_A @ net.second.lora_B).T
        assert torch.allclose(loratools.delta(a.modules["second.weight"]), expected.detach(), atol=1e-6)


def test_factor_only_file_against_separate_base(tmp_path: Path) -> None:
    net = Net("in-r-out", scale=1.0).eval()
    sd = {k: v.detach() for k, v in net.state_dict().items()}
    factors = tmp_path / "factors.safetensors"
    base = tmp_path / "base.safetensors"
    save_file({k: v for k, v in sd.items() if "lora" in k}, str(factors))
    save_file({k: v for k, v in sd.items() if "lora" not in k}, str(base))
    unbound = loratools.load_adapter(factors)
    assert all(m.transposed is None for m in unbound.modules.values())
    out = tmp_path / "m.safetensors"
    loratools.merge(base, [factors], out, device="cpu")
    plain = plain_with("in-r-out", load_file(str(out)))
    with torch.no_grad():
        x = x_for(net)
        assert_close_fp32(plain(x), net(x), "separate base forward")


def test_sibling_that_fits_twice_is_refused(tmp_path: Path) -> None:
    net = Net("siblings", scale=1.0, square_only=True)
    sd = {k: v.detach() for k, v in net.state_dict().items()}
    sd["second.v_proj.weight"] = sd["second.q_proj.weight"].clone()
    f = tmp_path / "two.safetensors"
    save_file(sd, str(f))
    code, text = run("merge", f, f, tmp_path / "o.safetensors", "--layout", "out-r-in")
    assert code == 1 and "second.q_proj.weight" in text and "second.v_proj.weight" in text


def test_unpaired_factor_is_reported(tmp_path: Path) -> None:
    f = tmp_path / "odd.safetensors"
    save_file({"l.weight": torch.zeros(4, 4), "l.lora_A": torch.zeros(2, 4)}, str(f))
    code, text = run("info", f)
    assert code == 1 and "l.lora_A" in text and "partner" in text


def test_info_on_raw_and_peft(tmp_path: Path, adapters) -> None:
    f = save_net(Net("uv", scale=1.0), tmp_path / "uv.safetensors")
    code, text = run("info", f, "--json")
    assert code == 0, text
    data = json.loads(text)
    assert data["format"] == "raw" and data["modules"] == 2 and data["ranks"] == [3, 4]
    by_target = {m["target"]: m for m in data["module_list"]}
    net = Net("uv", scale=1.0)
    expected = float(torch.linalg.vector_norm((net.first.U @ net.first.V).detach().double()))
    assert abs(by_target["first.weight"]["delta_norm"] - expected) < 1e-5 * expected
    code, text = run("info", adapters["patterns"], "--json")
    data = json.loads(text)
    assert data["format"] == "peft" and data["ranks"] == [2, 4, 6]
    assert any("nothing_matches" in w for w in data["warnings"])


def test_save_adapter_round_trip_keeps_delta(tmp_path: Path, adapters) -> None:
    a = loratools.load_adapter(adapters["patterns"])
    loratools.save_adapter(a, tmp_path / "again")
    b = loratools.load_adapter(tmp_path / "again")
    for name, m in a.modules.items():
        assert torch.equal(loratools.delta(m, dtype=torch.float64), loratools.delta(b.modules[name], dtype=torch.float64))


def test_info_with_a_base_says_what_binds_and_what_does_not(tmp_path: Path, adapters) -> None:
    from tests import models

    wider = models.save_tiny_llama(tmp_path / "wider", intermediate_size=96, tokenizer=False)
    code, text = run("info", adapters["all-linear"], "--base", wider, "--json")
    assert code == 0, text
    data = json.loads(text)
    assert data["modules"] == 8 and len(data["unbound"]) == 6  # the mlp projections do not fit
    assert all("mlp" in name and "(128, 64)" in why or "(64, 128)" in why for name, why in data["unbound"].items())
    bound = {m["target"] for m in data["module_list"]}
    assert "model.layers.0.self_attn.q_proj.weight" in bound


def test_a_whole_peft_model_state_dict_merges_into_itself(bases, adapters, tmp_path: Path) -> None:
    """model.state_dict() of a PeftModel: base_layer weights beside lora_A.default / lora_B.default."""
    from peft import PeftModel

    from tests import models

    pm = PeftModel.from_pretrained(models.load_base(bases["llama"]), str(adapters["second"]))
    f = save_net(pm, tmp_path / "peft-model.safetensors")
    cfg = json.loads((adapters["second"] / "adapter_config.json").read_text())
    # q_proj and o_proj are square, but lora_A.default.weight / lora_B.default.weight are the weights of
    # nn.Linear submodules: PyTorch's (out, in) convention orients them, no --layout needed
    code, text = run("merge", f, f, tmp_path / "m.safetensors", "--weight", cfg["lora_alpha"] / cfg["r"], "-q")
    assert code == 0, text
    code, text = run("merge", f, f, tmp_path / "m2.safetensors", "--weight", cfg["lora_alpha"] / cfg["r"], "-q",
                     "--layout", "linear-ab")
    assert code == 0, text
    assert load_file(str(tmp_path / "m2.safetensors")).keys() == load_file(str(tmp_path / "m.safetensors")).keys()
    merged = load_file(str(tmp_path / "m.safetensors"))
    assert not any("lora_" in k for k in merged)
    oracle = models.peft_merged_state_dict(bases["llama"], [adapters["second"]])
    for k, v in merged.items():
        plain = k.removeprefix("base_model.model.").replace(".base_layer.", ".")
        assert_close_fp32(v, oracle[plain], plain)


def test_square_nn_linear_named_pairs_are_oriented_by_their_names(tmp_path: Path) -> None:
    """Square modules with factors stored as nn.Linear submodules (lora_A.weight (r, in), lora_B.weight
    (out, r)) need no --layout: the same names on bare parameters (lora_a/lora_b) still do."""
    net = Net("siblings", scale=1.0, square_only=True).eval()
    f = save_net(net, tmp_path / "sq.safetensors")
    out = tmp_path / "m.safetensors"
    code, text = run("merge", f, f, out, "-q")
    assert code == 0, text
    plain = plain_with("siblings", load_file(str(out)), square_only=True)
    with torch.no_grad():
        x = x_for(net)
        assert_close_fp32(plain(x), net(x), "square nn.Linear-named pair")
