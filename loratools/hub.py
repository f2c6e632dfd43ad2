"""The Hugging Face Hub: repo ids as inputs, ``push`` for outputs, model cards.

Inputs: ``org/name``, ``org/name@revision``, ``org/name@revision:subfolder``. A local path that
exists always wins. Downloads go through ``huggingface_hub.snapshot_download`` into the standard
cache and fetch only what a command needs (weights as safetensors when the repo has them — never
``*.bin`` beside them —, indexes, config, tokenizer and generation files; for adapters their own
folder). ``HF_HUB_OFFLINE=1`` re-uses the cache; ``HF_ENDPOINT`` and ``HF_TOKEN`` are read by
huggingface_hub itself.

``push`` uploads a folder as one atomic commit (``create_commit``), deleting remote weight shards
and indexes the folder no longer has, and writes or completes the model card in that commit
(the folder itself is never modified).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import HubError, InvalidArgumentError, LoraToolsError
from .jsonio import read_json

REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[^:]+))?(?::(?P<sub>.+))?$")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.h5", "*.msgpack", "*.onnx")
META_PATTERNS = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.py", "*.jinja", "tokenizer*", "*.md")
# above this many bytes one commit is impractical: upload_folder instead (LORATOOLS_ONE_COMMIT_MAX overrides)
LARGE_FOLDER = 50 * 10**9


@dataclass(frozen=True)
class RepoRef:
    repo_id: str
    revision: str | None = None
    subfolder: str | None = None


def parse_repo(text: str) -> RepoRef | None:
    """A Hub reference, or None when ``text`` does not look like one: paths that start with
    ``.``, ``/`` or ``~``, and paths whose first folder exists here (``adapters/my-lora`` with a
    local ``adapters/``: a typo in a local path, not a Hub id), are local."""
    if text.startswith((".", "/", "~")) or "\\" in text:
        return None
    if Path(text.split("/", 1)[0]).exists():
        return None
    m = REPO_ID.match(text)
    if not m or m["repo"].count("/") != 1:
        return None
    return RepoRef(m["repo"], m["rev"], m["sub"].strip("/") if m["sub"] else None)


def _wrap(e: Exception, ref: RepoRef) -> HubError:
    """One clear message per failure, naming the repo; no traceback."""
    from huggingface_hub import errors as hf

    where = ref.repo_id + (f"@{ref.revision}" if ref.revision else "") + (f":{ref.subfolder}" if ref.subfolder else "")
    if isinstance(e, hf.GatedRepoError):
        return HubError(f"{where} is gated: you need to accept its conditions on the Hub and use a token.",
                        path=where, hint="Set HF_TOKEN or run `hf auth login`.")
    if isinstance(e, hf.RepositoryNotFoundError):
        return HubError(f"Repository {ref.repo_id} was not found on the Hub (or it is private and no valid token "
                        "was given).", path=where, hint="Check the id; for a private repo set HF_TOKEN.")
    if isinstance(e, hf.RevisionNotFoundError):
        return HubError(f"Revision {ref.revision!r} of {ref.repo_id} does not exist.", path=where)
    if isinstance(e, (hf.RemoteEntryNotFoundError, hf.EntryNotFoundError)):
        return HubError(f"{where}: a file this command needs is not in the repository ({e}).", path=where)
    if isinstance(e, hf.LocalEntryNotFoundError):
        return HubError(f"{where} is not in the local cache and the Hub cannot be reached (offline?).", path=where,
                        hint="Download it once with network access, or unset HF_HUB_OFFLINE.")
    if isinstance(e, hf.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            return HubError(f"{where}: the Hub refused the request: no valid token.", path=where,
                            hint="Set HF_TOKEN or run `hf auth login`.")
        return HubError(f"{where}: the Hub answered with an error: {str(e).splitlines()[0]}", path=where)
    return HubError(f"{where}: {type(e).__name__}: {e}", path=where)


def _patterns_for(files: list[str], sub: str | None, *, kind: str) -> list[str]:
    prefix = f"{sub}/" if sub else ""
    if kind == "adapter":
        own = [f for f in files if f.startswith(prefix)] if sub else files
        has_st = any(f.endswith(".safetensors") for f in own)
        return [f for f in own if not (has_st and f.endswith((".bin", ".pt", ".pth")))]
    pipeline = f"{prefix}model_index.json" in files  # a diffusers pipeline: its component folders too
    own = [f for f in files if f.startswith(prefix) and (pipeline or "/" not in f[len(prefix):])]
    folders_with_st = {f.rsplit("/", 1)[0] if "/" in f else "" for f in own if f.endswith(".safetensors")}
    keep = []
    for f in own:
        folder, _, name = f.rpartition("/")
        if any(fnmatch.fnmatch(name, p) for p in WEIGHT_PATTERNS):
            if folder in folders_with_st and not name.endswith((".safetensors", ".safetensors.index.json")):
                continue
            if name.endswith(".gguf"):
                continue
        elif not any(fnmatch.fnmatch(name, p) for p in META_PATTERNS):
            continue
        keep.append(f)
    return keep


def _check_reachable(ref: RepoRef) -> None:
    """One quick request to the endpoint before the client's own retries (which wait half a
    minute on a network that is down): an unreachable Hub fails at once, naming the id and the
    way to work from the cache. Offline mode makes no request."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return
    try:
        get_session().head(constants.ENDPOINT, timeout=10)
    except Exception as e:  # connection refused, DNS failure, timeout: no answer at all
        raise HubError(
            f"{ref.repo_id} is not a local path, and the Hub ({constants.ENDPOINT}) cannot be reached: "
            f"{type(e).__name__}.",
            path=ref.repo_id,
            hint="Check the path if you meant a local file. To use what is already downloaded, set HF_HUB_OFFLINE=1.",
        ) from None


