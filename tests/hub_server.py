"""A small Hugging Face Hub for tests: the HTTP endpoints that the real `huggingface_hub` client (and Transformers'
`from_pretrained` through it) calls to publish and download models, served on the loopback interface.

It is honest: repos hold real commits (parent, tree, message) and real file contents; large files go through the Git
LFS batch protocol and are checked against their sha256; tokens are checked (unknown -> 401, read-only -> 403, another
user's namespace -> 403); names are validated as the Hub does; README metadata is validated on `validate-yaml` and on
commit; every 404 carries the `X-Error-Code` the client turns into `RepositoryNotFoundError`, `RevisionNotFoundError`
or `RemoteEntryNotFoundError`. `fail_after(n)` makes every request after the next `n` answer 500, as an outage would.

What the client needs from it (see DESIGN.md): the client must be configured before `huggingface_hub` is imported, with
`HF_ENDPOINT=server.url`, `HF_HUB_DISABLE_XET=1` (this server speaks LFS, not Xet) and `HF_HUB_OFFLINE` unset.

    with HubServer(users={"alice": {"token": "hf_alice", "orgs": ["matta-org"]}}) as hub:
        env = hub.client_env(token="hf_alice")   # for a subprocess
        ...
        hub.commits("matta-org/some-model")       # what the client committed, newest first
"""

import base64
import fnmatch
import hashlib
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


# The Hub's rule for user, organization and repo names (its Names.ts; the client only checks a looser regex).
NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
# What a new model repo's `.gitattributes` sends through LFS (the Hub's default holds many more binary patterns).
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.onnx", "*.msgpack", "*.zip", "*.gz")
LFS_SIZE = 10 * 1024 * 1024  # larger files go through LFS whatever their name, as on the Hub
GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in LFS_PATTERNS).encode()
# A subset of the Hub's license ids and pipeline tags: enough to reject a typo.
LICENSES = {
    "apache-2.0", "mit", "bsd-3-clause", "bsd-2-clause", "gpl-3.0", "lgpl-3.0", "cc-by-4.0", "cc-by-sa-4.0",
    "cc-by-nc-4.0", "cc0-1.0", "openrail", "creativeml-openrail-m", "bigscience-openrail-m", "llama2", "llama3",
    "gemma", "other", "unknown",
}  # fmt: skip
PIPELINE_TAGS = {"text-generation", "text-classification", "fill-mask", "text2text-generation", "feature-extraction"}
BASE_MODEL_RELATIONS = {"adapter", "merge", "quantized", "finetune"}


