"""Orthanc (Debian's 1.10.1) as a peer: in a network namespace of the test's own, since it
binds every interface (../shared/notes/orthanc.md)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conftest import free_port, wait_for


class Namespace:
    """A network namespace of our own, with its loopback up."""

    def __init__(self, name: str) -> None:
        self.name = name
        subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.name, *argv], stdout=out, stderr=subprocess.STDOUT, env=env
            )
        self.procs.append(proc)
        return proc

    def http(self, port: int, method: str, path: str, body: Any = None, data: bytes | None = None) -> Any:
        argv = ["ip", "netns", "exec", self.name, "curl", "-sS", "-f", "-X", method]
        payload = data if data is not None else (json.dumps(body).encode() if body is not None else None)
        if payload is not None:
            argv += ["--data-binary", "@-"]
        result = subprocess.run(
            [*argv, f"http://127.0.0.1:{port}{path}"], input=payload, capture_output=True, timeout=60
        )
        if result.returncode != 0:
            raise RuntimeError(f"{method} {path}: {result.stderr.decode(errors='replace')}")
        return json.loads(result.stdout) if result.stdout.strip() else None

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        subprocess.run(["ip", "netns", "delete", self.name], check=False)


def own_namespace() -> Iterator[Namespace]:
    """A namespace for one test (yield from it in the test module's fixture)."""
    ns = Namespace(f"dcmrc{os.getpid()}")
    try:
        yield ns
    finally:
        ns.close()


def orthanc_up(
    ns: Namespace,
    tmp_path: Path,
    modalities: dict[str, Any] | None = None,
    ports: tuple[int, int] | None = None,
    **settings: Any,
) -> tuple[int, int]:
    """Orthanc in ``ns`` with its own storage under ``tmp_path``, answering HTTP; its
    (DICOM port, HTTP port).  ``settings`` are more of its configuration keys."""
    dicom, http = ports or (free_port(), free_port())
    storage = tmp_path / "orthanc"
    storage.mkdir(exist_ok=True)
    config = {
        "Name": "modality",
        "DicomAet": "ORTHANC",
        "DicomPort": dicom,
        "HttpPort": http,
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "OrthancExplorerEnabled": False,
        "SaveJobs": False,
        "Plugins": [],
        "DicomModalities": modalities or {},
        **settings,
    }
    path = tmp_path / "orthanc.json"
    path.write_text(json.dumps(config))
    proc = ns.spawn(["/usr/sbin/Orthanc", str(path)], tmp_path / "orthanc.log")

    CURL_STATUS = ["ip", "netns", "exec", ns.name, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}"]

    def answers() -> bool:
        assert proc.poll() is None, (tmp_path / "orthanc.log").read_text(errors="replace")[-2000:]
        code = subprocess.run(  # any HTTP answer (401 with authentication on) means it is up
            [*CURL_STATUS, f"http://127.0.0.1:{http}/system"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        return code not in ("", "000")

    wait_for(answers, timeout=60, interval=0.2)
    return dicom, http
