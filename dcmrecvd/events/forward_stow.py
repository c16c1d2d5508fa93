"""Delivering stored objects to a DICOMweb server by STOW-RS, and what its answer means.

One POST per object, or per run of consecutive objects of one series
(``batch = "series"``, at most ``max_bytes``): a ``multipart/related;
type="application/dicom"`` body streamed from the stored files (never all in
memory), with its Content-Length computed up front (some servers refuse
chunked uploads).  Credentials come from a file or a systemd credential, go
only into the Authorization header, and are never logged.

The answer (PS3.18 10.5.3): 200 all stored; 202 some failed, 409 all failed,
each failure named in the Failed SOP Sequence (0008,1198) with its Failure
Reason (0008,1197): a duplicate (0x0111) per ``duplicate_status``, any other a
dead letter for that object.  408, 429 and 5xx are retried (Retry-After
honoured) and make the destination rest; 401 and 403 pause it; 400, 404, 413,
415 and any other status are dead letters for the objects sent.  A refused or
dropped connection, or a timeout, is a retry like DIMSE's.
"""

from __future__ import annotations

import base64
import os
import ssl
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from dcmrecvd.conf.forward import ForwardConfig
from dcmrecvd.errors import ConfigError
from dcmrecvd.events.forward_outcome import Delivery, Verdict
from dcmrecvd.wire.status import Status

_CHUNK = 1 << 20
_RETRY = {408, 429}
_PAUSE = {401, 403}
FAILED_SOP_SEQUENCE = "00081198"
SOP_INSTANCE = "00081155"
FAILURE_REASON = "00081197"


def read_secret(cfg: ForwardConfig, environ: Mapping[str, str]) -> str:
    """The token or password of a destination ("" when none); ConfigError if unreadable."""
    key = f"forward.{cfg.name}"
    if cfg.credential:
        directory = environ.get("CREDENTIALS_DIRECTORY", "")
        if not directory:
            raise ConfigError("configuration", key + ".credential", "$CREDENTIALS_DIRECTORY is not set")
        path = Path(directory) / cfg.credential
    elif cfg.token_file or cfg.password_file:
        path = Path(cfg.token_file or cfg.password_file)
    else:
        return ""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError("configuration", key, f"cannot read its secret: {exc.strerror}") from None
    return lines[0].strip() if lines else ""


