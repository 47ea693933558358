"""A Hugging Face Hub on 127.0.0.1 that speaks the part of the Hub's HTTP API that huggingface_hub's
`create_repo`, `create_branch` and `upload_folder` use, and keeps what it is sent.

Requests (huggingface_hub 1.33 and 2.4; paths under /api, model repos only):
- POST repos/create {name, organization, visibility?, type}: {"url"}; 409 (with "url" too) if the
  repo exists, 403 outside the token's namespaces.
- GET models/{repo}[/revision/{rev}] (create_repo asks it after a 401 or 403): 404 RepoNotFound, or
  the same refusal.
- POST models/{repo}/branch/{branch}: a branch from main; 409 if it exists.
- POST validate-yaml {content, repoType}: no errors, no warnings (the model card's metadata).
- GET models/{repo}/tree/{rev}?recursive=true: [{type: "file", path, size, oid}], one page (what
  upload_folder lists to find the files its delete_patterns name).
- POST models/{repo}/preupload/{rev} {files: [{path, sample, size}]}: every file "regular" (its
  bytes go base64 in the commit), so neither LFS nor xet storage is needed.
- POST models/{repo}/commit/{rev}, ndjson: a header line, then {"key": "file", "value": {path,
  content, encoding: base64}} and {"key": "deletedFile", "value": {path}} lines; answered with
  {commitUrl, commitOid, pullRequestUrl}.
Every request needs `Authorization: Bearer <token>`, else 401 as the Hub answers a bad token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})  # branch: path: bytes
    commits: list[dict] = field(default_factory=list)  # {"branch", "summary", "added", "deleted", "url"}


class FakeHub:
    """Start with `with FakeHub(token, namespaces) as hub:`; hub.url is its endpoint."""

    def __init__(self, token: str, namespaces: tuple[str, ...] = ("me",)):
        self.token, self.namespaces = token, namespaces
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []  # "METHOD /path" in the order they came
        self.lock = threading.Lock()  # one request at a time: the upload's threads may overlap
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, method: str, path: str, headers, body: bytes) -> tuple[int, dict | list, dict]:
        """(status, JSON body, extra headers) for one request."""
        self.requests.append(f"{method} {path}")
        if headers.get("Authorization") != f"Bearer {self.token}":
            return _error(401, "Invalid credentials in Authorization header")
        parts = path.removeprefix("/api/").split("/")
        if method == "POST" and path == "/api/repos/create":
            return self._create(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}, {}
        if parts[0] != "models" or len(parts) < 3:
            return _error(404, "Not found")
        repo = self.repos.get(f"{parts[1]}/{parts[2]}")
        if repo is None:
            return _error(404, "Repository not found", "RepoNotFound")
        action, name = (parts[3], unquote("/".join(parts[4:]))) if len(parts) > 4 else (None, None)
        if method == "POST" and action == "branch":
            if name in repo.branches:
                return _error(409, "Reference already exists")
            repo.branches[name] = dict(repo.branches["main"])
            return 200, {}, {}
        if action in ("tree", "preupload", "commit") and name not in repo.branches:
            return _error(404, f"Invalid rev id: {name}", "RevisionNotFound")
        if method == "GET" and action == "tree":
            return (
                200,
                [
                    {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for path, data in sorted(repo.branches[name].items())
                ],
                {},
            )
        if method == "POST" and action == "preupload":
            files = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                for f in json.loads(body)["files"]
            ]
            return 200, {"files": files}, {}
        if method == "POST" and action == "commit":
            return self._commit(f"{parts[1]}/{parts[2]}", repo, name, body)
        return _error(404, "Not found")

    def _create(self, payload: dict) -> tuple[int, dict, dict]:
        repo_id = f"{payload['organization'] or self.namespaces[0]}/{payload['name']}"
        if repo_id.split("/")[0] not in self.namespaces:
            return _error(
                403, f'You don\'t have the rights to create a model under the namespace "{repo_id.split("/")[0]}"'
            )
        if repo_id in self.repos:  # the Hub names the repo in this answer, and create_repo(exist_ok) reads it
            status, answer, headers = _error(409, "You already created this model repo")
            return status, {**answer, "url": f"{self.url}/{repo_id}"}, headers
        self.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}, {}

    def _commit(self, repo_id: str, repo: Repo, branch: str, body: bytes) -> tuple[int, dict, dict]:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if any(line["key"] not in ("header", "file", "deletedFile") for line in lines):
            return _error(400, "this fake hub takes regular files only")
        files = {
            line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines if line["key"] == "file"
        }
        deleted = [line["value"]["path"] for line in lines if line["key"] == "deletedFile"]
        if any(path not in repo.branches[branch] for path in deleted):
            return _error(404, "A file with this name doesn't exist", "EntryNotFound")
        for path in deleted:
            del repo.branches[branch][path]
        repo.branches[branch].update(files)
        oid = hashlib.sha1(body).hexdigest()
        url = f"{self.url}/{repo_id}/commit/{oid}"
        repo.commits.append(
            {
                "branch": branch,
                "summary": lines[0]["value"]["summary"],
                "added": sorted(files),
                "deleted": deleted,
                "url": url,
            }
        )
        return 200, {"commitUrl": url, "commitOid": oid, "pullRequestUrl": None}, {}


def _error(status: int, message: str, code: str | None = None) -> tuple[int, dict, dict]:
    return status, {"error": message}, {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})}


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with hub.lock:
                status, answer, headers = hub.answer(self.command, urlsplit(self.path).path, self.headers, body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            headers = {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

        def log_message(self, *args) -> None:  # quiet
            pass

    return Handler
