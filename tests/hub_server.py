"""A small local server that speaks the part of the Hugging Face Hub HTTP API that
``huggingface_hub`` uses to create repos, commit (preupload, LFS batch + PUT, NDJSON commit), and
download (repo info, tree, resolve with X-Repo-Commit / ETag headers).

Tests run the real ``huggingface_hub`` client (through the loratools CLI, in a subprocess with
``HF_ENDPOINT`` pointing here) against it. Faults can be injected: ``server.fail["lfs_put"] = 1``
answers the next LFS upload with 503, ``server.fail["commit"] = 3`` the next three commits with 500.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
LFS_THRESHOLD = 10 * 1024 * 1024


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()


@dataclass
class Repo:
    private: bool = False
    gated: bool = False
    commits: dict[str, dict[str, tuple[bytes, bool]]] = field(default_factory=dict)  # sha → {path: (data, lfs)}
    refs: dict[str, str] = field(default_factory=dict)  # branch / refs/pr/N → sha
    history: list[str] = field(default_factory=list)

    def resolve(self, rev: str) -> str | None:
        if rev in self.refs:
            return self.refs[rev]
        return next((sha for sha in self.commits if sha.startswith(rev) and len(rev) >= 7), None)


class HubState:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.fail: dict[str, int] = {}
        self.log: list[str] = []
        self.lock = threading.Lock()

    def take_fault(self, name: str) -> bool:
        with self.lock:
            if self.fail.get(name, 0) > 0:
                self.fail[name] -= 1
                return True
        return False

    def new_commit(self, repo: Repo, files: dict[str, tuple[bytes, bool]], branch: str, message: str) -> str:
        listing = json.dumps(sorted((p, hashlib.sha256(d).hexdigest()) for p, (d, _) in files.items()))
        sha = hashlib.sha1(f"{len(repo.history)}:{message}:{listing}".encode()).hexdigest()
        repo.commits[sha] = dict(files)
        repo.refs[branch] = sha
        repo.history.append(sha)
        return sha


def make_handler(state: HubState, endpoint: list[str]):  # noqa: C901 - one dispatcher for a small API
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # noqa: ANN002
            pass

        # --- helpers ---------------------------------------------------------------------------
        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, obj: object, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), headers)

        def _error(self, status: int, code: str | None, message: str) -> None:
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._json(status, {"error": message}, headers)

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _authorized(self, repo: Repo) -> bool:
            return not (repo.private or repo.gated) or bool(self.headers.get("Authorization"))

        def _repo(self, repo_id: str) -> Repo | None:
            repo = state.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                return None
            if repo.gated and not self.headers.get("Authorization"):
                self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted")
                return None
            if not self._authorized(repo):
                self._error(401, "RepoNotFound", f"Repository {repo_id} not found")
                return None
            return repo

        # --- dispatch --------------------------------------------------------------------------
        def do_HEAD(self) -> None:  # noqa: N802
            self.do_GET()

        def do_GET(self) -> None:  # noqa: N802
            url = urlparse(self.path)
            parts = [unquote(p) for p in url.path.split("/") if p]
            state.log.append(f"{self.command} {url.path}")
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id = f"{parts[2]}/{parts[3]}"
                rest = parts[4:]
                repo = self._repo(repo_id)
                if repo is None:
                    return
                if not rest or rest[0] == "revision":
                    rev = "/".join(rest[1:]) if rest else "main"
                    sha = repo.resolve(rev)
                    if sha is None:
                        return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                    files = repo.commits[sha]
                    return self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                                            "gated": repo.gated, "siblings": [{"rfilename": p} for p in sorted(files)],
                                            "tags": [], "downloads": 0, "likes": 0})
                if rest[0] == "tree":
                    # /tree/{rev}[/{path}] — refs/pr/N arrives url-encoded as one segment
                    rev = rest[1]
                    sha = repo.resolve(rev)
                    if sha is None:
                        return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                    prefix = "/".join(rest[2:])
                    out = []
                    for p, (data, lfs) in sorted(repo.commits[sha].items()):
                        if prefix and not p.startswith(prefix + "/"):
                            continue
                        entry = {"type": "file", "path": p, "size": len(data), "oid": git_blob_sha1(data)}
                        if lfs:
                            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                                            "pointerSize": 134}
                        out.append(entry)
                    return self._json(200, out)
            if len(parts) >= 5 and parts[2] == "resolve":
                repo_id = f"{parts[0]}/{parts[1]}"
                repo = self._repo(repo_id)
                if repo is None:
                    return
                rev, path = parts[3], "/".join(parts[4:])
                sha = repo.resolve(rev)
                if sha is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                entry = repo.commits[sha].get(path)
                if entry is None:
                    return self._error(404, "EntryNotFound", f"{path} does not exist on {rev}")
                data, lfs = entry
                headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(data)}"', "Accept-Ranges": "bytes"}
                if lfs:
                    headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
                    headers["X-Linked-Size"] = str(len(data))
                return self._send(200, data, headers, ctype="application/octet-stream")
            self._error(404, None, f"no route for GET {url.path}")

        def do_PUT(self) -> None:  # noqa: N802
            url = urlparse(self.path)
            state.log.append(f"PUT {url.path}")
            parts = [p for p in url.path.split("/") if p]
            body = self._body()
            if parts[:1] == ["lfs-upload"]:
                if state.take_fault("lfs_put"):
                    return self._error(503, None, "Service temporarily unavailable")
                oid = parts[1]
                if hashlib.sha256(body).hexdigest() != oid:
                    return self._error(400, None, "sha256 mismatch")
                state.lfs[oid] = body
                return self._send(200, b"")
            self._error(404, None, f"no route for PUT {url.path}")

        def do_POST(self) -> None:  # noqa: N802
            url = urlparse(self.path)
            parts = [unquote(p) for p in url.path.split("/") if p]
            query = parse_qs(url.query)
            state.log.append(f"POST {url.path}")
            body = self._body()
            if parts == ["api", "validate-yaml"]:  # the client checks a README's metadata before committing it
                payload = json.loads(body)
                content = payload.get("content", "")
                if content.startswith("---") and content.count("---") < 2:
                    return self._json(400, {"error": "Invalid YAML metadata block"})
                return self._json(200, {"warnings": []})
            if parts == ["api", "repos", "create"]:
                payload = json.loads(body)
                repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
                if repo_id in state.repos:
                    return self._json(409, {"error": "You already created this model repo", "url": f"{endpoint[0]}/{repo_id}"})
                repo = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
                state.repos[repo_id] = repo
                state.new_commit(repo, {".gitattributes": (b"*.safetensors filter=lfs\n", False)}, "main", "initial")
                return self._json(200, {"url": f"{endpoint[0]}/{repo_id}", "name": repo_id})
            if len(parts) == 6 and parts[-3:] == ["info", "lfs", "objects"] or url.path.endswith(".git/info/lfs/objects/batch"):
                payload = json.loads(body)
                objects = []
                for obj in payload["objects"]:
                    entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                    if obj["oid"] not in state.lfs:
                        entry["actions"] = {"upload": {"href": f"{endpoint[0]}/lfs-upload/{obj['oid']}", "header": {}}}
                    objects.append(entry)
                return self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                                  ctype="application/vnd.git-lfs+json")
            if parts[:2] == ["api", "models"] and len(parts) >= 6:
                repo_id = f"{parts[2]}/{parts[3]}"
                action, rev = parts[4], "/".join(parts[5:])
                repo = self._repo(repo_id)
                if repo is None:
                    return
                sha = repo.resolve(rev)
                if sha is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                files = repo.commits[sha]
                if action == "preupload":
                    out = []
                    for f in json.loads(body)["files"]:
                        lfs = f["size"] >= LFS_THRESHOLD or f["path"].endswith(LFS_SUFFIXES)
                        existing = files.get(f["path"])
                        oid = None
                        if existing is not None:
                            oid = hashlib.sha256(existing[0]).hexdigest() if lfs else git_blob_sha1(existing[0])
                        out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                                    "shouldIgnore": False, "oid": oid})
                    return self._json(200, {"files": out})
                if action == "commit":
                    if state.take_fault("commit"):
                        return self._error(500, None, "Internal Error - We're working hard to fix this as soon as possible!")
                    new = dict(files)
                    header = {}
                    for line in body.splitlines():
                        if not line.strip():
                            continue
                        item = json.loads(line)
                        key, value = item["key"], item["value"]
                        if key == "header":
                            header = value
                        elif key == "file":
                            new[value["path"]] = (base64.b64decode(value["content"]), False)
                        elif key == "lfsFile":
                            data = state.lfs.get(value["oid"])
                            if data is None:
                                return self._error(400, None, f"LFS object {value['oid']} was never uploaded")
                            new[value["path"]] = (data, True)
                        elif key == "deletedFile":
                            if value["path"] not in new:
                                return self._error(404, "EntryNotFound", "A file with this name doesn't exist")
                            del new[value["path"]]
                        elif key == "deletedFolder":
                            new = {p: v for p, v in new.items() if not p.startswith(value["path"].rstrip("/") + "/")}
                    branch = rev
                    pr_url = None
                    if query.get("create_pr"):
                        n = sum(1 for r in repo.refs if r.startswith("refs/pr/")) + 1
                        branch = f"refs/pr/{n}"
                        pr_url = f"{endpoint[0]}/{repo_id}/discussions/{n}"
                    new_sha = state.new_commit(repo, new, branch, header.get("summary", ""))
                    return self._json(200, {"commitUrl": f"{endpoint[0]}/{repo_id}/commit/{new_sha}",
                                            "commitOid": new_sha, "pullRequestUrl": pr_url})
            self._error(404, None, f"no route for POST {url.path}")

    return Handler


class HubServer:
    """``with HubServer() as hub:`` → ``hub.url`` is the endpoint; ``hub.state`` holds repos and faults."""

    def __init__(self) -> None:
        self.state = HubState()
        self._endpoint: list[str] = [""]
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self.state, self._endpoint))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._endpoint[0] = self.url
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.state.repos[repo_id]
        return {p: d for p, (d, _) in repo.commits[repo.refs[rev]].items()}

    def seed(self, repo_id: str, folder, *, private: bool = False, gated: bool = False, branch: str = "main") -> str:
        """Put a local folder in a repo directly (the way a model already on the Hub would be)."""
        from pathlib import Path

        repo = self.state.repos.setdefault(repo_id, Repo(private=private, gated=gated))
        files = {p.relative_to(folder).as_posix(): (p.read_bytes(), p.suffix in LFS_SUFFIXES)
                 for p in Path(folder).rglob("*") if p.is_file()}
        return self.state.new_commit(repo, files, branch, "seed")
