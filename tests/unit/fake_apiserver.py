"""The in-memory API (`FakeKube`) served over HTTP, to test the real `agent.kube.Kube` adapter.

Only the paths the agent calls are served, with the API's JSON: objects, lists with `limit` and
`continue`, watch streams of newline-delimited events (410 as an in-stream ERROR event, as the
apiserver sends it), and `Status` bodies for errors. Plain HTTP on 127.0.0.1.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from agent.kube import ApiError
from devkit.fake_kube import FakeKube

PV_PATH = re.compile(r"^/api/v1/persistentvolumes(?:/([^/]+))?$")
NODE_PATH = re.compile(r"^/api/v1/nodes/([^/]+)$")
SC_PATH = re.compile(r"^/apis/storage\.k8s\.io/v1/storageclasses/([^/]+)$")
EVENT_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/events$")
JOB_PATH = re.compile(r"^/apis/batch/v1/namespaces/([^/]+)/jobs(?:/([^/]+))?$")


class _Handler(BaseHTTPRequestHandler):
    fake: FakeKube
    seen: list[tuple[str, str]]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def _send(self, status: int, body: Any, retry_after: float | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        if retry_after is not None:  # a 429's, as the apiserver sends it
            self.send_header("Retry-After", f"{retry_after:g}")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _fail(self, error: ApiError) -> None:
        self._send(error.status or 500, {"kind": "Status", "status": "Failure",
                                         "message": str(error), "code": error.status},
                   error.retry_after)

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PATCH(self) -> None:
        self._route("PATCH")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def _route(self, method: str) -> None:
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.seen.append((method, url.path))
        try:
            self._dispatch(method, url.path, query)
        except ApiError as error:
            self._fail(error)

    def _dispatch(self, method: str, path: str, query: dict[str, str]) -> None:
        if m := PV_PATH.match(path):
            self._pvs(method, m[1], query)
        elif m := JOB_PATH.match(path):
            self._jobs(method, m[1], m[2])
        else:
            self._others(path)

    def _others(self, path: str) -> None:
        fake = self.fake
        if m := NODE_PATH.match(path):
            node = fake.get_node(m[1])
            self._send(200, {"metadata": {"name": node.name, "uid": node.uid,
                                          "labels": dict(node.labels)}})
            return
        if m := SC_PATH.match(path):
            sc = fake.get_storage_class(m[1])
            if sc is None:
                raise ApiError("get", 404, "not found")
            self._send(200, sc)
            return
        if EVENT_PATH.match(path):
            body = self._body()
            fake.emit_event(body["involvedObject"], body["type"], body["reason"],
                            body["message"], body["source"]["host"])
            self._send(201, body)
            return
        raise ApiError("route", 404, f"no route for {path}")

    def _jobs(self, method: str, namespace: str, name: str | None) -> None:
        if method == "POST":
            self._send(201, self.fake.create_job(self._body()))
        elif method == "GET":
            job = self.fake.get_job(namespace, name or "")
            if job is None:
                raise ApiError("get", 404, "not found")
            self._send(200, job)
        else:
            self.fake.delete_job(namespace, name or "")
            self._send(200, {"kind": "Status", "status": "Success"})

    def _pvs(self, method: str, name: str | None, query: dict[str, str]) -> None:
        fake = self.fake
        if method == "GET" and name:
            pv = fake.get_pv(name)
            if pv is None:
                raise ApiError("get", 404, f'persistentvolumes "{name}" not found')
            self._send(200, pv)
        elif method == "GET" and query.get("watch") in ("true", "1"):
            self._watch(query)
        elif method == "GET":
            self._list(query)
        elif method == "POST":
            self._send(201, fake.create_pv(self._body()))
        elif method == "PATCH" and name:
            meta = self._body().get("metadata") or {}
            if "labels" in meta:
                self._send(200, fake.patch_pv_labels(name, meta.get("uid", ""), meta["labels"]))
            else:
                self._send(200, fake.patch_pv_annotations(
                    name, meta.get("resourceVersion", ""), meta.get("annotations") or {}))
        elif name:
            pre = self._body().get("preconditions") or {}
            fake.delete_pv(name, pre.get("uid", ""), pre.get("resourceVersion"))
            self._send(200, {"kind": "Status", "status": "Success"})

    def _list(self, query: dict[str, str]) -> None:
        items = [pv for pv, _ in self.fake.list_pvs(query.get("labelSelector", ""), 1 << 30)]
        limit = int(query.get("limit") or 0) or len(items) or 1
        start = int(query.get("continue") or 0)
        page = items[start:start + limit]
        meta = {"resourceVersion": str(self.fake.rv)}
        if start + limit < len(items):
            meta["continue"] = str(start + limit)
        self._send(200, {"kind": "PersistentVolumeList", "metadata": meta, "items": page})

    def _watch(self, query: dict[str, str]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()  # HTTP/1.0: the stream ends when the connection closes
        try:
            for kind, obj in self.fake.watch_pvs(query.get("labelSelector", ""),
                                                 query.get("resourceVersion", "")):
                self.wfile.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
                self.wfile.flush()
        except ApiError as error:
            status = {"kind": "Status", "code": error.status, "message": str(error),
                      "reason": "Expired" if error.status == 410 else "InternalError"}
            self.wfile.write(json.dumps({"type": "ERROR", "object": status}).encode() + b"\n")


@contextmanager
def serving(fake: FakeKube, workdir: Path) -> Iterator[tuple[Path, list[tuple[str, str]]]]:
    """Serve `fake` on a free port; yields a kubeconfig for it and the requests seen."""
    seen: list[tuple[str, str]] = []
    handler = type("Handler", (_Handler,), {"fake": fake, "seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    kubeconfig = workdir / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {
            "server": f"http://127.0.0.1:{server.server_address[1]}"}}],
        "users": [{"name": "agent", "user": {"token": "t"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "agent"}}],
    }))
    try:
        yield kubeconfig, seen
    finally:
        fake.close()
        server.shutdown()
        server.server_close()