def resolve(arg: str | Path, *, kind: str = "checkpoint") -> Path:
    """A local path for an input argument: the path itself when it exists, else a Hub snapshot."""
    path = Path(arg)
    if path.exists():
        return path
    ref = parse_repo(str(arg))
    if ref is None:
        return path  # the reader reports the missing path
    from huggingface_hub import HfApi, snapshot_download

    _check_reachable(ref)
    try:
        try:
            files = HfApi().list_repo_files(ref.repo_id, revision=ref.revision)
            allow = _patterns_for(files, ref.subfolder, kind=kind)
        except Exception as e:  # offline: the same choice of files, by pattern, from the cache
            from huggingface_hub import errors as hf

            if not isinstance(e, (hf.OfflineModeIsEnabled,)) and "offline" not in str(e).lower():
                raise
            prefix = f"{ref.subfolder}/" if ref.subfolder else ""
            kept = ("*.safetensors", "*.safetensors.index.json", *META_PATTERNS) if kind == "checkpoint" else (
                "*.safetensors", "*.json", "*.gguf", "*.md", "*.bin")
            allow = [prefix + p for p in kept] if kind == "checkpoint" else [prefix + "**/" + p for p in kept] + [
                prefix + p for p in kept]
        folder = snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=allow)
    except HubError:
        raise
    except Exception as e:
        err = _wrap(e, ref)
        err.message = f"{arg} is not a local path, and as a Hub repo: {err.message}"
        raise err from None
    local = Path(folder) / ref.subfolder if ref.subfolder else Path(folder)
    if not local.exists():
        raise HubError(f"{ref.repo_id} has no folder {ref.subfolder!r}.", path=str(arg))
    return local


# --- push --------------------------------------------------------------------------------------------------------


@dataclass
class PushResult:
    repo_id: str
    commit_url: str | None
    uploaded: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    pr_url: str | None = None
    notes: list[str] = field(default_factory=list)


def _record(folder: Path) -> dict | None:
    from .ops.undo import read_file_record

    try:
        return read_file_record(folder)
    except LoraToolsError:  # a damaged record does not stop a push; the card just says less
        return None


def is_adapter_folder(folder: Path) -> bool:
    from .formats import detect_format

    try:
        detect_format(folder)
        return True
    except Exception:
        return False


def _looks_like_repo_id(value: str | None) -> bool:
    return bool(value) and parse_repo(str(value)) is not None and not Path(str(value)).exists()


def model_card(folder: Path, *, base_model: str | None, existing: str | None) -> tuple[str, dict]:
    """The README for a pushed folder: an existing card kept and completed, else a new one."""
    from huggingface_hub import ModelCard, ModelCardData

    adapter = is_adapter_folder(folder) and not any(p.name.startswith("model") and p.suffix == ".safetensors"
                                                     for p in folder.iterdir())
    record = _record(folder) or {}
    adapters = record.get("adapters", [])
    if base_model is None:
        candidates = [record.get("base_model")] + [a.get("base_model") for a in adapters] if not adapter else []
        if adapter:
            cfg = folder / "adapter_config.json"
            if cfg.is_file():
                candidates.append(read_json(cfg, what="the adapter config").get("base_model_name_or_path"))
        base_model = next((c for c in candidates if _looks_like_repo_id(c)), None)
    elif not _looks_like_repo_id(base_model):
        raise InvalidArgumentError(f"--base-model {base_model!r} is not a Hub repo id (org/name).",
                                   hint="The card's base_model must name a repository, never a local path.")
    data: dict = {}
    body = ""
    if existing:
        if existing.lstrip().startswith("---"):
            card = ModelCard(existing)
            data = card.data.to_dict() if card.data else {}
            body = card.text
        else:
            body = existing
    if base_model:
        data["base_model"] = base_model
    data.setdefault("base_model_relation", "adapter" if adapter else "merge")
    data.setdefault("library_name", "peft" if adapter and (folder / "adapter_config.json").is_file() else
                    ("transformers" if not adapter else "diffusers"))
    tags = list(data.get("tags") or [])
    for tag in ["lora", "loratools"] + ([f"base_model:adapter:{base_model}"] if adapter and base_model else []):
        if tag not in tags:
            tags.append(tag)
    data["tags"] = tags
    if "loratools" not in (body or ""):
        lines = ["", "## How these files were made", ""]
        if adapters and not adapter:
            lines.append(f"Merged with loratools ({record.get('operation', 'merge')}) — W' = W + Σ weightᵢ·ΔWᵢ, "
                         "computed in float32 and rounded once:")
            lines += [f"- `{a.get('path')}` (weight {a.get('weight')}, sha256 `{str(a.get('sha256'))[:16]}…`)"
                      for a in adapters]
        else:
            lines.append("Written by loratools.")
        body = (body or "").rstrip() + "\n" + "\n".join(lines) + "\n"
    return "---\n" + ModelCardData(**data).to_yaml() + "\n---\n" + body, data


