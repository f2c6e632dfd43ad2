"""Hostile and broken inputs (issue 14): every one ends in a LoraToolsError that names the file, in
bounded time and memory — never a traceback, a hang, or an allocation the file's bytes do not justify.

* the regression corpus (``tests/fuzz_corpus``, written by ``benchmarks/fuzz_campaign.py
  --write-corpus``): one small input per kind of failure the campaign and the issue found, laid
  over a valid seed and driven through the operation that failed;
* inputs too large to keep as files (100,000-character names, headers of a million tensors, links
  out of the base, a regex that backtracks for ever), made here;
* a short seeded slice of the campaign itself, in a worker whose address space is limited.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import loratools
from loratools import errors
from loratools.cli import cli

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
CASES = json.loads((CORPUS / "cases.json").read_text())


def _campaign():
    spec = importlib.util.spec_from_file_location("fuzz_campaign", ROOT / "benchmarks" / "fuzz_campaign.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_campaign"] = module
    spec.loader.exec_module(module)
    return module


fc = _campaign()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("fuzz")
    fc.prepare(root)
    specs = {k: fc.Seed(**v) for k, v in json.loads((root / "seeds" / "seeds.json").read_text()).items()}
    return root / "seeds", specs


def _case(seeds_root: Path, spec, folder: Path, files: dict[str, Path] | None = None):
    inside = folder / spec.name
    shutil.copytree(seeds_root / spec.name, inside)
    for rel, src in (files or {}).items():
        shutil.copy2(src, inside / rel)
    target = inside / spec.entry if spec.entry else inside
    return fc.Case(0, spec, folder, target, [], "corpus")


def _refused(run, expect: str, *, names: str) -> str:
    """Run ``run``; it must raise ``expect`` (a LoraToolsError) whose message names ``names``."""
    with pytest.raises(errors.LoraToolsError) as caught:
        run()
    e = caught.value
    assert type(e).__name__ == expect or isinstance(e, getattr(errors, expect)), f"{type(e).__name__}: {e}"
    text = str(e)
    assert names in text, text
    assert len(text) <= fc.MAX_MESSAGE, f"{len(text)} characters"
    return text


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_corpus_input_ends_in_one_named_error(seeds, case: dict, tmp_path: Path) -> None:
    seeds_root, specs = seeds
    folder = tmp_path / f"corpus-{case['name']}"
    c = _case(seeds_root, specs[case["seed"]], folder, {f: CORPUS / case["name"] / f for f in case["files"]})
    op = fc.ops_for(c, seeds_root)[case["op"]]
    if case["op"] == "info":
        result = op(folder / "out")
        assert result.exit_code == 1, result.output
        assert result.output.startswith("Error: "), result.output  # nothing before it: no warning, no traceback
        assert "Traceback" not in result.output and "internal error" not in result.output
        assert folder.name in result.output and case["says"].lower() in result.output.lower(), result.output
        return
    text = _refused(lambda: op(folder / "out"), case["expect"], names=folder.name)
    assert case["says"].lower() in text.lower(), text
    assert not (folder / "out").exists()


# --- inputs made here ------------------------------------------------------------------------------------------


def test_a_name_of_100000_characters_is_cut_in_messages(tmp_path: Path) -> None:
    f = tmp_path / "long-name.safetensors"
    save_file({"x" * 100_000 + ".lora_A": torch.zeros(2, 4)}, str(f))
    text = _refused(lambda: loratools.load_adapter(f), "AdapterFormatError", names=str(f))
    assert "x" * 200 + "…" in text and "x" * 201 not in text


def test_a_header_of_more_tensors_than_any_file_holds_is_refused_at_once(tmp_path: Path) -> None:
    from loratools.checkpoint import safetensors_io

    n = safetensors_io.MAX_TENSORS + 10
    entry = '{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    raw = ("{" + ",".join(f'"e.{i}":{entry}' for i in range(n)) + "}").encode()
    f = tmp_path / "many.safetensors"
    f.write_bytes(struct.pack("<Q", len(raw)) + raw)
    text = _refused(lambda: loratools.load_adapter(f), "CorruptFileError", names=str(f))
    assert "more than" in text  # the count is taken from the raw bytes, before any parsing


def test_catastrophic_backtracking_within_the_static_rules_stops_on_the_time_budget(
        seeds, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pattern the static rules let through (four unbounded repeats) on a long module name: the
    main-thread timer stops it and the adapter is refused."""
    from loratools.formats import patterns

    seeds_root, specs = seeds
    folder = tmp_path / "slow"
    shutil.copytree(seeds_root / "peft", folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {".*.*.*.*Z": 2}
    cfg["target_modules"] = None
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    sd = load_file(str(folder / "adapter_model.safetensors"))
    sd = {k.replace("model.layers.0", "model." + "a" * 3000 + ".0"): v for k, v in sd.items()}
    save_file(sd, str(folder / "adapter_model.safetensors"))
    import loratools.formats.peft_layout as peft_layout

    monkeypatch.setattr(peft_layout, "time_limit", lambda refusal: patterns.time_limit(refusal, 0.5))
    text = _refused(lambda: loratools.load_adapter(folder), "CorruptFileError", names=str(folder))
    assert "backtracks" in text  # only the time budget says so: the match was stopped, not run out


def test_links_out_of_the_base_are_never_copied(seeds, tmp_path: Path) -> None:
    seeds_root, _ = seeds
    base = tmp_path / "base"
    shutil.copytree(seeds_root / "base", base)
    (tmp_path / "secret.txt").write_text("secret")
    (base / "tokenizer.model").symlink_to("/etc/passwd")
    (base / "notes.txt").symlink_to("../secret.txt")
    (base / "special_tokens_map.json").symlink_to(base / "config.json")  # inside: an ordinary file to copy
    from loratools.checkpoint.reader import open_checkpoint

    ckpt = open_checkpoint(base)
    names = {p.name for p in ckpt.extra_files}
    assert "special_tokens_map.json" in names and not names & {"tokenizer.model", "notes.txt"}
    assert any("tokenizer.model" in w and "outside" in w for w in ckpt.warnings), ckpt.warnings
    out = tmp_path / "out"
    loratools.merge(base, [seeds_root / "peft"], out)
    assert not (out / "tokenizer.model").exists() and not (out / "notes.txt").exists()
    assert (out / "special_tokens_map.json").read_text() == (base / "config.json").read_text()


def test_hub_cache_links_into_blobs_are_followed(seeds, tmp_path: Path) -> None:
    """A Hub cache snapshot's files are links into the repository's blobs/: they are the model's own."""
    seeds_root, _ = seeds
    repo = tmp_path / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in sorted((seeds_root / "base").iterdir()):
        shutil.copy2(p, repo / "blobs" / p.name)
        (snap / p.name).symlink_to(Path("../../blobs") / p.name)
    from loratools.checkpoint.reader import open_checkpoint

    ckpt = open_checkpoint(snap)
    assert {p.name for p in ckpt.extra_files} == {"config.json", "generation_config.json", "tokenizer.json"}
    assert ckpt.warnings == [] and ckpt.config["model_type"] == "llama"


def test_a_pickle_that_warns_still_gives_one_message(tmp_path: Path) -> None:
    f = tmp_path / "old.pt"
    torch.save({"a.lora_A": torch.zeros(2, 4)}, f, _use_new_zipfile_serialization=False)
    f.write_bytes(f.read_bytes()[:-40])
    result = CliRunner().invoke(cli, ["info", str(f)])
    assert result.exit_code == 1 and result.output.startswith("Error: "), result.output
    assert str(f) in result.output


def test_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    folder = tmp_path / "fifo"
    folder.mkdir()
    os.mkfifo(folder / "adapter.safetensors")
    text = _refused(lambda: loratools.load_adapter(folder), "CorruptFileError", names=str(folder))
    assert "not a regular file" in text


# --- a seeded slice of the campaign -------------------------------------------------------------------------------


def test_seeded_campaign_slice(tmp_path: Path) -> None:
    """≈200 mutated inputs across every format, each through load_adapter and info (convert and merge
    on every tenth) in a worker with a limited address space: nothing but ok or a LoraToolsError."""
    records = fc.main(["--inputs", "200", "--seed", "14", "--heavy-every", "10", "--timeout", "60", "--light",
                       "--root", str(tmp_path / "root"), "--save", str(tmp_path / "failures"), "--quiet"])
    assert len(records) == 200
    bad = [(r.i, r.seed, o["op"], o["kind"], o["detail"]) for r in records.values() for o in r.outcomes
           if o["kind"] not in ("ok", "error") or set(o["flags"]) & {"noisy", "long", "leak"}]
    assert not bad, "\n".join(map(str, bad))
    assert {r.format for r in records.values()} >= {"peft", "kohya", "diffusers", "mlx", "gguf", "raw", "base"}