class HubError(Exception):
    """An HTTP error answer: status, message, and the `X-Error-Code` the client dispatches on."""

    def __init__(self, status: int, message: str, code: str | None = None, body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.body = status, message, code, body


@dataclass
class Blob:
    """A file's content and ids: the git blob oid, and for LFS files the sha256 (the git blob is then a pointer)."""

    content: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def pointer(self) -> bytes:
        spec = "https://git-lfs.github.com/spec/v1"
        return f"version {spec}\noid sha256:{self.sha256}\nsize {len(self.content)}\n".encode()

    @property
    def oid(self) -> str:
        return git_blob_oid(self.pointer if self.lfs else self.content)


@dataclass
class Commit:
    oid: str
    parent: str | None
    tree: dict[str, Blob]
    title: str
    message: str
    author: str
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob, as `git hash-object` computes it."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def validate_card_metadata(content: str) -> list[str]:
    """The errors the Hub would report for a README's YAML front matter (empty list: valid)."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, flags=re.DOTALL)
    if match is None:
        return []
    try:
        meta = yaml.safe_load(match[1])
    except yaml.YAMLError as error:
        return [f"YAML front matter does not parse: {error}"]
    if meta is None:
        return []
    if not isinstance(meta, dict):
        return ["YAML front matter must be a mapping"]
    errors = []

    def strings(key: str) -> None:
        value = meta.get(key)
        if value is not None and not (
            isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        ):
            errors.append(f'"{key}" must be a string or a list of strings')

    for key in ("tags", "datasets", "language", "metrics", "base_model"):
        strings(key)
    if "license" in meta and meta["license"] not in LICENSES:
        errors.append(f'"license" must be one of the Hub license ids, got {meta["license"]!r}')
    if "pipeline_tag" in meta and meta["pipeline_tag"] not in PIPELINE_TAGS:
        errors.append(f'"pipeline_tag" {meta["pipeline_tag"]!r} is not a known pipeline tag')
    if "library_name" in meta and not isinstance(meta["library_name"], str):
        errors.append('"library_name" must be a string')
    base_models = meta.get("base_model")
    for base in [base_models] if isinstance(base_models, str) else base_models or []:
        if not all(NAME.match(part) for part in base.split("/")) or base.count("/") > 1:
            errors.append(f'"base_model" {base!r} is not a model id')
    if "base_model_relation" in meta:
        if meta["base_model_relation"] not in BASE_MODEL_RELATIONS:
            errors.append(f'"base_model_relation" must be one of {sorted(BASE_MODEL_RELATIONS)}')
        if not base_models:
            errors.append('"base_model_relation" needs "base_model"')
    if "model-index" in meta:
        errors += _model_index_errors(meta["model-index"])
    return errors


def _model_index_errors(model_index) -> list[str]:
    """The model-index schema: models with a name and results of task, dataset and metrics."""
    if not isinstance(model_index, list):
        return ['"model-index" must be a list']
    errors = []
    for model in model_index:
        if not isinstance(model, dict) or not isinstance(model.get("name"), str):
            errors.append('"model-index" entries need a "name"')
            continue
        for result in model.get("results") or [None]:
            if not isinstance(result, dict):
                errors.append('"model-index[].results" must be a non-empty list of results')
                continue
            task, dataset, metrics = result.get("task"), result.get("dataset"), result.get("metrics")
            if not (isinstance(task, dict) and isinstance(task.get("type"), str)):
                errors.append('"model-index[].results[].task.type" is required')
            if not (isinstance(dataset, dict) and isinstance(dataset.get("type"), str) and "name" in dataset):
                errors.append('"model-index[].results[].dataset" needs "type" and "name"')
            if not isinstance(metrics, list) or not metrics:
                errors.append('"model-index[].results[].metrics" must be a non-empty list')
                continue
            for metric in metrics:
                if not (isinstance(metric, dict) and isinstance(metric.get("type"), str) and "value" in metric):
                    errors.append('"model-index[].results[].metrics[]" need "type" and "value"')
                elif not isinstance(metric["value"], (int, float, str)) or isinstance(metric["value"], bool):
                    errors.append(f"metric {metric['type']!r} has a value of type {type(metric['value']).__name__}")
    return errors


class HubServer:
    """The Hub's state (users, repos, commits, LFS objects, collections) behind a loopback HTTP server."""

    def __init__(self, users: dict[str, dict]):
        """`users`: name -> {"token": str, "orgs": [org names], "role": "write" (default) or "read"}."""
        self.users = users
        self.tokens = {spec["token"]: name for name, spec in users.items()}
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.upload_keys: dict[str, str] = {}  # one-time LFS upload key -> expected sha256
        self.collections: dict[str, dict] = {}
        self.log: list[tuple[str, str, int]] = []  # (method, path, status) of every request
        self.unknown: list[str] = []  # requests no route matched: the client called something not implemented
        self.crashes: list[str] = []  # requests this server failed to handle (its own bugs)
        self._fail_after: int | None = None
        self._lock = threading.RLock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def client_env(self, token: str | None = None) -> dict[str, str]:
        """Environment variables that point a fresh process's `huggingface_hub` at this server."""
        env = {"HF_ENDPOINT": self.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}
        if token is not None:
            env["HF_TOKEN"] = token
        return env

    def fail_after(self, requests: int | None) -> None:
        """Answer 500 to every request after the next `requests` ones (None: serve normally again)."""
        with self._lock:
            self._fail_after = requests

    # --- what tests inspect --------------------------------------------------------------------------------------

    def commits(self, repo_id: str, branch: str = "main") -> list[Commit]:
        """The commits of a branch, newest first."""
        repo = self.repos[repo_id]
        oid, history = repo.branches[branch], []
        while oid is not None:
            history.append(repo.commits[oid])
            oid = repo.commits[oid].parent
        return history

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Path -> content of every file at a revision."""
        repo = self.repos[repo_id]
        return {path: blob.content for path, blob in repo.commits[self._resolve(repo, revision)].tree.items()}

    # --- state changes, under the lock -------------------------------------------------------------------------

    def _resolve(self, repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.tags:
            return repo.tags[revision]
        matches = [oid for oid in repo.commits if len(revision) >= 7 and oid.startswith(revision)]
        if len(matches) == 1:
            return matches[0]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _commit(self, repo: Repo, branch: str, tree: dict[str, Blob], title: str, message: str, author: str) -> str:
        parent = repo.branches.get(branch)
        listing = "\n".join(f"{path} {blob.oid}" for path, blob in sorted(tree.items()))
        oid = hashlib.sha1(f"{parent}\n{listing}\n{title}\n{message}\n{time.time_ns()}".encode()).hexdigest()
        repo.commits[oid] = Commit(oid, parent, tree, title, message, author, _now())
        repo.branches[branch] = oid
        return oid


def _make_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubHandler):
        pass

    Handler.hub = hub
    return Handler


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects; every answer carries Content-Length
    hub: HubServer

    def log_message(self, format, *args) -> None:  # the request log is `hub.log`, not stderr
        pass

    def do_GET(self):
        self._serve("GET")

    def do_HEAD(self):
        self._serve("HEAD")

    def do_POST(self):
        self._serve("POST")

    def do_PUT(self):
        self._serve("PUT")

    def do_PATCH(self):
        self._serve("PATCH")

    def do_DELETE(self):
        self._serve("DELETE")

    # --- plumbing ----------------------------------------------------------------------------------------------

    def _serve(self, method: str) -> None:
        hub = self.hub
        split = urlsplit(self.path)
        # Segments are split before unquoting: a revision such as `refs%2Fpr%2F1` stays one segment.
        self.segments = [unquote(part) for part in split.path.strip("/").split("/")]
        self.query = {key: values[-1] for key, values in parse_qs(split.query).items()}
        body = self._read_body()
        with hub._lock:
            failing = hub._fail_after is not None and hub._fail_after <= 0
            if hub._fail_after is not None:
                hub._fail_after -= 1
        try:
            if failing:
                raise HubError(500, "Internal Error - We're working hard to fix this as soon as possible!")
            with hub._lock:
                status, headers, payload = self._route(method, body)
        except HubError as error:
            status, headers = error.status, {"X-Error-Message": error.message}
            if error.code:
                headers["X-Error-Code"] = error.code
            payload = error.body or {"error": error.message}
        except Exception as error:  # a bug of this server, not an answer of the Hub: tests assert there is none
            hub.crashes.append(f"{method} {self.path}: {error!r}")
            status, headers, payload = 500, {}, {"error": f"test Hub crashed: {error!r}"}
        hub.log.append((method, split.path, status))
        self._answer(method, status, headers, payload)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF after each chunk
                if size == 0:
                    return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _answer(self, method: str, status: int, headers: dict, payload) -> None:
        if isinstance(payload, bytes):
            data, content_type = payload, "application/octet-stream"
        else:
            data, content_type = json.dumps(payload).encode(), "application/json; charset=utf-8"
        self.send_response(status)
        self.send_header("Content-Type", headers.pop("Content-Type", content_type))
        self.send_header("Content-Length", headers.pop("Content-Length", str(len(data))))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def _user(self, required: bool = True) -> str | None:
        """The token's user; 401 for a token the Hub does not know (or none, when `required`)."""
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else None
        if token is None:
            if required:
                raise HubError(401, "You must be authenticated to access this resource")
            return None
        if token not in self.hub.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.hub.tokens[token]

    def _writer(self, namespace: str) -> str:
        """The user, if its token may write to `namespace` (its own name or one of its organizations)."""
        user = self._user()
        spec = self.hub.users[user]
        if spec.get("role", "write") == "read":
            raise HubError(403, "You have read access but not the required permissions for this operation")
        if namespace != user and namespace not in spec.get("orgs", []):
            raise HubError(403, f"You don't have the rights to create a model under the namespace {namespace!r}")
        return user

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        """An existing repo the caller may see (and, with `write`, change); 404 RepoNotFound otherwise."""
        repo = self.hub.repos.get(repo_id)
        if write:
            user = self._writer(repo_id.split("/")[0]) if repo is not None else None
        else:
            user = self._user(required=False)
        visible = repo is not None and (
            not repo.private
            or (user is not None and repo_id.split("/")[0] in (user, *self.hub.users[user].get("orgs", [])))
        )
        if not visible:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    # --- routes ------------------------------------------------------------------------------------------------

    def _route(self, method: str, body: bytes):
        seg = self.segments
        content_type = self.headers.get("Content-Type", "").split(";")[0]
        json_body = json.loads(body) if body and content_type.endswith(("/json", "+json")) else {}
        if seg[:2] == ["api", "agent-harnesses"] and method == "GET":  # the client's best-effort user-agent lookup
            return 200, {}, {"standardEnvVars": [], "harnesses": {}}
        if seg[:2] == ["api", "whoami-v2"] and method == "GET":
            return self._whoami()
        if seg[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(json_body)
        if seg[:2] == ["api", "validate-yaml"] and method == "POST":
            errors = validate_card_metadata(json_body.get("content", ""))
            if errors:
                raise HubError(400, "; ".join(errors), body={"errors": [{"message": e} for e in errors]})
            return 200, {}, {"errors": [], "warnings": []}
        if seg[:2] == ["api", "collections"]:
            return self._collections(method, seg[2:], json_body)
        if seg[:2] == ["api", "models"] and len(seg) >= 4:
            return self._model_api(method, f"{seg[2]}/{seg[3]}", seg[4:], body, json_body)
        if len(seg) >= 5 and seg[1].endswith(".git") and seg[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{seg[0]}/{seg[1][:-4]}", json_body)
        if seg[0] == "lfs-upload" and method == "PUT" and len(seg) == 2:
            return self._lfs_upload(seg[1], body)
        if seg[0] == "lfs-verify" and method == "POST":
            if json_body.get("oid") not in self.hub.lfs_objects:
                raise HubError(404, "Object not found")
            return 200, {}, {}
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve_file(f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]))
        self.hub.unknown.append(f"{method} {self.path}")
        raise HubError(404, f"no route for {method} {self.path}", "EntryNotFound")

    def _whoami(self):
        user = self._user()
        spec = self.hub.users[user]
        return (
            200,
            {},
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user.title(),
                "orgs": [{"type": "org", "name": org, "roleInOrg": "write"} for org in spec.get("orgs", [])],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "tests", "role": spec.get("role", "write")},
                },
            },
        )

    def _create_repo(self, payload: dict):
        name, namespace = payload.get("name", ""), payload.get("organization")
        user = self._user()
        namespace = namespace or user
        if payload.get("type", "model") != "model":
            raise HubError(400, "this test Hub holds model repos only")
        for part in (namespace, name):
            if not NAME.match(part) or "--" in part or ".." in part or part.endswith(".git"):
                raise HubError(
                    400,
                    f"Invalid name {part!r}: use letters, digits, '-', '_' and '.', start and end with a letter or "
                    "digit, no '--' or '..', at most 96 characters",
                )
        self._writer(namespace)
        repo_id = f"{namespace}/{name}"
        if repo_id in self.hub.repos:
            raise HubError(
                409,
                "You already created this model repo",
                body={"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"},
            )
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = Repo(repo_id, private, _now())
        self.hub.repos[repo_id] = repo
        self.hub._commit(repo, "main", {".gitattributes": Blob(GITATTRIBUTES, lfs=False)}, "initial commit", "", user)
        return (
            200,
            {},
            {
                "url": f"{self.hub.url}/{repo_id}",
                "name": repo_id,
                "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            },
        )

    def _model_api(self, method: str, repo_id: str, rest: list[str], body: bytes, payload: dict):
        action = rest[0] if rest else None
        if method == "GET" and action in (None, "revision"):
            repo = self._repo(repo_id)
            return 200, {}, self._model_info(repo, rest[1] if action == "revision" else "main")
        if method == "POST" and action == "preupload" and len(rest) == 2:
            return self._preupload(self._repo(repo_id, write=True), rest[1], payload)
        if method == "POST" and action == "commit" and len(rest) == 2:
            return self._commit(self._repo(repo_id, write=True), rest[1], body)
        if method == "GET" and action == "tree" and len(rest) >= 2:
            return self._tree(self._repo(repo_id), rest[1], "/".join(rest[2:]))
        if method == "GET" and action == "refs":
            repo = self._repo(repo_id)
            refs = {
                kind: [
                    {"name": name, "ref": f"refs/{prefix}/{name}", "targetCommit": oid} for name, oid in items.items()
                ]
                for kind, prefix, items in (("branches", "heads", repo.branches), ("tags", "tags", repo.tags))
            }
            return 200, {}, {**refs, "converts": []}
        if method == "GET" and action == "commits" and len(rest) == 2:
            repo = self._repo(repo_id)
            oid, history = self.hub._resolve(repo, rest[1]), []
            while oid is not None:
                commit = repo.commits[oid]
                history.append(
                    {
                        "id": oid,
                        "title": commit.title,
                        "message": commit.message,
                        "date": commit.date,
                        "authors": [{"user": commit.author}],
                    }
                )
                oid = commit.parent
            return 200, {}, history
        if method == "POST" and action in ("branch", "tag") and len(rest) == 2:
            repo = self._repo(repo_id, write=True)
            refs = repo.branches if action == "branch" else repo.tags
            name = rest[1] if action == "branch" else payload.get("tag", "")
            start = payload.get("startingPoint", "main") if action == "branch" else rest[1]
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]*", name) or ".." in name:
                raise HubError(400, f"Invalid {action} name {name!r}")
            if name in repo.branches or name in repo.tags:
                raise HubError(409, f"Reference {name!r} already exists")
            refs[name] = self.hub._resolve(repo, start)
            return 200, {}, {}
        self.hub.unknown.append(f"{method} {self.path}")
        raise HubError(404, f"no route for {method} {self.path}", "EntryNotFound")

    def _model_info(self, repo: Repo, revision: str) -> dict:
        oid = self.hub._resolve(repo, revision)
        commit = repo.commits[oid]
        card = {}
        if "README.md" in commit.tree:
            match = re.match(r"^---\s*\n(.*?)\n---", commit.tree["README.md"].content.decode(), flags=re.DOTALL)
            card = (yaml.safe_load(match[1]) or {}) if match else {}
        siblings = []
        for path, blob in sorted(commit.tree.items()):
            sibling = {"rfilename": path, "size": len(blob.content), "blobId": blob.oid}
            if blob.lfs:
                sibling["lfs"] = {"sha256": blob.sha256, "size": len(blob.content), "pointerSize": len(blob.pointer)}
            siblings.append(sibling)
        return {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "library_name": card.get("library_name"),
            "pipeline_tag": card.get("pipeline_tag"),
            "tags": list(card.get("tags") or []),
            "cardData": card or None,
            "siblings": siblings,
        }

    def _preupload(self, repo: Repo, revision: str, payload: dict):
        tree = repo.commits[self.hub._resolve(repo, revision)].tree
        files = []
        for item in payload.get("files", []):
            path, size = item["path"], item["size"]
            lfs = size >= LFS_SIZE or any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) for p in LFS_PATTERNS)
            existing = tree.get(path)
            oid = None if existing is None else (existing.sha256 if existing.lfs else existing.oid)
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return 200, {}, {"files": files, "commitOid": repo.branches.get(revision)}

    def _lfs_batch(self, repo_id: str, payload: dict):
        self._repo(repo_id, write=True)
        if payload.get("operation") != "upload":
            raise HubError(400, "this test Hub serves LFS downloads through /resolve, not the batch API")
        objects = []
        for obj in payload.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.hub.lfs_objects:
                key = secrets.token_hex(16)
                self.hub.upload_keys[key] = obj["oid"]
                entry["authenticated"] = True
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.url}/lfs-upload/{key}"},
                    "verify": {"href": f"{self.hub.url}/lfs-verify"},
                }
            objects.append(entry)
        return 200, {}, {"transfer": "basic", "objects": objects}

    def _lfs_upload(self, key: str, body: bytes):
        expected = self.hub.upload_keys.pop(key, None)
        if expected is None:
            raise HubError(403, "Upload URL expired or unknown")
        if hashlib.sha256(body).hexdigest() != expected:
            raise HubError(400, f"Uploaded content does not match its sha256 {expected}")
        self.hub.lfs_objects[expected] = body
        return 200, {}, {}

    def _commit(self, repo: Repo, revision: str, body: bytes):
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "A commit starts with a header line")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent is not None and not repo.branches[revision].startswith(parent):
            raise HubError(412, f"A commit has happened since {parent}: the branch is at {repo.branches[revision]}")
        tree = dict(repo.commits[repo.branches[revision]].tree)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                tree[value["path"]] = Blob(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                if value["oid"] not in self.hub.lfs_objects:
                    raise HubError(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                tree[value["path"]] = Blob(self.hub.lfs_objects[value["oid"]], lfs=True)
            elif key == "deletedFile":
                if tree.pop(value["path"], None) is None:
                    raise HubError(404, f"{value['path']} does not exist", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                tree = {path: blob for path, blob in tree.items() if not path.startswith(prefix)}
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        if "README.md" in tree:
            errors = validate_card_metadata(tree["README.md"].content.decode())
            if errors:
                raise HubError(400, "Invalid metadata in README.md: " + "; ".join(errors))
        user = self._user()
        oid = self.hub._commit(repo, revision, tree, header["summary"], header.get("description", ""), user)
        return (
            200,
            {},
            {
                "success": True,
                "commitOid": oid,
                "commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{oid}",
                "pullRequestUrl": None,
            },
        )

    def _tree(self, repo: Repo, revision: str, folder: str):
        oid = self.hub._resolve(repo, revision)
        tree = repo.commits[oid].tree
        recursive = self.query.get("recursive", "false").lower() in ("1", "true")
        prefix = folder.rstrip("/") + "/" if folder else ""
        if folder and folder not in tree and not any(path.startswith(prefix) for path in tree):
            raise HubError(404, f"{folder} does not exist at {revision}", "EntryNotFound")
        entries, folders = [], set()
        for path, blob in sorted(tree.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # the folders on the way to the file
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entry = {"type": "file", "oid": blob.oid, "size": len(blob.content), "path": path}
                if blob.lfs:
                    entry["lfs"] = {"oid": blob.sha256, "size": len(blob.content), "pointerSize": len(blob.pointer)}
                entries.append(entry)
        entries += [
            {"type": "directory", "oid": hashlib.sha1(name.encode()).hexdigest(), "size": 0, "path": name}
            for name in sorted(folders)
        ]
        return 200, {}, entries

    def _resolve_file(self, repo_id: str, revision: str, path: str):
        repo = self._repo(repo_id)
        oid = self.hub._resolve(repo, revision)
        blob = repo.commits[oid].tree.get(path)
        if blob is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        etag = f'"{blob.oid}"'
        headers = {"X-Repo-Commit": oid, "ETag": etag, "Accept-Ranges": "bytes"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.content))})
        content = blob.content
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and int(match[1]) < len(content):
            start = int(match[1])
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
            return 206, headers, content[start:]
        return 200, headers, content

    def _collections(self, method: str, rest: list[str], payload: dict):
        if method == "POST" and not rest:
            namespace, title = payload.get("namespace"), payload.get("title", "")
            self._writer(namespace)
            for slug, collection in self.hub.collections.items():
                if collection["owner"]["name"] == namespace and collection["title"] == title:
                    raise HubError(
                        409, "Collection already exists", body={"error": "Collection already exists", "slug": slug}
                    )
            slug = f"{namespace}/{re.sub(r'[^a-z0-9]+', '-', title.lower()).strip('-')}-{secrets.token_hex(12)}"
            self.hub.collections[slug] = {
                "slug": slug,
                "title": title,
                "description": payload.get("description"),
                "owner": {"name": namespace, "type": "org" if namespace not in self.hub.users else "user"},
                "items": [],
                "lastUpdated": _now(),
                "position": len(self.hub.collections),
                "private": bool(payload.get("private")),
                "theme": "indigo",
                "upvotes": 0,
            }
            return 200, {}, self.hub.collections[slug]
        slug = "/".join(rest[:2])
        collection = self.hub.collections.get(slug)
        if collection is None or (collection["private"] and self._user(required=False) is None):
            raise HubError(404, f"Collection {slug} not found")
        if method == "GET" and len(rest) == 2:
            return 200, {}, collection
        if method == "POST" and rest[2:] == ["items"]:
            self._writer(collection["owner"]["name"])
            item = payload.get("item", {})
            if item.get("type") == "model":
                self._repo(item.get("id", ""))
            if any(existing["id"] == item.get("id") for existing in collection["items"]):
                raise HubError(409, "Item already in the collection")
            collection["items"].append({
                "_id": secrets.token_hex(12),
                "id": item.get("id"),
                "type": item.get("type"),
                "position": len(collection["items"]),
                "note": {"text": payload["note"]} if payload.get("note") else None,
            })  # fmt: skip
            collection["lastUpdated"] = _now()
            return 200, {}, collection
        self.hub.unknown.append(f"{method} {self.path}")
        raise HubError(404, f"no route for {method} {self.path}")


__all__ = ["HubServer", "git_blob_oid", "validate_card_metadata"]
