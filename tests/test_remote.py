"""Outgoing associations (dcmrecvd.remote) against a real remote: DCMTK's dcmrecv, plain and
with TLS that requires our client certificate.  The pool reuses, bounds, closes when idle,
drops what broke, and sends a stored file's dataset without decoding it."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, need, port_open, wait_for
from datasets import make_dataset, write
from peers import RawClient, dataset_offset
from pki import CA

from dcmrecvd.remote.client import AssociationFailed, NoContext
from dcmrecvd.remote.peers import ClientTLS, Remote
from dcmrecvd.remote.pool import AssociationPool, PoolExhausted, RemoteUnavailable
from dcmrecvd.wire import pdu
from dcmrecvd.wire.requestor import proposals

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
#: DCMTK's own profile file (ours uses names DCMTK 3.6.7 does not know yet).
DCMTK_PROFILES = "/etc/dcmtk/storescp.cfg"
CONTEXTS = proposals([(CT, (EXPLICIT, "1.2.840.10008.1.2")), ("1.2.840.10008.1.1", ("1.2.840.10008.1.2",))])


class Dcmrecv:
    """DCMTK's dcmrecv on a free loopback port, storing into ``out``; killed by PID at the end."""

    def __init__(self, out: Path, *extra: str) -> None:
        self.port = free_port()
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [need("dcmrecv"), "-xf", DCMTK_PROFILES, "Default", "-od", str(out), *extra, str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: port_open(self.port) or self.proc.poll() is not None, timeout=20)
        assert self.proc.poll() is None, "dcmrecv did not start"

    def files(self) -> list[Path]:
        return sorted(p for p in self.out.rglob("*") if p.is_file() and ".dcmrecvd" not in p.parts)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def remote_scp(tmp_path: Path) -> Iterator[Dcmrecv]:
    scp = Dcmrecv(tmp_path / "remote")
    try:
        yield scp
    finally:
        scp.stop()


def objects(tmp_path: Path, n: int) -> list[Path]:
    folder = tmp_path / "send"
    folder.mkdir(exist_ok=True)
    return [write(make_dataset(rows=32, columns=32, seed=i), folder / f"ct{i}.dcm") for i in range(n)]


def test_one_association_carries_many_objects_sent_as_stored(remote_scp: Dcmrecv, tmp_path: Path) -> None:
    pool = AssociationPool(Remote("STORESCP", "127.0.0.1", remote_scp.port), CONTEXTS)
    sent = objects(tmp_path, 3)
    for path in sent:
        with pool.association() as assoc:
            assert assoc.store(path).status == 0
    assert pool.opened == 1 and pool.idle == 1 and pool.in_use == 0
    pool.close()
    got = remote_scp.files()
    assert len(got) == 3
    datasets = {p.read_bytes()[dataset_offset(p.read_bytes()) :] for p in sent}
    assert {p.read_bytes()[dataset_offset(p.read_bytes()) :] for p in got} == datasets  # byte for byte


def test_the_pool_is_bounded_and_a_waiting_borrower_gets_the_returned_one(remote_scp: Dcmrecv) -> None:
    pool = AssociationPool(Remote("STORESCP", "127.0.0.1", remote_scp.port, max_associations=1), CONTEXTS)
    got: list[object] = []

    def borrower() -> None:
        with pool.association(wait=10) as assoc:
            got.append(assoc)

    with pool.association() as first:
        with pytest.raises(PoolExhausted), pool.association(wait=0.2):
            pass
        waiter = threading.Thread(target=borrower, daemon=True)
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive() and not got  # it waits: the one association is ours
    waiter.join(10)
    assert got == [first] and pool.opened == 1  # handed over, not a second one opened
    pool.close()


def test_idle_associations_are_released_and_broken_ones_dropped(remote_scp: Dcmrecv, tmp_path: Path) -> None:
    now = [1000.0]
    pool = AssociationPool(
        Remote("STORESCP", "127.0.0.1", remote_scp.port, idle_close=5), CONTEXTS, clock=lambda: now[0]
    )
    with pool.association() as assoc:
        assert assoc.echo() == 0
    now[0] += 4
    assert pool.close_idle() == 0 and pool.idle == 1
    now[0] += 2
    assert pool.close_idle() == 1 and pool.idle == 0
    assert not assoc.is_established
    with pytest.raises(RuntimeError), pool.association() as broken:
        raise RuntimeError("a DIMSE timeout, say")
    assert broken.is_aborted and pool.idle == 0 and pool.in_use == 0
    with pool.association() as fresh:
        assert fresh is not broken and fresh.echo() == 0
    assert pool.opened == 3
    # An object of a SOP class the remote did not accept is refused before anything is
    # sent: an answer about that object, not about the association, which stays.
    path = write(make_dataset("1.2.840.10008.5.1.4.1.1.7", rows=8, columns=8), tmp_path / "sc.dcm")
    with pytest.raises(NoContext), pool.association() as same:
        same.store(path)
    assert same is fresh and same.is_established and pool.idle == 1 and pool.opened == 3
    pool.close()


