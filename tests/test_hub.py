"""The Hub, through the real huggingface_hub client over HTTP against tests/hub_server.py.

The loratools CLI runs in a subprocess with HF_ENDPOINT pointing at the local server (the client
reads it at import), HF_HOME in a temporary folder and Xet disabled.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import read_tensors
from tests.hub_server import HubServer


@pytest.fixture()
def hub(tmp_path: Path):
    with HubServer() as server:
        server.home = tmp_path / "hf-home"
        yield server


def cli(hub: HubServer, *args: object, offline: bool = False, token: bool = True,
        extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(hub.home), HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
    if token:
        env["HF_TOKEN"] = "hf_local_test_token"
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "loratools", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def card_metadata(hub: HubServer, repo_id: str) -> dict:
    """The README's metadata as huggingface_hub itself reads it (ModelCard over HTTP)."""
    code = ("import json, sys; from huggingface_hub import ModelCard; "
            "print(json.dumps(ModelCard.load(sys.argv[1]).data.to_dict()))")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("HF_")}, "HF_ENDPOINT": hub.url,
           "HF_HOME": str(hub.home), "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_local_test_token"}
    out = subprocess.run([sys.executable, "-c", code, repo_id], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout)


def test_merge_from_repo_ids_fetches_only_what_it_needs(hub, bases, adapters, tmp_path: Path) -> None:
    base = Path(shutil.copytree(bases["llama"], tmp_path / "base"))
    torch.save({"junk": torch.zeros(3)}, base / "pytorch_model.bin")  # never downloaded beside safetensors
    hub.seed("org/tiny-llama", base)
    hub.seed("org/lora", adapters["all-linear"])
    out = tmp_path / "merged"
    proc = cli(hub, "merge", "org/tiny-llama", "org/lora", out, "-q")
    assert proc.returncode == 0, proc.stderr
    loratools_local = tmp_path / "local"
    import loratools

    loratools.merge(bases["llama"], [adapters["all-linear"]], loratools_local, device="cpu")
    ours, local = read_tensors(out), read_tensors(loratools_local)
    assert all(torch.equal(ours[k], local[k]) for k in local)
    fetched = [line for line in hub.state.log if "/resolve/" in line]
    assert fetched and not any(line.endswith(".bin") for line in fetched)
    # the second time, offline, from the cache, without a single request
    before = len(hub.state.log)
    proc = cli(hub, "merge", "org/tiny-llama", "org/lora", tmp_path / "again", "-q", offline=True)
    assert proc.returncode == 0, proc.stderr
    assert len(hub.state.log) == before