def push(
    folder: str | Path,
    repo_id: str,
    *,
    base_model: str | None = None,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    message: str | None = None,
    include_undo: bool = False,
) -> PushResult:
    """Upload ``folder`` to ``repo_id`` as one commit, with its model card. loratools' own undo
    data (``.loratools/``) stays local unless ``include_undo``."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    folder = Path(folder)
    ref = RepoRef(repo_id, revision)
    parsed = parse_repo(repo_id)
    if parsed is None or parsed.revision or parsed.subfolder:
        raise InvalidArgumentError(f"{repo_id!r} is not a repo id (org/name).", hint="Use --revision for a branch.")
    if not folder.is_dir():
        raise InvalidArgumentError(f"{folder} is not a folder.", hint="push uploads a folder (a model or an adapter).")
    weights = [p for p in folder.glob("*.safetensors") if not p.name.startswith("adapter_model")]
    if (folder / "adapter_config.json").exists() and any(not p.name.endswith("loratools_undo.safetensors")
                                                         for p in weights):
        raise InvalidArgumentError(
            f"{folder} holds model weights and an adapter_config.json: the Hub and transformers would load it as an "
            "adapter, not as the merged model.", hint="Remove adapter_config.json from the merged model's folder.")
    def wanted(p: Path) -> bool:
        parts = p.relative_to(folder).parts
        if include_undo and parts[0] == ".loratools":
            return True
        return not any(part.startswith(".") for part in parts) and (
            include_undo or not p.name.endswith("loratools_undo.safetensors"))

    files = sorted(p for p in folder.rglob("*") if p.is_file() and wanted(p))
    api = HfApi()
    result = PushResult(repo_id=repo_id, commit_url=None)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        remote: list[str] = []
        readme: str | None = None
        try:
            remote = api.list_repo_files(repo_id, revision=revision)
            if "README.md" in remote and not (folder / "README.md").exists():
                from huggingface_hub import hf_hub_download

                readme = Path(hf_hub_download(repo_id, "README.md", revision=revision)).read_text()
        except Exception as e:
            from huggingface_hub import errors as hf

            if not isinstance(e, hf.RevisionNotFoundError):
                raise
        if (folder / "README.md").exists():
            readme = (folder / "README.md").read_text()
        card, _ = model_card(folder, base_model=base_model, existing=readme)
        local = {p.relative_to(folder).as_posix() for p in files}
        ops: list[Any] = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
                          for p in files if p.name != "README.md" or p.parent != folder]
        ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
        stale = [f for f in remote if f not in local and f != "README.md" and (
            any(fnmatch.fnmatch(f.rsplit("/", 1)[-1], p) for p in WEIGHT_PATTERNS) or f.endswith(".index.json"))]
        ops += [CommitOperationDelete(path_in_repo=f) for f in stale]
        size = sum(p.stat().st_size for p in files)
        msg = message or f"Upload with loratools ({len(files)} file(s))"
        import os

        if size > int(os.environ.get("LORATOOLS_ONE_COMMIT_MAX", LARGE_FOLDER)):
            result.notes.append(f"{size / 1e9:.0f} GB is too large for one commit: uploading with upload_folder in "
                                "several commits")
            info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision, create_pr=create_pr,
                                     commit_message=msg, delete_patterns=[*WEIGHT_PATTERNS, "*.index.json"],
                                     ignore_patterns=["README.md"] + ([] if include_undo else [
                                         ".loratools/**", "**/.loratools/**", "*loratools_undo.safetensors"]))
            info = api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=repo_id,
                                   revision=revision, commit_message=f"{msg}: model card")
            result.commit_url = str(getattr(info, "commit_url", info))
        else:
            info = api.create_commit(repo_id, operations=ops, commit_message=msg, revision=revision,
                                     create_pr=create_pr)
            result.commit_url = info.commit_url
            result.pr_url = getattr(info, "pr_url", None)
        result.uploaded = sorted(local | {"README.md"})
        result.deleted = stale
    except (HubError, InvalidArgumentError):
        raise
    except Exception as e:
        raise _wrap(e, ref) from None
    return result
