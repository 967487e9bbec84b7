"""`--push-to-hub` against a local HTTP server on 127.0.0.1 that speaks the part of the Hub API huggingface_hub's
`create_repo` + `upload_folder` use: repo creation, pre-upload (regular vs LFS), the LFS batch API with basic
PUT transfers, and the NDJSON commit. Exercised: auth header, regular and LFS files, skipping LFS objects the
server already has (re-run after an interruption), 401 and connection-refused errors. Not exercised: the real
Hub, Xet storage (the client's default when hf_xet is installed; disabled here), multi-part LFS.

    python -m pytest tests/test_export_hub.py -q
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from yarnkit.export.hub import push_folder
from yarnkit.errors import ExportError

TOKEN = "hf_local_test_token"


class FakeHub(BaseHTTPRequestHandler):
    lfs: dict[str, bytes] = {}      # oid -> content
    files: dict[str, bytes] = {}    # repo path -> content (committed)
    puts: list[str] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, status: int, body: dict | None = None):
        data = json.dumps(body or {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _authorised(self) -> bool:
        if self.headers.get("authorization") != f"Bearer {TOKEN}":
            self._reply(401, {"error": "Invalid credentials in Authorization header"})
            return False
        return True

    def do_PUT(self):  # basic LFS transfer
        oid = self.path.rsplit("/", 1)[-1]
        data = self._body()
        assert hashlib.sha256(data).hexdigest() == oid
        type(self).lfs[oid] = data
        type(self).puts.append(oid)
        self._reply(200)

    def do_POST(self):
        body = self._body()
        base = f"http://{self.headers['host']}"
        if not self._authorised():
            return
        if self.path == "/api/repos/create":
            request = json.loads(body)
            self._reply(200, {"url": f"{base}/{request.get('organization') or 'user'}/{request['name']}"})
        elif self.path == "/api/validate-yaml":  # the client checks the README's YAML header
            self._reply(200, {"errors": [], "warnings": []})
        elif "/preupload/" in self.path:
            files = json.loads(body)["files"]
            self._reply(200, {"files": [{"path": f["path"], "shouldIgnore": False,
                                         "uploadMode": "lfs" if f["path"].endswith((".safetensors", ".gguf"))
                                         else "regular"} for f in files]})
        elif self.path.endswith(".git/info/lfs/objects/batch"):
            objects = []
            for obj in json.loads(body)["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in self.lfs:
                    entry["actions"] = {"upload": {"href": f"{base}/lfs-upload/{obj['oid']}"}}
                objects.append(entry)
            self._reply(200, {"transfer": "basic", "objects": objects})
        elif "/commit/" in self.path:
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    type(self).files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "lfsFile":
                    type(self).files[item["value"]["path"]] = self.lfs[item["value"]["oid"]]
            repo = "/".join(self.path.split("/")[3:5])  # /api/models/{namespace}/{name}/commit/{revision}
            self._reply(200, {"commitUrl": f"{base}/{repo}/commit/0123abcd", "commitOid": "0123abcd" * 5})
        else:
            self._reply(404, {"error": f"not in the fake hub: {self.path}"})


@pytest.fixture
def hub(monkeypatch):
    FakeHub.lfs, FakeHub.files, FakeHub.puts = {}, {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    # With hf_xet installed upload_folder moves large files over Xet storage, which this server does not speak:
    # use the client's LFS path (what it does without hf_xet) so the large-file upload is exercised end to end.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def folder(tmp_path) -> Path:
    out = tmp_path / "export"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "llama"}')
    (out / "README.md").write_text("# card\n")
    (out / "model.safetensors").write_bytes(b"\x00weights" * 1000)
    return out


def test_push_uploads_regular_and_lfs_files_and_skips_lfs_already_there(hub, folder):
    url = push_folder(folder, "user/tiny-yarn", endpoint=hub)
    assert url.endswith("/user/tiny-yarn/commit/0123abcd")
    assert {p: FakeHub.files[p] for p in FakeHub.files} == {p.name: p.read_bytes() for p in folder.iterdir()}
    assert len(FakeHub.puts) == 1  # the safetensors went through LFS
    (folder / "README.md").write_text("# card, second version\n")
    push_folder(folder, "user/tiny-yarn", endpoint=hub)  # a re-run: the weights are not sent again
    assert len(FakeHub.puts) == 1 and FakeHub.files["README.md"] == b"# card, second version\n"


def test_push_with_a_bad_token_names_the_fix(hub, folder, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(ExportError, match="HTTP 401.*HF_TOKEN") as error:
        push_folder(folder, "user/tiny-yarn", endpoint=hub)
    assert "hf_wrong" not in str(error.value)  # the token is never echoed


def test_push_offline_says_so(folder, monkeypatch):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(ExportError, match="cannot reach"):
        push_folder(folder, "user/tiny-yarn", endpoint=f"http://127.0.0.1:{port}")


def test_cli_push_only_uploads_a_finished_export(hub, folder, monkeypatch, capsys):
    from yarnkit.cli import main

    monkeypatch.setenv("HF_ENDPOINT", hub)
    assert main(["export", str(folder), "--push-only", "--push-to-hub", "user/tiny-yarn"]) == 2  # not an export
    assert "finished export folder" in capsys.readouterr().err
    (folder / "export_report.json").write_text("{}")
    assert main(["export", str(folder), "--push-only", "--push-to-hub", "user/tiny-yarn"]) == 0
    assert "uploaded to" in capsys.readouterr().out and "export_report.json" in FakeHub.files
