"""`hf://` inputs through fsspec's Hugging Face filesystem (huggingface_hub's HfFileSystem), offline.

A loopback HTTP server plays the Hub for the few endpoints HfFileSystem calls to list a repo, stat
files and read byte ranges: ``GET /api/models/{repo}/revision/{rev}`` (does the repo exist, which
commit), ``GET /api/models/{repo}/tree/{rev}/{path}`` (ls), ``POST /api/models/{repo}/paths-info/
{rev}`` (info), ``GET|HEAD /{repo}/resolve/{rev}/{path}`` with ``Range`` (reads), and the client's
``/api/agent-harnesses`` user-agent registry (served empty). Every other
request is answered 404 and recorded, so a test notices an unexpected call. It serves plain
(non-Xet) files, one revision (``main``, or the fixed commit sha), public repos, no pagination.
``HF_ENDPOINT`` points the Hub client at the server and offline mode is lifted (the conftest sets
``HF_HUB_OFFLINE=1``) only for the driver of these tests and for a Ray started for them, so nothing
can reach the real Hub.
"""

from __future__ import annotations

import email.parser
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import pytest
import ray
import torch
from safetensors.torch import load_file

from pipeline.cli import main

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_API_REVISION = re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")
_API_TREE = re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
_API_PATHS_INFO = re.compile(rf"^/api/models/{_REPO}/paths-info/(?P<rev>[^/]+)$")
_RESOLVE = re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass(frozen=True)
class HubRequest:
    method: str
    path: str
    range: str | None
    status: int


