"""Never destroys a user's files: a forgotten OUT, --overwrite onto what is not loratools' own,
symlinked OUT, interrupted runs (SIGTERM, SIGKILL) and what they leave behind, absurd weights."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import loratools
from loratools.checkpoint.writer import clean_stale

from .test_cli_errors import run


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_forgotten_out_never_replaces_an_adapter(bases, adapters, tmp_path: Path) -> None:
    a2 = Path(shutil.copytree(adapters["second"], tmp_path / "a2"))
    before = tree_digest(a2)
    for extra in ([], ["--overwrite"]):
        code, text = run("merge", bases["llama"], adapters["all-linear"], a2, *extra)
        assert code == 1 and "is an adapter" in text and "NEW_OUT" in text, text
        assert "--overwrite" not in text.split("\n", 1)[0]
        assert tree_digest(a2) == before
    # stack: an adapter that loratools did not write is kept even with --overwrite
    code, text = run("stack", adapters["all-linear"], a2, "--method", "cat", "--overwrite")
    assert code == 1 and "did not write" in text and "NEW_OUT" in text, text
    assert tree_digest(a2) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a2"]


def test_overwrite_replaces_loratools_own_adapter_output(adapters, tmp_path: Path) -> None:
    out = tmp_path / "stacked"
    code, text = run("stack", adapters["all-linear"], adapters["second"], out, "--method", "cat")
    assert code == 0, text
    code, text = run("stack", adapters["all-linear"], adapters["second"], out, "--method", "cat")
    assert code == 1 and "--overwrite" in text
    code, text = run("stack", adapters["all-linear"], adapters["second"], out, "--method", "cat", "--overwrite")
    assert code == 0, text
    from loratools.ops.undo import read_file_record

    record = read_file_record(out)
    assert record["operation"] == "stack --method cat"
    names = [i["path"] for i in record["inputs"]]
    assert names == ["all-linear", "second"]  # names, never local absolute paths


def test_overwrite_keeps_a_folder_with_the_users_files(bases, adapters, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "code").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "code" / "train.py").write_text("print(1)")
    before = tree_digest(out)
    code, text = run("merge", bases["llama"], adapters["all-linear"], out, "--overwrite")
    assert code == 1 and "notes.txt" in text and "code/" in text, text
    assert tree_digest(out) == before


def test_overwrite_replaces_a_previous_merge(bases, adapters, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run("merge", bases["llama"], adapters["all-linear"], out, "-q")[0] == 0
    code, text = run("merge", bases["llama"], adapters["second"], out, "--overwrite", "-q")
    assert code == 0, text


def test_symlinked_out_is_refused(bases, adapters, tmp_path: Path) -> None:
    target = tmp_path / "real"
    assert run("merge", bases["llama"], adapters["all-linear"], target, "-q")[0] == 0
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    before = tree_digest(target)
    code, text = run("merge", bases["llama"], adapters["second"], link, "--overwrite")
    assert code == 1 and "symbolic link" in text, text
    assert tree_digest(target) == before and link.is_symlink()


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_non_finite_weights_are_refused(bases, adapters, tmp_path: Path, bad: str) -> None:
    out = tmp_path / "out"
    code, text = run("merge", bases["llama"], adapters["all-linear"], out, "--weight", bad)
    assert code == 1 and "finite" in text and not out.exists()
    with pytest.raises(loratools.InvalidArgumentError):
        loratools.merge(bases["llama"], [adapters["all-linear"]], out, weights=[float(bad)])


def test_a_weight_that_swamps_the_base_is_warned_about(bases, adapters, tmp_path: Path) -> None:
    result = loratools.merge(bases["llama"], [adapters["all-linear"]], tmp_path / "o", weights=[1e4], device="cpu")
    assert any("swamp" in w for w in result.warnings), result.warnings
    result = loratools.merge(bases["llama"], [adapters["all-linear"]], tmp_path / "p", device="cpu")
    assert not any("swamp" in w for w in result.warnings)


def test_stale_temporaries_are_cleaned_and_reported(bases, adapters, tmp_path: Path) -> None:
    out = tmp_path / "out"
    dead = tmp_path / ".out.loratools-tmp-deadbeef"
    dead.mkdir()
    (dead / "model-00001-of-00002.safetensors").write_bytes(b"x" * 100)
    live = tmp_path / ".out.loratools-tmp-live0000"
    live.mkdir()
    (live / ".loratools-owner").write_text(f"{os.uname().nodename} {os.getpid()}\n")
    result = loratools.merge(bases["llama"], [adapters["all-linear"]], out, device="cpu")
    assert any(".out.loratools-tmp-deadbeef" in w for w in result.warnings)
    assert not dead.exists() and live.exists()  # a running process's temporary is not touched


def test_a_swap_cut_short_is_rolled_back(tmp_path: Path) -> None:
    """Killed between 'old OUT moved aside' and 'new OUT moved in': the next run puts it back."""
    out = tmp_path / "out"
    old = tmp_path / ".out.loratools-old-12345678"
    old.mkdir()
    (old / "config.json").write_text("{}")
    notes = clean_stale(out)
    assert (out / "config.json").exists() and not old.exists() and "put back" in notes[0]
    # the swap finished but the old copy was not deleted yet: it goes
    old.mkdir()
    (old / "partial.safetensors").write_bytes(b"")
    notes = clean_stale(out)
    assert not old.exists() and (out / "config.json").exists() and "removed" in notes[0]


SCRIPT = """
import sys, time, loratools
# a progress callback that takes its time: the merge is still writing when the signal comes
loratools.merge(sys.argv[1], [sys.argv[2]], sys.argv[3], device="cpu", overwrite=True,
                progress=lambda done, total, name: time.sleep(0.05))