class StowDestination:
    """STOW-RS to one ``[[forward]]`` destination of type stowrs."""

    def __init__(self, cfg: ForwardConfig, environ: Mapping[str, str]) -> None:
        self.cfg = cfg
        self.environ = environ
        #: The last secret read (its file is read again for each request: tokens are rotated
        #: into their file by other tools; one that cannot be read now keeps the last).
        self._secret = read_secret(cfg, environ)
        headers = {"Accept": "application/dicom+json"}
        verify: ssl.SSLContext | bool = False
        if cfg.tls_verify:
            verify = ssl.create_default_context()
            for ca in cfg.tls_ca_files:
                verify.load_verify_locations(ca)
        if cfg.tls_certificate and isinstance(verify, ssl.SSLContext):
            verify.load_cert_chain(cfg.tls_certificate, cfg.tls_private_key)
        self.client = httpx.Client(
            headers=headers,
            verify=verify,
            timeout=httpx.Timeout(cfg.timeout, connect=cfg.connect_timeout),
            limits=httpx.Limits(max_connections=cfg.max_associations),
            follow_redirects=False,
        )

    def _authorization(self) -> dict[str, str]:
        """The Authorization header, from the secret as its file says now."""
        try:
            self._secret = read_secret(self.cfg, self.environ)
        except ConfigError:
            pass  # being rewritten, or gone for a moment: the last one read
        if self.cfg.username:
            pair = f"{self.cfg.username}:{self._secret}".encode()
            return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
        return {"Authorization": f"Bearer {self._secret}"} if self._secret else {}

    def deliver(self, items: list[tuple[Path, Mapping[str, Any]]]) -> list[Delivery]:
        """POST the files as one multipart body; one verdict per file, in order."""
        paths = [path for path, _ in items]
        uids = [str(body.get("sop_instance_uid", "")) for _, body in items]
        try:
            sizes = [os.stat(p).st_size for p in paths]
        except FileNotFoundError as exc:
            gone = Delivery(Verdict.DEAD, f"the stored file is gone: {exc.filename}", label="dead")
            return [gone if str(p) == exc.filename else _again() for p in paths]
        boundary = uuid.uuid4().hex
        head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        tail = f"--{boundary}--\r\n".encode()
        length = sum(sizes) + len(paths) * (len(head) + 2) + len(tail)
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Content-Length": str(length),
            **self._authorization(),
        }
        try:
            response = self.client.post(self.cfg.url, content=_body(paths, head, tail), headers=headers)
        except httpx.TimeoutException as exc:
            return [_connection(f"timed out: {type(exc).__name__}")] * len(uids)
        except (httpx.TransportError, OSError) as exc:
            return [_connection(f"{type(exc).__name__}: {exc}")] * len(uids)
        return self._verdicts(response, uids)

    def _verdicts(self, response: httpx.Response, uids: list[str]) -> list[Delivery]:
        code = response.status_code
        text = f"HTTP {code}"
        if code in (200, 202, 409):
            failed = _failures(response)
            out = []
            for uid in uids:
                reason = failed.get(uid)
                if reason is None and code != 409:
                    out.append(Delivery(Verdict.DELIVERED, f"{text}: stored", label="delivered"))
                elif reason == Status.DUPLICATE_INSTANCE or (reason is None and code == 409):
                    delivered = self.cfg.duplicate_status == "delivered"
                    verdict = Verdict.DELIVERED if delivered else Verdict.DEAD
                    out.append(Delivery(verdict, f"{text}: already exists", label="duplicate"))
                else:
                    out.append(Delivery(Verdict.DEAD, f"{text}: failure reason 0x{reason:04X}", label="dead"))
            return out
        if code in _RETRY or code >= 500:
            after = _retry_after(response.headers.get("Retry-After", ""))
            return [Delivery(Verdict.RETRY, text, True, "retry", after)] * len(uids)
        if code in _PAUSE:
            return [Delivery(Verdict.PAUSE, f"{text}: not authorized", label="paused")] * len(uids)
        return [Delivery(Verdict.DEAD, f"{text}: {response.reason_phrase}", label="dead")] * len(uids)

    def close(self) -> None:
        self.client.close()

    def close_idle(self) -> None:
        """httpx closes idle keep-alive connections by itself."""


def _body(paths: list[Path], head: bytes, tail: bytes) -> Iterator[bytes]:
    for path in paths:
        yield head
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                yield chunk
        yield b"\r\n"
    yield tail


def _again() -> Delivery:
    return Delivery(Verdict.RETRY, "sent again with the rest of its batch", label="retry")


def _connection(reason: str) -> Delivery:
    return Delivery(Verdict.RETRY, reason, True, "retry")


def _retry_after(value: str) -> float:
    """Retry-After in seconds (a date form is taken as "the usual backoff")."""
    try:
        return max(0.0, float(value))
    except ValueError:
        return 0.0


def _failures(response: httpx.Response) -> dict[str, int]:
    """SOP Instance UID -> Failure Reason, from the answer's Failed SOP Sequence."""
    try:
        body: Any = response.json()
    except ValueError:
        return {}
    if isinstance(body, list):
        body = body[0] if body else {}
    if not isinstance(body, dict):
        return {}
    items = (body.get(FAILED_SOP_SEQUENCE) or {}).get("Value") or []
    out = {}
    for item in items:
        try:
            uid = str(item[SOP_INSTANCE]["Value"][0])
            out[uid] = int(item.get(FAILURE_REASON, {}).get("Value", [0x0110])[0])
        except (KeyError, IndexError, TypeError, ValueError):
            continue
    return out
