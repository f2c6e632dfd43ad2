"""Output forms (single file, folder from a file), atomicity, and the check run before OUT appears."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loratools
from loratools.ops import execute as execute_module
from tests import models
from tests.helpers import assert_close_fp32, read_tensors


def test_single_file_base_to_single_file_and_to_folder(bases, adapters, tmp_path: Path) -> None:
    base = bases["conv"]
    loratools.merge(base, [adapters["conv"]], tmp_path / "one.safetensors", device="cpu")
    loratools.merge(base, [adapters["conv"]], tmp_path / "folder", device="cpu")
    assert (tmp_path / "folder" / base.name).is_file() and len(list((tmp_path / "folder").iterdir())) == 1
    a, b = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "folder" / base.name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_single_model_safetensors_folder_bf16(bases, adapters, tmp_path: Path) -> None:
    base = bases["llama-bf16"]
    loratools.merge(base, [adapters["dora"]], tmp_path / "m", device="cpu")
    # a DoRA merge keeps its row norms, so that it can be taken out again — where no loader looks:
    # the root holds exactly the base's files
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted([p.name for p in base.iterdir()] + [".loratools"])
    assert [p.name for p in (tmp_path / "m" / ".loratools").iterdir()] == ["undo.safetensors"]
    oracle = models.peft_merged_state_dict(base, [adapters["dora"]], dtype=torch.float32)
    for k, v in read_tensors(tmp_path / "m").items():
        assert v.dtype == torch.bfloat16
        # PEFT on an fp32 copy of the bf16 base, then one rounding: at most one bf16 ulp apart
        assert_close_fp32(v.float(), oracle[k], k, rtol=2**-7)


def test_folder_base_refuses_single_file_out(bases, adapters, tmp_path: Path) -> None:
    with pytest.raises(loratools.InvalidArgumentError, match="folder"):
        loratools.merge(bases["llama"], [adapters["all-linear"]], tmp_path / "x.safetensors")


def test_a_wrong_value_fails_verification_and_nothing_appears(bases, adapters, tmp_path: Path, monkeypatch) -> None:
    real = execute_module.compute_tensor

    def tampered(plan, t, **kw):  # noqa: ANN001
        value = real(plan, t, **kw)
        if t.name == "model.layers.1.mlp.up_proj.weight":
            value = value.clone()
            value[3, 7] += 1e-3 * (value[3, 7].abs() + 1)
        return value

    monkeypatch.setattr(execute_module, "compute_tensor", tampered)
    out = tmp_path / "out"
    with pytest.raises(loratools.VerificationError, match="model.layers.1.mlp.up_proj.weight"):
        loratools.merge(bases["llama"], [adapters["all-linear"]], out, device="cpu")
    assert list(tmp_path.iterdir()) == []
    # the same tampering with --no-verify is written: the check is what stopped it
    loratools.merge(bases["llama"], [adapters["all-linear"]], out, device="cpu", verify=False)
    assert out.exists()


def test_a_changed_copy_fails_verification(bases, adapters, tmp_path: Path, monkeypatch) -> None:
    from loratools.checkpoint import safetensors_io

    real = safetensors_io.StreamWriter.copy_range

    def flip(self, name, info):  # noqa: ANN001
        real(self, name, info)
        if name == "model.norm.weight":
            self._f.seek(-1, 1)
            self._f.write(b"\x01")

    monkeypatch.setattr(safetensors_io.StreamWriter, "copy_range", flip)
    with pytest.raises(loratools.VerificationError, match="model.norm.weight"):
        loratools.merge(bases["llama"], [adapters["all-linear"]], tmp_path / "o", device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_failure_midway_leaves_existing_out_untouched(bases, adapters, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    shutil.copytree(bases["llama"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*a, **k):  # noqa: ANN002, ANN003
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(execute_module, "compute_tensor", boom)
    with pytest.raises(OSError):
        loratools.merge(bases["llama"], [adapters["all-linear"]], out, device="cpu", overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_pytorch_bin_base_is_read_weights_only(bases, adapters, tmp_path: Path) -> None:
    base = tmp_path / "binbase"
    base.mkdir()
    shutil.copy(bases["llama"] / "config.json", base)
    torch.save(read_tensors(bases["llama"]), base / "pytorch_model.bin")
    loratools.merge(base, [adapters["all-linear"]], tmp_path / "a", device="cpu")
    loratools.merge(bases["llama"], [adapters["all-linear"]], tmp_path / "b", device="cpu")
    assert (tmp_path / "a" / "model.safetensors").exists() and (tmp_path / "a" / "config.json").exists()
    a, b = read_tensors(tmp_path / "a"), read_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_provenance_names_every_adapter(bases, adapters, tmp_path: Path) -> None:
    from tests.helpers import file_metadata

    loratools.merge(bases["llama"], [adapters["all-linear"], adapters["second"]], tmp_path / "m", weights=[1, 0.25],
                    device="cpu")
    for shard in (tmp_path / "m").glob("*.safetensors"):
        record = json.loads(file_metadata(shard)["loratools"])
        assert [a["weight"] for a in record["adapters"]] == [1.0, 0.25]
        assert record["adapters"][0]["sha256"] != record["adapters"][1]["sha256"]
        assert file_metadata(shard)["format"] == "pt"
