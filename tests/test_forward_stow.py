"""STOW-RS answers, each one: an HTTP server on loopback whose status and body the test sets,
and a daemon batching by series (Orthanc's DICOMweb plugin is the real peer in
test_forward_orthanc.py)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonFactory, wait_for
from forward_peers import ct, send, studies, write_config
from pydicom.uid import generate_uid

from dcmrecvd.conf.forward import ForwardConfig
from dcmrecvd.events.forward_outcome import Verdict
from dcmrecvd.events.forward_stow import StowDestination


@dataclass
class Request:
    headers: dict[str, str]
    parts: int
    #: The body ends with the closing boundary, exactly at Content-Length.
    whole: bool
    answered: int = 0


@dataclass
class StowServer:
    """Answers each POST with ``status`` (and ``body``, ``headers``); records what came."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                data = self.rfile.read(length)
                boundary = self.headers["Content-Type"].split("boundary=")[1].encode()
                whole = data.endswith(b"--" + boundary + b"--\r\n")
                parts = data.count(b"--" + boundary) - 1
                server.requests.append(Request(dict(self.headers), parts, whole, server.status))
                payload = json.dumps(server.body).encode() if server.body is not None else b""
                self.send_response(server.status)
                for key, value in server.headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *_args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.http.server_address[1]
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web/studies"

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def server() -> Iterator[StowServer]:
    s = StowServer()
    try:
        yield s
    finally:
        s.close()


def stored(tmp_path: Path, n: int) -> list[tuple[Path, dict[str, str]]]:
    items = []
    for i in range(n):
        ds = ct(generate_uid(prefix=None), i)
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        items.append((path, {"sop_instance_uid": str(ds.SOPInstanceUID)}))
    return items


def failed(uid: str, reason: int) -> dict[str, Any]:
    item = {"00081155": {"vr": "UI", "Value": [uid]}, "00081197": {"vr": "US", "Value": [reason]}}
    return {"00081198": {"vr": "SQ", "Value": [item]}}


def destination(server: StowServer, tmp_path: Path, **settings: Any) -> StowDestination:
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    cfg = ForwardConfig(name="web", type="stowrs", url=server.url, token_file=str(token), **settings)
    return StowDestination(cfg, {})


def test_one_multipart_body_and_a_failure_per_item(server: StowServer, tmp_path: Path) -> None:
    items = stored(tmp_path, 3)
    server.status, server.body = 202, failed(items[1][1]["sop_instance_uid"], 0xC000)
    verdicts = [o.verdict for o in destination(server, tmp_path).deliver(items)]
    assert verdicts == [Verdict.DELIVERED, Verdict.DEAD, Verdict.DELIVERED]
    (request,) = server.requests
    assert request.parts == 3 and request.headers["Authorization"] == "Bearer t0ken"
    assert 'type="application/dicom"' in request.headers["Content-Type"]
    assert request.whole, "Content-Length was exactly the body's"


@pytest.mark.parametrize(
    ("status", "headers", "body", "duplicate", "verdict", "retry_after"),
    [
        (200, {}, None, "delivered", Verdict.DELIVERED, 0.0),
        (409, {}, "duplicate", "delivered", Verdict.DELIVERED, 0.0),
        (409, {}, "duplicate", "dead", Verdict.DEAD, 0.0),
        (409, {}, "other", "delivered", Verdict.DEAD, 0.0),
        (429, {"Retry-After": "7"}, None, "delivered", Verdict.RETRY, 7.0),
        (503, {}, None, "delivered", Verdict.RETRY, 0.0),
        (408, {}, None, "delivered", Verdict.RETRY, 0.0),
        (401, {}, None, "delivered", Verdict.PAUSE, 0.0),
        (403, {}, None, "delivered", Verdict.PAUSE, 0.0),
        (400, {}, None, "delivered", Verdict.DEAD, 0.0),
        (413, {}, None, "delivered", Verdict.DEAD, 0.0),
        (415, {}, None, "delivered", Verdict.DEAD, 0.0),
        (302, {"Location": "http://elsewhere/"}, None, "delivered", Verdict.DEAD, 0.0),
    ],
)
def test_each_http_answer(
    server: StowServer,
    tmp_path: Path,
    status: int,
    headers: dict[str, str],
    body: str | None,
    duplicate: str,
    verdict: Verdict,
    retry_after: float,
) -> None:
    items = stored(tmp_path, 1)
    uid = items[0][1]["sop_instance_uid"]
    server.status, server.headers = status, headers
    server.body = {"duplicate": failed(uid, 0x0111), "other": failed(uid, 0xA900)}.get(body or "")
    (outcome,) = destination(server, tmp_path, duplicate_status=duplicate).deliver(items)
    assert outcome.verdict is verdict and str(status) in outcome.reason
    assert outcome.retry_after == retry_after


def test_nothing_listening_is_a_connection_retry(tmp_path: Path) -> None:
    cfg = ForwardConfig(name="web", type="stowrs", url="http://127.0.0.1:9/dicom-web/studies")
    (outcome,) = StowDestination(cfg, {}).deliver(stored(tmp_path, 1))
    assert outcome.verdict is Verdict.RETRY and outcome.connection


def test_a_series_goes_in_one_request(daemons: DaemonFactory, server: StowServer, tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cr3t-pw\n")
    write_config(
        daemons.config_dir,
        f'[[forward]]\nname = "web"\ntype = "stowrs"\nurl = "{server.url}"\nbatch = "series"\n'
        f'username = "u"\npassword_file = "{tmp_path / "pw"}"\nbackoff = 1\nbackoff_max = 1\n',
    )
    server.status = 503  # down while the study arrives: its objects wait, then go as one series
    d = daemons.start()
    objects = studies(1, 8)
    assert send(d.port, objects) == [0] * 8
    # Two more tries after the last ack: the second began after all 8 were here.
    count = len(server.requests)
    wait_for(lambda: len(server.requests) >= count + 2, timeout=20)
    server.status = 200
    wait_for(lambda: any(r.answered == 200 for r in server.requests), timeout=30)
    first = next(r for r in server.requests if r.answered == 200)
    assert first.parts == 8, "the waiting series went in one request"
    assert server.requests[-1].headers["Authorization"].startswith("Basic ")
    assert "s3cr3t-pw" not in d.log()


def test_a_rotated_token_is_read_again_for_each_request(server: StowServer, tmp_path: Path) -> None:
    """#34 item 9: a bearer token refreshed into its file by another tool is used from the
    next request on (a paused destination's probe included); none is logged."""
    items = stored(tmp_path, 1)
    web = destination(server, tmp_path)
    server.status = 401
    assert [o.verdict for o in web.deliver(items)] == [Verdict.PAUSE]
    (tmp_path / "token").write_text("n3w\n")
    server.status = 200
    assert [o.verdict for o in web.deliver(items)] == [Verdict.DELIVERED]
    assert [r.headers["Authorization"] for r in server.requests] == ["Bearer t0ken", "Bearer n3w"]
    (tmp_path / "token").unlink()  # mid-rotation: the last one read is kept
    web.deliver(items)
    assert server.requests[-1].headers["Authorization"] == "Bearer n3w"