@dataclass
class LoopbackHub:
    """Model repos served from local folders: repo id -> folder."""

    repos: dict[str, Path] = field(default_factory=dict)
    requests: list[HubRequest] = field(default_factory=list)
    endpoint: str = ""

    def sha(self, repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()

    def knows(self, repo: str, revision: str) -> bool:
        return repo in self.repos and unquote(revision) in ("main", self.sha(repo))

    def entry(self, repo: str, relative: str) -> dict | None:
        path = self.repos[repo] / relative if relative else self.repos[repo]
        if not path.exists():
            return None
        if path.is_dir():
            return {"type": "directory", "oid": hashlib.sha1(relative.encode()).hexdigest(), "size": 0, "path": relative}
        data = path.read_bytes()
        return {"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": relative}

    def children(self, repo: str, relative: str, recursive: bool) -> list[dict] | None:
        folder = self.repos[repo] / relative if relative else self.repos[repo]
        if not folder.is_dir():
            return None
        paths = folder.rglob("*") if recursive else folder.iterdir()
        entries = [self.entry(repo, p.relative_to(self.repos[repo]).as_posix()) for p in sorted(paths)]
        return [e for e in entries if e is not None]


def _handler(hub: LoopbackHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
            url = urlparse(self.path)
            hub.requests.append(HubRequest(self.command, unquote(url.path), self.headers.get("Range"), status))
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, value: object, extra: dict | None = None) -> None:
            self._send(status, json.dumps(value).encode(), {"Content-Type": "application/json", **(extra or {})})

        def _not_found(self, code: str, head: bool = False) -> None:
            self._send(404, b"{}" if not head else b"", {"X-Error-Code": code, "Content-Type": "application/json"}, head)

        def do_GET(self) -> None:
            self._get(head=False)

        def do_HEAD(self) -> None:
            self._get(head=True)

        def _get(self, head: bool) -> None:
            url = urlparse(self.path)
            path = unquote(url.path)
            if match := _API_REVISION.match(path):
                repo, rev = match["repo"], match["rev"] or "main"
                if not hub.knows(repo, rev):
                    return self._not_found("RepoNotFound")
                siblings = [{"rfilename": e["path"]} for e in hub.children(repo, "", True) or [] if e["type"] == "file"]
                return self._json(200, {"id": repo, "modelId": repo, "sha": hub.sha(repo), "private": False,
                                        "siblings": siblings})
            if match := _API_TREE.match(path):
                repo, rev = match["repo"], match["rev"]
                if not hub.knows(repo, rev):
                    return self._not_found("RevisionNotFound")
                recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true"
                listing = hub.children(repo, (match["path"] or "").strip("/"), recursive)
                if listing is None:
                    return self._not_found("EntryNotFound")
                return self._json(200, listing)
            if match := _RESOLVE.match(path):
                return self._resolve(match["repo"], match["rev"], match["path"], head)
            if path == "/api/agent-harnesses":  # the client's user-agent registry: an empty one
                return self._json(200, {"standardEnvVars": [], "harnesses": {}})
            return self._not_found("Unknown", head)

        def _resolve(self, repo: str, rev: str, relative: str, head: bool) -> None:
            if not hub.knows(repo, rev):
                return self._not_found("RepoNotFound", head)
            file = hub.repos[repo] / relative
            if not file.is_file():
                return self._not_found("EntryNotFound", head)
            data = file.read_bytes()
            headers = {
                "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                "X-Repo-Commit": hub.sha(repo),
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            requested = self.headers.get("Range")
            if requested and (match := _RANGE.match(requested)):
                start = int(match[1])
                stop = min(int(match[2]) + 1 if match[2] else len(data), len(data))
                headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
                return self._send(206, data[start:stop], headers, head)
            return self._send(200, data, headers, head)

        def do_POST(self) -> None:
            path = unquote(urlparse(self.path).path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            match = _API_PATHS_INFO.match(path)
            if not match:
                return self._not_found("Unknown")
            repo, rev = match["repo"], match["rev"]
            if not hub.knows(repo, rev):
                return self._not_found("RevisionNotFound")
            paths = _form_paths(self.headers.get("Content-Type", ""), body)
            entries = [hub.entry(repo, p.strip("/")) for p in paths]
            return self._json(200, [e for e in entries if e is not None])

    return Handler


def _form_paths(content_type: str, body: bytes) -> list[str]:
    """The ``paths`` of a paths-info request, sent as a form or as JSON."""
    if "json" in content_type:
        return list(json.loads(body or b"{}").get("paths", []))
    if "multipart" in content_type:
        message = email.parser.BytesParser().parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
        return [part.get_payload(decode=True).decode() for part in message.get_payload()
                if part.get_param("name", header="content-disposition") == "paths"]
    return parse_qs(body.decode()).get("paths", [])


@pytest.fixture(scope="module")
def hub() -> Iterator[LoopbackHub]:
    state = LoopbackHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def hub_client(hub: LoopbackHub, monkeypatch: pytest.MonkeyPatch) -> LoopbackHub:
    """This process's Hub client pointed at the loopback hub, offline mode lifted.

    huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when it is imported, so the constants they
    set are patched to what they would have been had the variables been set before the import.
    """
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    import fsspec

    fsspec.filesystem("hf").clear_instance_cache()
    hub.requests.clear()
    return hub


@pytest.fixture(scope="module")
def ray_for_hub(hub: LoopbackHub) -> Iterator[None]:
    """A local Ray whose workers talk to the loopback hub: worker environments are fixed at start,
    so a running Ray (whose workers inherited HF_HUB_OFFLINE=1) is replaced for this module."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=256 * 1024 * 1024,
        log_to_driver=False,
        logging_level="WARNING",
        runtime_env={"env_vars": {"HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0"}},
    )
    yield
    ray.shutdown()  # the next test's ray_local fixture starts a plain one again


def _recipe(base: str, finetunes: list[str]) -> str:
    models = "\n".join(f"  - model: {url}" for url in finetunes)
    return f"merge_method: model_stock\nbase_model: {base}\nmodels:\n{models}\ndtype: float32\n"


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.slow
def test_merge_reads_hf_urls_through_hf_filesystem(tiny_family, hub_client, ray_for_hub, tmp_path):
    repos = {"user/tiny-base": tiny_family.base}
    repos.update({f"user/tiny-ft-{i + 1}": path for i, path in enumerate(tiny_family.finetunes)})
    hub_client.repos.update(repos)
    names = list(repos)

    hf_recipe = tmp_path / "hf.yml"
    hf_recipe.write_text(_recipe(f"hf://{names[0]}", [f"hf://{name}" for name in names[1:]]))
    assert main(["merge", str(hf_recipe), str(tmp_path / "from-hf"), "--quiet"]) == 0

    local_recipe = tmp_path / "local.yml"
    local_recipe.write_text(_recipe(str(tiny_family.base), [str(p) for p in tiny_family.finetunes]))
    assert main(["merge", str(local_recipe), str(tmp_path / "from-disk"), "--quiet"]) == 0

    from_hf, from_disk = _tensors(tmp_path / "from-hf"), _tensors(tmp_path / "from-disk")
    assert sorted(from_hf) == sorted(from_disk) and from_hf
    for name, tensor in from_disk.items():
        assert torch.equal(from_hf[name], tensor), name
    assert (tmp_path / "from-hf" / "config.json").read_bytes() == (tiny_family.base / "config.json").read_bytes()
    manifest = json.loads((tmp_path / "from-hf" / "modelstock-manifest.json").read_text())
    assert f"hf://{names[0]}" in json.dumps(manifest)

    # Every repo's weights were read through the Hub's resolve endpoint with byte ranges (headers by
    # the driver, tensors by the Ray workers), and the client made no call the server does not know.
    requests = list(hub_client.requests)
    assert all(r.status in (200, 206) for r in requests), [r for r in requests if r.status not in (200, 206)]
    for name in names:
        reads = [r for r in requests if r.path == f"/{name}/resolve/main/model.safetensors"]
        assert reads and all(r.method == "GET" and r.range and r.range.startswith("bytes=") for r in reads), name


def test_missing_hf_repo_is_bad_input(tiny_family, hub_client, ray_for_hub, tmp_path, capsys):
    hub_client.repos["user/tiny-base"] = tiny_family.base
    recipe = tmp_path / "missing.yml"
    recipe.write_text(_recipe("hf://user/tiny-base", ["hf://user/no-such-repo", "hf://user/tiny-base-2"]))
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--quiet"]) == 2
    assert "hf://user/no-such-repo" in capsys.readouterr().err
    assert not any(r.path.startswith("/user/no-such-repo/resolve") for r in hub_client.requests)


@pytest.mark.slow
def test_models_named_by_bare_hub_ids_and_revisions(tiny_family, hub_client, ray_for_hub, tmp_path, monkeypatch):
    """``org/model`` and ``org/model@revision`` (no local folder of that name) are hub repos, as in
    mergekit and transformers; the revision is the one read."""
    repos = {"user/tiny-base": tiny_family.base}
    repos.update({f"user/tiny-ft-{i + 1}": path for i, path in enumerate(tiny_family.finetunes)})
    hub_client.repos.update(repos)
    monkeypatch.chdir(tmp_path)  # no local folder named user/...
    pinned = f"user/tiny-ft-1@{hub_client.sha('user/tiny-ft-1')}"
    recipe = tmp_path / "bare.yml"
    recipe.write_text(_recipe("user/tiny-base", [pinned, "user/tiny-ft-2"]))
    assert main(["merge", str(recipe), str(tmp_path / "from-ids"), "--quiet"]) == 0
    reference = tmp_path / "local.yml"
    reference.write_text(_recipe(str(tiny_family.base), [str(p) for p in tiny_family.finetunes[:2]]))
    assert main(["merge", str(reference), str(tmp_path / "from-disk"), "--quiet"]) == 0
    from_ids, from_disk = _tensors(tmp_path / "from-ids"), _tensors(tmp_path / "from-disk")
    assert sorted(from_ids) == sorted(from_disk)
    for name, tensor in from_disk.items():
        assert torch.equal(from_ids[name], tensor), name
    manifest = json.dumps(json.loads((tmp_path / "from-ids" / "modelstock-manifest.json").read_text()))
    assert f"hf://{pinned}" in manifest and "hf://user/tiny-base" in manifest
    sha = hub_client.sha("user/tiny-ft-1")
    assert any(r.path == f"/user/tiny-ft-1/resolve/{sha}/model.safetensors" for r in hub_client.requests)