def test_revision_and_subfolder(hub, bases, adapters, tmp_path: Path) -> None:
    folder = tmp_path / "repo"
    shutil.copytree(adapters["second"], folder / "adapters" / "second")
    hub.seed("org/many", folder, branch="v1")
    hub.seed("org/tiny-llama", bases["llama"])
    proc = cli(hub, "info", "org/many@v1:adapters/second", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["modules"] == 4


@pytest.mark.parametrize("ref, says", [
    ("org/nothing", "org/nothing was not found"),
    ("org/tiny-llama@nope", "Revision 'nope'"),
    ("org/tiny-llama:no/such/folder", "no folder"),
])
def test_unknown_repo_revision_or_folder(ref: str, says: str, hub, bases, adapters, tmp_path: Path) -> None:
    hub.seed("org/tiny-llama", bases["llama"])
    proc = cli(hub, "merge", ref, adapters["all-linear"], tmp_path / "out")
    assert proc.returncode == 1 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_gated_and_private_repos_need_a_token(hub, bases, adapters, tmp_path: Path) -> None:
    hub.seed("org/gated", bases["llama"], gated=True)
    hub.seed("org/private", bases["llama"], private=True)
    proc = cli(hub, "merge", "org/gated", adapters["all-linear"], tmp_path / "a", token=False)
    assert proc.returncode == 1 and "gated" in proc.stderr and "HF_TOKEN" in proc.stderr, proc.stderr
    proc = cli(hub, "merge", "org/private", adapters["all-linear"], tmp_path / "b", token=False)
    assert proc.returncode == 1 and "org/private" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli(hub, "merge", "org/private", adapters["all-linear"], tmp_path / "c", "-q")
    assert proc.returncode == 0, proc.stderr


def test_push_merged_model_with_card_and_stale_shard_cleanup(hub, bases, adapters, tmp_path: Path) -> None:
    hub.seed("org/tiny-llama", bases["llama"])
    out = tmp_path / "merged"
    proc = cli(hub, "merge", "org/tiny-llama", adapters["all-linear"], out, "-q", "--push-to", "me/merged")
    assert proc.returncode == 0, proc.stderr
    files = hub.files("me/merged")
    local = {p.name for p in out.iterdir()}
    assert local <= set(files) and "README.md" in files
    assert all(files[n] == (out / n).read_bytes() for n in local)
    meta = card_metadata(hub, "me/merged")
    assert meta["base_model"] == "org/tiny-llama" and meta["base_model_relation"] == "merge"
    assert meta["library_name"] == "transformers" and "lora" in meta["tags"]
    assert "How these files were made" in files["README.md"].decode()
    # re-shard into one file: the old shards and index go in the same commit
    commits = len(hub.state.repos["me/merged"].history)
    proc = cli(hub, "merge", "org/tiny-llama", adapters["all-linear"], out, "-q", "--overwrite",
               "--max-shard-size", "10GB")
    assert proc.returncode == 0, proc.stderr
    stale = len(list(bases["llama"].glob("model-*.safetensors"))) + 1  # the old shards and their index
    proc = cli(hub, "push", out, "me/merged")
    assert proc.returncode == 0 and f"deleted {stale} stale file(s)" in proc.stdout, proc.stdout + proc.stderr
    after = hub.files("me/merged")
    assert "model.safetensors" in after and not any(n.startswith("model-0") for n in after)
    assert "model.safetensors.index.json" not in after
    assert len(hub.state.repos["me/merged"].history) == commits + 1


def test_push_adapter_card_and_a_repush_that_changes_nothing(hub, adapters, tmp_path: Path) -> None:
    proc = cli(hub, "push", adapters["all-linear"], "me/adapter", "--base-model", "org/tiny-llama")
    assert proc.returncode == 0, proc.stderr
    meta = card_metadata(hub, "me/adapter")
    assert meta["base_model"] == "org/tiny-llama" and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft" and "base_model:adapter:org/tiny-llama" in meta["tags"]
    commits = len(hub.state.repos["me/adapter"].history)
    proc = cli(hub, "push", adapters["all-linear"], "me/adapter", "--base-model", "org/tiny-llama")
    assert proc.returncode == 0, proc.stderr
    assert len(hub.state.repos["me/adapter"].history) == commits
    proc = cli(hub, "push", adapters["all-linear"], "me/adapter", "--base-model", "./not/a/repo")
    assert proc.returncode == 1 and "repo id" in proc.stderr


def test_existing_readme_is_kept_and_completed(hub, adapters, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(adapters["second"], tmp_path / "a"))
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# My adapter\n\nHand-written words.\n")
    proc = cli(hub, "push", folder, "me/kept", "--base-model", "org/base")
    assert proc.returncode == 0, proc.stderr
    text = hub.files("me/kept")["README.md"].decode()
    assert "Hand-written words." in text
    meta = card_metadata(hub, "me/kept")
    assert meta["license"] == "mit" and meta["base_model"] == "org/base"
    assert (folder / "README.md").read_text().endswith("Hand-written words.\n")  # the input is untouched


def test_large_file_goes_through_lfs_and_a_503_is_retried(hub, tmp_path: Path) -> None:
    folder = tmp_path / "big"
    folder.mkdir()
    save_file({"w": torch.randn(3_000_000)}, str(folder / "model.safetensors"))  # 12 MB
    (folder / "config.json").write_text("{}")
    hub.state.fail["lfs_put"] = 1
    proc = cli(hub, "push", folder, "me/big")
    assert proc.returncode == 0, proc.stderr
    puts = [line for line in hub.state.log if line.startswith("PUT /lfs-upload/")]
    assert len(puts) == 2  # the 503, then the retry
    repo = hub.state.repos["me/big"]
    data, lfs = repo.commits[repo.refs["main"]]["model.safetensors"]
    assert lfs and data == (folder / "model.safetensors").read_bytes()


def test_a_failing_commit_leaves_the_repo_unchanged_and_a_rerun_completes(hub, adapters, tmp_path: Path) -> None:
    cli(hub, "push", adapters["second"], "me/retry")
    before = dict(hub.files("me/retry"))
    history = len(hub.state.repos["me/retry"].history)
    hub.state.fail["commit"] = 50  # more than the client's own retries
    proc = cli(hub, "push", adapters["all-linear"], "me/retry")
    assert proc.returncode == 1 and "me/retry" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert hub.files("me/retry") == before and len(hub.state.repos["me/retry"].history) == history
    hub.state.fail["commit"] = 0
    proc = cli(hub, "push", adapters["all-linear"], "me/retry")
    assert proc.returncode == 0, proc.stderr
    files = hub.files("me/retry")
    assert files["adapter_model.safetensors"] == (adapters["all-linear"] / "adapter_model.safetensors").read_bytes()


def test_push_refuses_a_merged_model_holding_adapter_config(hub, bases, adapters, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(bases["llama"], tmp_path / "m"))
    shutil.copy(adapters["second"] / "adapter_config.json", folder)
    proc = cli(hub, "push", folder, "me/bad")
    assert proc.returncode == 1 and "adapter_config.json" in proc.stderr
    assert "me/bad" not in hub.state.repos


def test_create_pr_and_push_to_on_convert_and_stack(hub, bases, adapters, tmp_path: Path) -> None:
    proc = cli(hub, "convert", adapters["second"], tmp_path / "k", "--to", "kohya", "--push-to", "me/conv")
    assert proc.returncode == 0, proc.stderr
    assert "pytorch_lora_weights.safetensors" in hub.files("me/conv")
    proc = cli(hub, "stack", adapters["second"], adapters["all-linear"], tmp_path / "s", "--method", "cat",
               "--push-to", "me/stack")
    assert proc.returncode == 0, proc.stderr
    assert "adapter_model.safetensors" in hub.files("me/stack")
    main = hub.state.repos["me/stack"].refs["main"]
    proc = cli(hub, "push", adapters["second"], "me/stack", "--create-pr", "-m", "proposal")
    assert proc.returncode == 0 and "/discussions/1" in proc.stdout, proc.stdout + proc.stderr
    assert hub.state.repos["me/stack"].refs["main"] == main and "refs/pr/1" in hub.state.repos["me/stack"].refs


def test_very_large_folders_fall_back_to_upload_folder_and_say_so(hub, bases, tmp_path: Path) -> None:
    proc = cli(hub, "push", bases["llama"], "me/large", extra_env={"LORATOOLS_ONE_COMMIT_MAX": "1000"})
    assert proc.returncode == 0, proc.stderr
    assert "upload_folder" in proc.stderr
    files = hub.files("me/large")
    assert all(files[p.name] == p.read_bytes() for p in bases["llama"].iterdir())
    assert card_metadata(hub, "me/large")["library_name"] == "transformers"


def test_undo_data_stays_local_unless_asked(hub, bases, adapters, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    assert cli(hub, "merge", bases["llama"], adapters["dora"], out, "-q").returncode == 0
    assert (out / ".loratools" / "undo.safetensors").is_file()
    proc = cli(hub, "push", out, "me/dora-merged")
    assert proc.returncode == 0, proc.stderr
    assert not any(".loratools" in n or "undo" in n for n in hub.files("me/dora-merged"))
    proc = cli(hub, "push", out, "me/dora-merged-undo", "--include-undo")
    assert proc.returncode == 0, proc.stderr
    assert ".loratools/undo.safetensors" in hub.files("me/dora-merged-undo")
