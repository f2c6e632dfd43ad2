"""Bad input: a clear message, exit code 1, no traceback, nothing written — through the real CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from loratools.cli import cli
from tests import models


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # an uncaught exception would be a traceback for the user
    return result.exit_code, text


def assert_refused(tmp_path: Path, out: Path, *args: str, says: str) -> str:
    before = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []
    code, text = run(*args)
    assert code == 1, text
    assert text.startswith("Error: "), text
    assert "Traceback" not in text
    assert says.lower() in text.lower(), text
    assert not out.exists() or out.name in before
    after = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []
    assert after == before, f"left behind: {set(after) - set(before)}"
    return text


@pytest.fixture()
def base_copy(bases, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bases["llama"], tmp_path / "base"))


@pytest.fixture()
def adapter_copy(adapters, tmp_path: Path) -> Path:
    return Path(shutil.copytree(adapters["all-linear"], tmp_path / "adapter"))


def test_missing_base(adapters, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_refused(tmp_path, out, "merge", tmp_path / "nope", adapters["all-linear"], out, says="not found")


def test_missing_adapter(bases, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_refused(tmp_path, out, "merge", bases["llama"], tmp_path / "nope", out, says="not found")


def test_truncated_shard(base_copy: Path, adapters, tmp_path: Path) -> None:
    shard = sorted(base_copy.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    out = tmp_path / "out"
    text = assert_refused(tmp_path, out, "merge", base_copy, adapters["all-linear"], out, says="truncated")
    assert shard.name in text


@pytest.mark.parametrize("garbage", [b"", b"\x05", b"\xff" * 8 + b"{}", (10).to_bytes(8, "little") + b"not json!!"])
def test_corrupt_header(base_copy: Path, adapters, tmp_path: Path, garbage: bytes) -> None:
    shard = sorted(base_copy.glob("*.safetensors"))[0]
    shard.write_bytes(garbage)
    out = tmp_path / "out"
    assert_refused(tmp_path, out, "merge", base_copy, adapters["all-linear"], out, says="not a valid safetensors")


def test_shapes_that_do_not_fit_name_module_and_shapes(adapters, tmp_path: Path) -> None:
    other = models.save_tiny_llama(tmp_path / "wider", intermediate_size=96, tokenizer=False)
    out = tmp_path / "out"
    text = assert_refused(tmp_path, out, "merge", other, adapters["all-linear"], out, says="does not fit")
    assert "mlp.down_proj" in text and "(64, 96)" in text and "(64, 128)" in text


def test_module_with_no_tensor_in_base(bases, adapters, tmp_path: Path) -> None:
    out = tmp_path / "out"
    text = assert_refused(tmp_path, out, "merge", bases["llama"], adapters["lora-bias"], out, says="no tensor in the base")
    assert "transformer.h.0.attn.c_attn.weight" in text


def test_out_equal_to_base(base_copy: Path, adapters, tmp_path: Path) -> None:
    before = {p.name: p.read_bytes() for p in base_copy.iterdir()}
    code, text = run("merge", base_copy, adapters["all-linear"], base_copy, "--overwrite")
    assert code == 1 and "inputs are never modified" in text and "Traceback" not in text
    assert {p.name: p.read_bytes() for p in base_copy.iterdir()} == before


def test_out_exists_needs_overwrite(bases, adapters, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_refused(tmp_path, out, "merge", bases["llama"], adapters["all-linear"], out, says="--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only what loratools could have written: the user's keep.txt stops it
    code, text = run("merge", bases["llama"], adapters["all-linear"], out, "--overwrite", "-q")
    assert code == 1 and "keep.txt" in text and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    code, text = run("merge", bases["llama"], adapters["all-linear"], out, "--overwrite", "-q")
    assert code == 0, text
    assert (out / "model.safetensors.index.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_adapter(bases, adapter_copy: Path, tmp_path: Path, bad: float) -> None:
    f = adapter_copy / "adapter_model.safetensors"
    sd = load_file(str(f))
    key = sorted(sd)[3]
    sd[key][0, 0] = bad
    save_file(sd, str(f))
    out = tmp_path / "out"
    text = assert_refused(tmp_path, out, "merge", bases["llama"], adapter_copy, out, says="NaN")
    assert key in text


def test_overflow_in_result_is_refused(bases, adapter_copy: Path, tmp_path: Path) -> None:
    f = adapter_copy / "adapter_model.safetensors"
    sd = load_file(str(f))
    key = next(k for k in sorted(sd) if "lora_B" in k)
    sd[key] *= 1e20  # each factor finite in fp32, their product is not
    sd[key.replace("lora_B", "lora_A")] *= 1e20
    save_file(sd, str(f))
    out = tmp_path / "out"
    assert_refused(tmp_path, out, "merge", bases["llama-bf16"], adapter_copy, out, says="would write NaN or Inf")


class _Evil:
    def __reduce__(self):  # noqa: D105
        return (Path.touch, (Path(_Evil.marker),))


def test_pickled_adapter_never_runs_code(bases, adapters, tmp_path: Path) -> None:
    adapter = tmp_path / "evil"
    adapter.mkdir()
    shutil.copy(adapters["all-linear"] / "adapter_config.json", adapter)
    marker = tmp_path / "pwned"
    _Evil.marker = str(marker)
    torch.save({"x": _Evil()}, adapter / "adapter_model.bin")
    out = tmp_path / "out"
    assert_refused(tmp_path, out, "merge", bases["llama"], adapter, out, says="weights-only")
    assert not marker.exists()


def test_legacy_bin_adapter_is_read_weights_only(bases, adapters, tmp_path: Path) -> None:
    adapter = tmp_path / "legacy"
    adapter.mkdir()
    shutil.copy(adapters["all-linear"] / "adapter_config.json", adapter)
    torch.save(load_file(str(adapters["all-linear"] / "adapter_model.safetensors")), adapter / "adapter_model.bin")
    code, text = run("merge", bases["llama"], adapter, tmp_path / "a", "-q")
    assert code == 0, text
    code, text = run("merge", bases["llama"], adapters["all-linear"], tmp_path / "b", "-q")
    for name in (tmp_path / "a").glob("*.safetensors"):
        assert load_file(str(name)).keys() == load_file(str(tmp_path / "b" / name.name)).keys()
        for k, v in load_file(str(name)).items():
            assert torch.equal(v, load_file(str(tmp_path / "b" / name.name))[k])


@pytest.mark.parametrize(
    "change, says",
    [
        ({"init_lora_weights": "pissa"}, "PiSSA"),
        ({"init_lora_weights": "olora"}, "OLoRA"),
        ({"init_lora_weights": "corda"}, "CorDA"),
        ({"init_lora_weights": "loftq"}, "LoftQ"),
        ({"alora_invocation_tokens": [1, 2]}, "aLoRA"),
        ({"layer_replication": [[0, 2]]}, "layer_replication"),
        ({"peft_type": "LOHA"}, "LOHA"),
    ],
)
def test_adapters_that_are_not_a_plain_delta_are_refused(bases, adapter_copy: Path, tmp_path: Path, change, says):
    cfg_path = adapter_copy / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **change}))
    out = tmp_path / "out"
    assert_refused(tmp_path, out, "merge", bases["llama"], adapter_copy, out, says=says)


def test_wrong_number_of_weights_is_an_error(bases, adapters, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_refused(tmp_path, out, "merge", bases["llama"], adapters["all-linear"], out, "--weight", "1", "--weight",
                   "2", says="--weight")


def test_usage_error_exits_2(bases) -> None:
    code, text = run("merge", bases["llama"])
    assert code == 2


def test_dora_with_a_weight_is_refused(bases, adapters, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_refused(tmp_path, out, "merge", bases["llama"], adapters["dora"], out, "--weight", "0.5", says="DoRA")


def test_console_script_and_module_entry_points(bases, adapters, tmp_path: Path) -> None:
    for i, cmd in enumerate([[sys.executable, "-m", "loratools"], [str(Path(sys.executable).parent / "loratools")]]):
        out = tmp_path / f"o{i}"
        proc = subprocess.run(cmd + ["merge", str(bases["llama"]), str(adapters["all-linear"]), str(out)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "verify OK" in proc.stdout
        proc = subprocess.run(cmd + ["merge", str(bases["llama"]), str(adapters["all-linear"]), str(out)],
                              capture_output=True, text=True)
        assert proc.returncode == 1 and proc.stderr.startswith("Error:") and "Traceback" not in proc.stderr


def test_hostile_tensor_names_are_escaped_in_messages(bases, tmp_path: Path) -> None:
    f = tmp_path / "evil.safetensors"
    save_file({"x.\x1b[31mred\x1b[0m.lora_A": torch.zeros(2, 4)}, str(f))
    code, text = run("info", f)
    assert code == 1 and "\x1b" not in text and "\\x1b" in text