def test_an_unreachable_or_refusing_remote_is_named(remote_scp: Dcmrecv) -> None:
    nobody = AssociationPool(Remote("STORESCP", "127.0.0.1", free_port(), connect_timeout=2), CONTEXTS)
    started = time.monotonic()
    with pytest.raises(RemoteUnavailable) as info, nobody.association():
        pass
    assert info.value.why in ("unreachable", "aborted") and time.monotonic() - started < 5
    assert nobody.in_use == 0
    # dcmrecv refuses a context it was not configured for? It accepts the rest; an AE that
    # proposes nothing it accepts is rejected.
    nothing = AssociationPool(
        Remote("STORESCP", "127.0.0.1", remote_scp.port), proposals([("1.2.3.4.5.6.7", (EXPLICIT,))])
    )
    with pytest.raises(RemoteUnavailable), nothing.association():
        pass


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[CA, object, object]:
    need("openssl")
    base = tmp_path_factory.mktemp("pki")
    root = CA(base / "root", "Remote Test Root")
    return root, root.issue("localhost"), root.issue("dcmrecvd-client")


def test_tls_with_our_client_certificate(pki: tuple[CA, object, object], tmp_path: Path) -> None:
    root, server, client = pki
    scp = Dcmrecv(
        tmp_path / "tls",
        "+tls",
        str(server.key),  # type: ignore[attr-defined]
        str(server.cert),  # type: ignore[attr-defined]
        "+cf",
        str(root.cert),
    )
    try:
        ours = ClientTLS(
            certificate=str(client.cert),  # type: ignore[attr-defined]
            private_key=str(client.key),  # type: ignore[attr-defined]
            ca_files=(str(root.cert),),
            server_name="localhost",
        )
        pool = AssociationPool(Remote("STORESCP", "127.0.0.1", scp.port, tls=ours), CONTEXTS)
        with pool.association() as assoc:
            assert assoc.store(objects(tmp_path, 1)[0]).status == 0
        pool.close()
        assert len(scp.files()) == 1
        # Without a client certificate, dcmrecv (which requires one) refuses the handshake.
        anonymous = AssociationPool(
            Remote("STORESCP", "127.0.0.1", scp.port, tls=ClientTLS(ca_files=(str(root.cert),))), CONTEXTS
        )
        with pytest.raises(RemoteUnavailable), anonymous.association():
            pass
    finally:
        scp.stop()


class SilentRemote:
    """A remote that accepts the association (with dcmrecvd's own acceptor) and then never
    answers a request: what a hung PACS looks like.  Records the PDU types it received."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received: list[int] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        from test_requestor import answer_of_our_acceptor

        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(10)
            reader = RawClient(sock=conn)
            kind, body = reader.read_pdu()
            self.received.append(kind)
            conn.sendall(answer_of_our_acceptor(pdu.PDU_HEADER.pack(kind, len(body)) + body))
            try:
                while True:
                    kind, _ = reader.read_pdu()
                    self.received.append(kind)
            except (ConnectionError, OSError):
                pass

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)


def test_a_remote_that_never_answers_is_aborted_at_the_dimse_timeout(tmp_path: Path) -> None:
    silent = SilentRemote()
    try:
        pool = AssociationPool(Remote("ARCHIVE", "127.0.0.1", silent.port, dimse_timeout=0.5), CONTEXTS)
        started = time.monotonic()
        with pytest.raises(AssociationFailed), pool.association() as assoc:
            assoc.store(objects(tmp_path, 1)[0])
        assert 0.5 <= time.monotonic() - started < 3
        assert assoc.is_aborted and pool.idle == 0 and pool.in_use == 0
        silent.thread.join(10)
        assert silent.received[0] == pdu.A_ASSOCIATE_RQ and silent.received[-1] == pdu.A_ABORT
        assert pdu.P_DATA_TF in silent.received  # the request went out, then the abort
    finally:
        silent.close()