"""


def _slow_merge(tmp_path: Path, bases, adapters, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(bases["llama"]), str(adapters["all-linear"]), str(out)],
                            stderr=subprocess.PIPE)


def _wait_for_tmp(tmp_path: Path, proc: subprocess.Popen) -> None:
    for _ in range(600):
        if any(p.name.startswith(".out.loratools-tmp-") for p in tmp_path.iterdir()):
            return
        if proc.poll() is not None:
            pytest.fail(f"merge ended before it could be interrupted: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.01)
    pytest.fail("no temporary folder appeared")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_leave_nothing_behind(bases, adapters, tmp_path: Path, sig: int) -> None:
    out = tmp_path / "out"
    assert run("merge", bases["llama"], adapters["second"], out, "-q")[0] == 0
    before = tree_digest(out)
    proc = _slow_merge(tmp_path, bases, adapters, out)
    _wait_for_tmp(tmp_path, proc)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert tree_digest(out) == before


def test_sigkill_leftovers_are_cleaned_by_the_next_run(bases, adapters, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run("merge", bases["llama"], adapters["second"], out, "-q")[0] == 0
    before = tree_digest(out)
    proc = _slow_merge(tmp_path, bases, adapters, out)
    _wait_for_tmp(tmp_path, proc)
    proc.kill()
    proc.wait(timeout=60)
    assert tree_digest(out) == before  # the old OUT is never damaged
    assert any(p.name.startswith(".out.loratools-tmp-") for p in tmp_path.iterdir())
    code, text = run("merge", bases["llama"], adapters["all-linear"], out, "--overwrite", "-q")
    assert code == 0 and "interrupted run" in text, text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_cast_that_overflows_is_refused(bases, adapters, tmp_path: Path) -> None:
    """--dtype fp16 on a bf16 base: an untouched value of 1e5 would become +Inf; nothing is written."""
    from safetensors.torch import load_file, save_file

    base = Path(shutil.copytree(bases["llama-bf16"], tmp_path / "base"))
    f = next(base.glob("*.safetensors"))
    sd = load_file(f)
    sd["model.norm.weight"][0] = 1e5
    save_file({k: v.contiguous() for k, v in sd.items()}, f, metadata={"format": "pt"})
    out = tmp_path / "out"
    code, text = run("merge", base, adapters["all-linear"], out, "--dtype", "fp16")
    assert code == 1 and "model.norm.weight" in text and "overflows" in text, text
    assert not out.exists()
