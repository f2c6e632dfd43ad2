"""Output forms (single file, folder from a file), atomicity, and the check run before OUT appears."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loratools
from loratools import verify
from loratools.ops import execute as execute_module
from loratools.ops import kernels
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


TARGET = "model.layers.1.mlp.up_proj.weight"


def _tamper_kernel(monkeypatch, rows=None) -> None:  # noqa: ANN001
    """Make the merge kernel wrong on TARGET: column 7 of ``rows`` (all rows when None) is off."""
    real_emit, real_block = execute_module.emit_tensor, kernels.apply_block
    current: dict[str, str] = {}

    def emit(plan, t, writer, **kw):  # noqa: ANN001, ANN003
        current["name"] = t.name
        return real_emit(plan, t, writer, **kw)

    def block(S, W, terms, i, j):  # noqa: ANN001
        real_block(S, W, terms, i, j)
        if current.get("name") == TARGET:
            for r in range(i, j):
                if rows is None or r in rows:
                    S[r - i, 7] += 1e-3 * (S[r - i, 7].abs() + 1)

    monkeypatch.setattr(execute_module, "emit_tensor", emit)
    monkeypatch.setattr(kernels, "apply_block", block)


def test_a_wrong_kernel_fails_verification_and_nothing_appears(bases, adapters, tmp_path: Path, monkeypatch) -> None:
    _tamper_kernel(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(loratools.VerificationError, match=TARGET):
        loratools.merge(bases["llama"], [adapters["all-linear"]], out, device="cpu")
    assert list(tmp_path.iterdir()) == []
    # the same tampering with --no-verify is written: the check is what stopped it
    loratools.merge(bases["llama"], [adapters["all-linear"]], out, device="cpu", verify=False)
    assert out.exists()


def test_the_row_sample_is_what_it_says_and_full_sees_every_element(bases, adapters, tmp_path: Path,
                                                                     monkeypatch) -> None:
    """One wrong row the seeded sample does not draw passes the default check (its guarantee is
    stated as a probability); --verify-full finds it."""
    rows = read_tensors(bases["llama"])[TARGET].shape[0]
    drawn = set(verify.sample_rows(TARGET, rows, verify.SAMPLE_ROWS, 0).tolist())
    assert len(drawn) == verify.SAMPLE_ROWS < rows
    missed = min(set(range(rows)) - drawn)
    _tamper_kernel(monkeypatch, rows={missed})
    result = loratools.merge(bases["llama"], [adapters["all-linear"]], tmp_path / "a", device="cpu")
    assert result.verify.ok and result.verify.level == "sample"
    with pytest.raises(loratools.VerificationError, match=TARGET):
        loratools.merge(bases["llama"], [adapters["all-linear"]], tmp_path / "b", device="cpu", verify="full")
    _tamper_kernel(monkeypatch, rows={min(drawn)})
    with pytest.raises(loratools.VerificationError, match=TARGET):
        loratools.merge(bases["llama"], [adapters["all-linear"]], tmp_path / "c", device="cpu")


def test_bytes_changed_after_they_were_computed_fail_verification(bases, adapters, tmp_path: Path,
                                                                  monkeypatch) -> None:
    from loratools.checkpoint import stream

    real = stream._pwrite_all

    def flip(fd, data, offset):  # noqa: ANN001
        data = bytearray(data)
        data[-1] ^= 0x01  # what reaches the file is not what was computed
        real(fd, memoryview(data), offset)

    monkeypatch.setattr(stream, "_pwrite_all", flip)
    with pytest.raises(loratools.VerificationError, match="bytes read back differ from those computed: model"):
        loratools.merge(bases["llama"], [adapters["all-linear"]], tmp_path / "o", device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_a_changed_copy_fails_verification(bases, adapters, tmp_path: Path, monkeypatch) -> None:
    import os

    from loratools.checkpoint import stream

    real = stream._copy_range
    src = read_tensors(bases["llama"])

    def flip(path, begin, fd, offset, length):  # noqa: ANN001
        real(path, begin, fd, offset, length)
        if length == src["model.norm.weight"].numel() * src["model.norm.weight"].element_size():
            with open(path, "rb") as f:  # the output is open write-only: flip the source's last byte
                f.seek(begin + length - 1)
                os.pwrite(fd, bytes([f.read(1)[0] ^ 0x01]), offset + length - 1)

    monkeypatch.setattr(stream, "_copy_range", flip)
    with pytest.raises(loratools.VerificationError, match="model.norm.weight"):
        loratools.merge(bases["llama"], [adapters["all-linear"]], tmp_path / "o", device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_failure_midway_leaves_existing_out_untouched(bases, adapters, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    shutil.copytree(bases["llama"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    from loratools.checkpoint import stream

    def boom(*a, **k):  # noqa: ANN002, ANN003
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stream, "_pwrite_all", boom)  # the disk fills up under the writer thread
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
