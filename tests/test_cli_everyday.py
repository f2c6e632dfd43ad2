"""The everyday CLI: local paths are local, an unreachable Hub fails at once, every command has
-q and --json, usage lines name OUT, `| head` ends quietly, OS errors and bugs end in one message,
info of a merged model shows what is merged, --dtype reaches config.json."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import loratools
from loratools.cli import cli, describe_os_error

from .test_cli_errors import run

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "adapters" / "tiny-llama-lora"


def test_a_local_typo_is_not_a_hub_id(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapters").mkdir()
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # any network use would fail slowly or loudly
    code, text = run("info", "adapters/my-lora")
    assert code == 1 and "not found" in text.lower() and "Hub" not in text, text  # no request was made


def test_an_unreachable_hub_fails_at_once(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="0")
    proc = subprocess.run([sys.executable, "-m", "loratools", "info", "someorg/somelora"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 1 and "cannot be reached" in proc.stderr and "HF_HUB_OFFLINE=1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "Retrying" not in proc.stderr  # the reachability check answered before the client's retries


@pytest.mark.parametrize("command", ["info", "convert", "merge", "unmerge", "swap", "stack", "resize", "extract",
                                     "verify", "push"])
def test_every_command_has_quiet_and_json(command: str) -> None:
    text = CliRunner().invoke(cli, [command, "--help"]).output
    assert "--quiet" in text and "--json" in text


@pytest.mark.parametrize("command,usage", [("merge", "BASE ADAPTER... OUT"), ("unmerge", "MERGED ADAPTER... OUT"),
                                           ("stack", "ADAPTER... OUT"), ("verify", "BASE ADAPTER... MERGED")])
def test_usage_lines_name_out(command: str, usage: str) -> None:
    assert usage in CliRunner().invoke(cli, [command, "--help"]).output.splitlines()[0]


def test_closed_pipe_ends_quietly() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "loratools", "info", str(FIXTURE), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert err == "" and proc.returncode in (0, 141)


def test_os_errors_say_what_where_and_what_to_do() -> None:
    text = describe_os_error(OSError(errno.ENOSPC, "No space left on device", "/data/out/model.safetensors"))
    assert "No space left on device" in text and "/data/out/model.safetensors" in text
    assert "Nothing was written" in text and "disk is full" in text.lower()
    text = describe_os_error(FileExistsError(errno.EEXIST, "File exists", "afile"))
    assert "afile" in text and "another OUT" in text


def test_a_bug_is_one_message_not_a_traceback(monkeypatch) -> None:
    import loratools.summary

    def boom(*a, **k):  # noqa: ANN002, ANN003
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(loratools.summary, "summarize_fast", boom)
    code, text = run("info", FIXTURE)
    assert code == 1 and text.startswith("Error: internal error: ZeroDivisionError") and "--debug" in text


def test_info_of_a_merged_model_shows_what_is_merged(bases, adapters, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    loratools.merge(bases["llama"], [adapters["all-linear"], adapters["second"]], out, weights=[1.0, 0.5],
                    device="cpu")
    code, text = run("info", out)
    assert code == 0 and "a model, not an adapter" in text and "all-linear" in text and "weight 0.5" in text, text
    code, text = run("info", out, "--json")
    data = json.loads(text)
    assert data["format"] == "model" and [a["path"] for a in data["merged"]["adapters"]] == ["all-linear", "second"]
    code, text = run("info", bases["llama"])
    assert code == 0 and "no loratools record" in text


def test_dtype_reaches_config_and_adapter_outputs(bases, adapters, tmp_path: Path) -> None:
    out = tmp_path / "m"
    assert run("merge", bases["llama"], adapters["all-linear"], out, "--dtype", "bf16", "-q")[0] == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")  # transformers reads what was written
    assert next(model.parameters()).dtype.__repr__() == "torch.bfloat16"
    stacked = tmp_path / "s"
    assert run("stack", adapters["all-linear"], adapters["second"], stacked, "--method", "cat", "--dtype", "bf16",
               "-q")[0] == 0
    a = loratools.load_adapter(stacked)
    assert {str(m.delta.dtype) for m in a.modules.values()} == {"torch.bfloat16"}


def test_quiet_and_json_outputs(adapters, tmp_path: Path) -> None:
    code, text = run("convert", adapters["all-linear"], tmp_path / "k", "--to", "kohya", "--json")
    assert code == 0 and json.loads(text)["format"] == "kohya"
    code, text = run("convert", adapters["all-linear"], tmp_path / "k2", "--to", "kohya", "-q")
    assert code == 0 and text == ""
    code, text = run("info", adapters["all-linear"], "-q")
    assert code == 0 and len(text.strip().splitlines()) == 1


def test_verify_levels_on_the_command_line(bases, adapters, tmp_path: Path) -> None:
    """The default check says what it checked and how likely it is to miss; --verify-full checks
    every element; the two contradicting flags are a usage error."""
    code, out = run("merge", bases["llama"], adapters["all-linear"], tmp_path / "a")
    assert code == 0, out
    assert "seeded random rows" in out and "probability" in out and "read back, byte for byte" in out
    code, out = run("merge", bases["llama"], adapters["all-linear"], tmp_path / "b", "--json")
    report = json.loads(out)["verify"]
    assert report["ok"] and report["level"] == "sample" and report["rows_per_tensor"] == 32
    assert report["bytes_read_back"] == sum(p.stat().st_size - _data_start(p)
                                            for p in (tmp_path / "b").glob("*.safetensors"))
    assert 0 < report["miss_probability_10pct_rows_wrong"] < 0.05
    changed = [t for t in report["tensors"] if t["kind"] == "changed"]
    assert changed and all(t["rows_checked"] and t["bound_ratio"] <= 1 for t in changed)
    code, out = run("merge", bases["llama"], adapters["all-linear"], tmp_path / "c", "--verify-full", "--json")
    report = json.loads(out)["verify"]
    assert report["ok"] and report["level"] == "full" and report["rows_per_tensor"] is None
    assert all(t["rows_checked"] is None for t in report["tensors"])
    code, out = run("merge", bases["llama"], adapters["all-linear"], tmp_path / "d", "--verify-full", "--no-verify")
    assert code == 2 and "contradict" in out and not (tmp_path / "d").exists()


def _data_start(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")
