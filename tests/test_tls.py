"""TLS with real peers: DCMTK storescu/echoscu with +tls and Python ssl clients,
against certificates the tests make with openssl."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import time
from pathlib import Path

import pytest
from conftest import DaemonFactory, dcmrecvd, isolated_env, need, run, wait_for
from datasets import make_dataset, write
from notify import NotifySocket
from peers import trickle
from pki import CA, Issued, chain_file, to_der
from pynetdicom import AE
from test_receive import stored

from dcmrecvd.serve import tls

VERIFICATION = "1.2.840.10008.1.1"


class PKI:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = CA(base / "root", "Test Root CA")
        self.other = CA(base / "other", "Other CA")
        self.sub = CA(base / "sub", "Test Sub CA", parent=self.root)
        self.server = self.root.issue("localhost")
        self.server2 = self.root.issue("localhost-renewed")
        self.client = self.root.issue("client")
        self.stranger = self.other.issue("stranger")
        self.expired = self.root.issue("expired", start="20200101000000Z", end="20210101000000Z")
        self.revoked = self.root.issue("revoked")
        self.root.revoke(self.revoked.cert)
        self.sub_client = self.sub.issue("subclient")
        self.sub_client_chain = chain_file(base / "subclient-chain.pem", self.sub_client.cert, self.sub.cert)
        self.root_crl_leaf = self.root.crl(base / "root-leaf.crl")
        self.root.revoke(self.sub.cert)
        self.root_crl = self.root.crl(base / "root.crl")
        self.sub_crl = self.sub.crl(base / "sub.crl")
        self.encrypted = self.root.issue("encrypted", password="s3cret")
        self.der = to_der(self.server, base)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    need("openssl")
    return PKI(tmp_path_factory.mktemp("pki"))


def tls_args(pki: PKI, server: Issued | None = None, *extra: str) -> list[str]:
    server = server or pki.server
    return ["+tls", str(server.key), str(server.cert), "+cf", str(pki.root.cert), *extra]


def echoscu(port: int, *args: str) -> int:
    return run([need("echoscu"), *args, "127.0.0.1", str(port)], timeout=60).returncode


def client_tls(pki: PKI, who: Issued | None) -> list[str]:
    if who is None:
        return ["+tla", "+cf", str(pki.root.cert)]
    return ["+tls", str(who.key), str(who.cert), "+cf", str(pki.root.cert)]


def python_client(
    pki: PKI,
    port: int,
    cert: Issued | None = None,
    sni: str | None = None,
    maximum: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(pki.root.cert))
    ctx.check_hostname = False
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
    if maximum is not None:
        ctx.maximum_version = maximum
    if ciphers:
        ctx.set_ciphers(ciphers)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname=sni)


def test_store_and_echo_over_tls(daemons: DaemonFactory, pki: PKI, tmp_path: Path) -> None:
    d = daemons.start(*tls_args(pki))
    assert echoscu(d.port, *client_tls(pki, pki.client)) == 0
    path = write(make_dataset(rows=16, columns=16), tmp_path / "a.dcm")
    result = run([need("storescu"), *client_tls(pki, pki.client), "127.0.0.1", str(d.port), str(path)])
    assert result.returncode == 0, result.stderr
    assert len(stored(d.output)) == 1
    log = d.log()
    assert "tls_peer_subject='commonName=client'" in log
    assert "tls_protocol=TLSv1." in log and "tls_cipher=" in log


@pytest.mark.parametrize(
    ("mode", "none_ok", "stranger_ok", "client_ok"),
    [("-rc", False, False, True), ("-vc", True, False, True), ("-ic", True, True, True)],
)
def test_peer_authentication_modes(
    daemons: DaemonFactory, pki: PKI, mode: str, none_ok: bool, stranger_ok: bool, client_ok: bool
) -> None:
    d = daemons.start(*tls_args(pki, None, mode))
    assert (echoscu(d.port, *client_tls(pki, None)) == 0) is none_ok
    stranger = ["+tls", str(pki.stranger.key), str(pki.stranger.cert), "+cf", str(pki.root.cert)]
    assert (echoscu(d.port, *stranger) == 0) is stranger_ok
    assert (echoscu(d.port, *client_tls(pki, pki.client)) == 0) is client_ok
    assert d.proc.poll() is None


def test_expired_client_certificate_rejected(daemons: DaemonFactory, pki: PKI) -> None:
    d = daemons.start(*tls_args(pki))
    assert echoscu(d.port, *client_tls(pki, pki.expired)) != 0
    wait_for(lambda: "certificate has expired" in d.log())


def test_revoked_leaf_with_crl(daemons: DaemonFactory, pki: PKI) -> None:
    d = daemons.start(*tls_args(pki, None, "+crl", str(pki.root_crl_leaf)))
    assert echoscu(d.port, *client_tls(pki, pki.revoked)) != 0
    assert echoscu(d.port, *client_tls(pki, pki.client)) == 0
    wait_for(lambda: "revoked" in d.log())


def test_revoked_intermediate_with_full_chain_check(daemons: DaemonFactory, pki: PKI) -> None:
    chain = ["+tls", str(pki.sub_client.key), str(pki.sub_client_chain), "+cf", str(pki.root.cert)]
    leaf_only = daemons.start(*tls_args(pki, None, "+crl", str(pki.root_crl), "+crl", str(pki.sub_crl)))
    assert echoscu(leaf_only.port, *chain) == 0  # leaf checking alone misses the revoked CA
    full = daemons.start(*tls_args(pki, None, "+crl", str(pki.root_crl), "+crl", str(pki.sub_crl), "+cra"))
    assert echoscu(full.port, *chain) != 0
    assert echoscu(full.port, *client_tls(pki, pki.client)) == 0


def test_der_key_and_certificate(daemons: DaemonFactory, pki: PKI, tmp_path: Path) -> None:
    """-der applies to every file the TLS options name: key, certificate, +cf and +cd (#11.3)."""
    ca_der = tmp_path / "ca.der"
    run(["openssl", "x509", "-in", str(pki.root.cert), "-outform", "DER", "-out", str(ca_der)])
    d = daemons.start("-der", "+tls", str(pki.der.key), str(pki.der.cert), "+cf", str(ca_der))
    assert echoscu(d.port, *client_tls(pki, pki.client)) == 0
    assert "no certificate" not in d.log()
    d.stop()
    ca_dir = tmp_path / "cas"
    ca_dir.mkdir()
    shutil.copy(ca_der, ca_dir / "root.der")
    d = daemons.start("-der", "+tls", str(pki.der.key), str(pki.der.cert), "+cd", str(ca_dir))
    assert echoscu(d.port, *client_tls(pki, pki.client)) == 0


def test_encrypted_key_password_sources(daemons: DaemonFactory, pki: PKI, tmp_path: Path) -> None:
    enc = ["+tls", str(pki.encrypted.key), str(pki.encrypted.cert), "+cf", str(pki.root.cert)]
    d = daemons.start(*enc, "+pw", "s3cret")
    assert echoscu(d.port, *client_tls(pki, pki.client)) == 0
    d.stop()
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    (daemons.config_dir / "dcmrecvd.toml").write_text(
        f'[tls]\npassword_source = "file"\npassword_file = "{secret}"\n'
    )
    d = daemons.start(*enc)
    assert echoscu(d.port, *client_tls(pki, pki.client)) == 0
    d.stop()
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "dcmrecvd-key-password").write_text("s3cret")
    (daemons.config_dir / "dcmrecvd.toml").write_text('[tls]\npassword_source = "credential"\n')
    env = isolated_env(daemons.config_dir, CREDENTIALS_DIRECTORY=str(creds))
    d = daemons.start(*enc, env=env)
    assert echoscu(d.port, *client_tls(pki, pki.client)) == 0
    d.stop()
    assert "s3cret" not in "".join(x.log() for x in daemons.started)


def test_password_never_printed(config_dir: Path, pki: PKI) -> None:
    result = dcmrecvd(
        "--print-config", *tls_args(pki, pki.encrypted), "+pw", "s3cret", "104", config_dir=config_dir
    )
    assert result.returncode == 0
    assert "s3cret" not in result.stdout + result.stderr
    assert "tls.password is set but not printed" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["+pw", "wrong"], "cannot use private key"),
        ([], "no terminal or standard input to read its password from"),
    ],
)
def test_encrypted_key_problems_exit_71(
    config_dir: Path, pki: PKI, tmp_path: Path, args: list[str], message: str
) -> None:
    enc = ["+tls", str(pki.encrypted.key), str(pki.encrypted.cert)]
    import subprocess

    result = subprocess.run(
        [*__import__("conftest").dcmrecvd_cmd(), "--check-config", *enc, *args, "-od", str(tmp_path), "104"],
        env=isolated_env(config_dir),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
    )
    assert result.returncode == 71, result.stderr
    assert message in result.stderr


@pytest.mark.parametrize("what", ["missing key", "missing cert", "mismatch", "garbage"])
def test_unusable_material_exits_71(config_dir: Path, pki: PKI, tmp_path: Path, what: str) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    key, cert = {
        "missing key": (tmp_path / "nope.key", pki.server.cert),
        "missing cert": (pki.server.key, tmp_path / "nope.pem"),
        "mismatch": (pki.client.key, pki.server.cert),
        "garbage": (pki.server.key, garbage),
    }[what]
    for action in ("--check-config", None):
        argv = [a for a in (action,) if a] + ["+tls", str(key), str(cert), "-od", str(tmp_path), "104"]
        result = dcmrecvd(*argv, config_dir=config_dir)
        assert result.returncode == 71, result.stderr


def test_missing_ca_file_warns(config_dir: Path, pki: PKI, tmp_path: Path) -> None:
    result = dcmrecvd(
        "--check-config",
        *tls_args(pki),
        "+cf",
        str(tmp_path / "absent.pem"),
        "-od",
        str(tmp_path),
        "104",
        config_dir=config_dir,
    )
    assert result.returncode == 0
    assert "warning: cannot read certificate file" in result.stderr


def test_expect_sni(daemons: DaemonFactory, pki: PKI) -> None:
    d = daemons.start(*tls_args(pki, None, "--expect-sni", "dicom.example", "-ic"))
    with python_client(pki, d.port, sni="dicom.example") as conn:
        assert conn.version()
    with pytest.raises(ssl.SSLError):
        python_client(pki, d.port, sni="other.example")


def _supports(profile: str) -> bool:
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.set_ciphers(tls.PROFILES[profile].ciphers)
        return True
    except ssl.SSLError:
        return False


@pytest.mark.parametrize(
    ("flag", "profile"),
    [("+py", "bcp195-nd"), ("+px", "bcp195"), ("+pz", "bcp195-extended"), ("+pa", "aes"), ("+pn", "null")],
)
def test_profiles_against_dcmtk_with_the_same_profile(
    daemons: DaemonFactory, pki: PKI, flag: str, profile: str
) -> None:
    if not _supports(profile):
        pytest.skip(f"local OpenSSL lacks {profile}")
    d = daemons.start(*tls_args(pki, None, flag))
    assert echoscu(d.port, flag, *client_tls(pki, pki.client)) == 0, d.log()


@pytest.mark.parametrize(("flag", "ciphers"), [("+pg", None), ("+pm", "ECDHE-RSA-CHACHA20-POLY1305")])
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
def test_rfc8996_profiles_with_python_clients(
    daemons: DaemonFactory, pki: PKI, flag: str, ciphers: str | None
) -> None:
    d = daemons.start(*tls_args(pki, None, flag))
    with python_client(pki, d.port, pki.client, maximum=ssl.TLSVersion.TLSv1_2, ciphers=ciphers) as conn:
        assert conn.version() == "TLSv1.2"
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError), socket.create_connection(("127.0.0.1", d.port), timeout=10) as raw:
        old.wrap_socket(raw)


def test_unavailable_profile_exits_71(config_dir: Path, pki: PKI, tmp_path: Path) -> None:
    if _supports("basic"):
        pytest.skip("this OpenSSL still has 3DES")
    result = dcmrecvd(
        "--check-config", *tls_args(pki), "+pb", "-od", str(tmp_path), "104", config_dir=config_dir
    )
    assert result.returncode == 71
    assert "does not provide" in result.stderr


def test_cipher_list(config_dir: Path) -> None:
    result = dcmrecvd("+cc", config_dir=config_dir)
    assert result.returncode == 0 and "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" in result.stdout


def test_silent_and_stalled_clients_do_not_delay_others(daemons: DaemonFactory, pki: PKI) -> None:
    d = daemons.start(*tls_args(pki))
    silent = socket.create_connection(("127.0.0.1", d.port))
    stalled = socket.create_connection(("127.0.0.1", d.port))
    stalled.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello cut short
    try:
        start = time.monotonic()
        assert echoscu(d.port, *client_tls(pki, pki.client)) == 0
        assert time.monotonic() - start < 1.0 + 0.5  # echoscu's own start-up included
    finally:
        silent.close()
        stalled.close()


def test_plain_client_on_tls_port_fails_cleanly(daemons: DaemonFactory, pki: PKI) -> None:
    d = daemons.start(*tls_args(pki))
    assert echoscu(d.port) != 0
    wait_for(lambda: "tls.handshake_failed" in d.log())
    assert echoscu(d.port, *client_tls(pki, pki.client)) == 0


def _server_cn(pki: PKI, port: int) -> str:
    with python_client(pki, port, pki.client) as conn:
        cert = conn.getpeercert()
    return dict(pair for rdn in cert["subject"] for pair in rdn)["commonName"]


def test_certificate_rotation_by_sighup(daemons: DaemonFactory, pki: PKI, tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    key, cert = live / "server.key", live / "server.pem"
    shutil.copy(pki.server.key, key)
    shutil.copy(pki.server.cert, cert)
    notify = NotifySocket(tmp_path / "n.sock")
    env = isolated_env(daemons.config_dir, NOTIFY_SOCKET=str(notify.path))
    d = daemons.start("+tls", str(key), str(cert), "+cf", str(pki.root.cert), env=env)
    notify.wait("READY", "1", pid=d.pid)
    assert _server_cn(pki, d.port) == "localhost"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(pki.root.cert))
    ctx.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    ctx.check_hostname = False
    ae = AE(ae_title="ROTATE")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", d.port, tls_args=(ctx, None))
    assert assoc.is_established
    try:
        shutil.copy(pki.server2.key, key)
        shutil.copy(pki.server2.cert, cert)
        mark = notify.count()
        os.kill(d.pid, signal.SIGHUP)
        notify.wait("READY", "1", after=mark)
        assert _server_cn(pki, d.port) == "localhost-renewed"
        assert assoc.send_c_echo().Status == 0  # the association in flight kept its session
        cert.write_text("broken")
        mark = notify.count()
        os.kill(d.pid, signal.SIGHUP)
        notify.wait("READY", "1", after=mark)
        wait_for(lambda: "reload.rejected" in d.log())
        assert _server_cn(pki, d.port) == "localhost-renewed"
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()
        notify.close()


def test_extra_cipher_and_dh_parameters(daemons: DaemonFactory, pki: PKI, tmp_path: Path) -> None:
    import subprocess

    dh = tmp_path / "dh.pem"
    subprocess.run(
        [
            "openssl",
            "genpkey",
            "-genparam",
            "-algorithm",
            "DH",
            "-pkeyopt",
            "dh_param:ffdhe2048",
            "-out",
            str(dh),
        ],
        check=True,
        capture_output=True,
    )
    d = daemons.start(*tls_args(pki, None, "+px", "+dp", str(dh), "+cs", "DHE-RSA-AES128-SHA256"))
    with python_client(
        pki, d.port, pki.client, maximum=ssl.TLSVersion.TLSv1_2, ciphers="DHE-RSA-AES128-SHA256"
    ) as conn:
        assert conn.cipher()[0] == "DHE-RSA-AES128-SHA256"


def test_extra_cipher_with_extended_profile_in_toml(config_dir: Path, pki: PKI, tmp_path: Path) -> None:
    """On the command line this is exit 1 (see below); from TOML the TLS layer refuses it (71)."""
    (config_dir / "dcmrecvd.toml").write_text(
        '[tls]\nprofile = "bcp195-extended"\nciphers = ["TLS_RSA_WITH_AES_128_CBC_SHA"]\n'
    )
    result = dcmrecvd("--check-config", *tls_args(pki), "-od", str(tmp_path), "104", config_dir=config_dir)
    assert result.returncode == 71
    assert "cannot be used with profile bcp195-extended" in result.stderr


def test_a_trickled_tls_handshake_is_bounded_as_a_whole(daemons: DaemonFactory, pki: PKI) -> None:
    """A ClientHello sent a byte every 0.2 s: each read is on time, the whole is not (ARTIM)."""
    d = daemons.start(*tls_args(pki, None, "-ta", "2"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    try:
        context.wrap_bio(incoming, outgoing).do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    assert len(hello) > 100
    s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    try:
        closed_after = trickle(s, hello, 0.2)
    finally:
        s.close()
    assert closed_after is not None, "a trickled TLS handshake was never dropped"
    assert closed_after < 6
    wait_for(lambda: "tls.handshake_failed" in d.log())


def test_password_from_standard_input(config_dir: Path, pki: PKI, tmp_path: Path) -> None:
    """+ps (the default) reads one line from standard input when it is not a terminal (#11.2)."""
    import subprocess

    enc = ["+tls", str(pki.encrypted.key), str(pki.encrypted.cert), "+cf", str(pki.root.cert)]
    cmd = [*__import__("conftest").dcmrecvd_cmd(), "--check-config", *enc, "-od", str(tmp_path), "104"]
    env = isolated_env(config_dir)
    good = subprocess.run(cmd, env=env, input="s3cret\n", capture_output=True, text=True, timeout=30)
    assert good.returncode == 0, good.stderr
    assert "TLS on" in good.stdout
    wrong = subprocess.run(cmd, env=env, input="nope\n", capture_output=True, text=True, timeout=30)
    assert wrong.returncode == 71 and "cannot use private key" in wrong.stderr


def test_password_from_a_pipe_serves_storescu(pki: PKI, tmp_path: Path, config_dir: Path) -> None:
    """`echo secret | dcmrecvd +tls enc.key cert.pem ...` runs, and TLS clients are served."""
    import subprocess

    from conftest import free_port, port_open

    port = free_port()
    out = tmp_path / "out"
    out.mkdir()
    enc = ["+tls", str(pki.encrypted.key), str(pki.encrypted.cert), "+cf", str(pki.root.cert)]
    proc = subprocess.Popen(
        [*__import__("conftest").dcmrecvd_cmd(), *enc, "-od", str(out), str(port)],
        env=isolated_env(config_dir),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write("s3cret\n")
        proc.stdin.close()
        wait_for(lambda: port_open(port) or proc.poll() is not None, timeout=20)
        assert proc.poll() is None
        assert echoscu(port, *client_tls(pki, pki.client)) == 0
    finally:
        proc.kill()
        proc.wait()


def test_cipher_suites_added_with_cs(daemons: DaemonFactory, pki: PKI) -> None:
    """+cs adds a suite to the profile: a client that offers only it (+pa) gets in (#11.4)."""
    aes_only = [*client_tls(pki, pki.client), "+pa"]
    plain = daemons.start(*tls_args(pki))
    assert echoscu(plain.port, *aes_only) != 0
    added = daemons.start(*tls_args(pki, None, "+cs", "TLS_RSA_WITH_AES_128_CBC_SHA"))
    assert echoscu(added.port, *aes_only) == 0
    assert "RSA key transport" in added.log()
    assert echoscu(added.port, *client_tls(pki, pki.client)) == 0  # the profile's own suites stay


@pytest.mark.parametrize(
    ("extra", "code", "words"),
    [
        (["+cs", "TLS_NO_SUCH_SUITE"], 71, "unknown TLS ciphersuite 'TLS_NO_SUCH_SUITE'"),
        (["+cs", "TLS_RSA_WITH_NULL_SHA"], 71, "Unencrypted ciphersuite 'TLS_RSA_WITH_NULL_SHA'"),
        (["+cs", "TLS_RSA_WITH_AES_128_CBC_SHA", "+pz"], 1, "--cipher not allowed with --profile-bcp195-ex"),
        (["+pz", "+cs", "TLS_RSA_WITH_AES_128_CBC_SHA"], 1, "--cipher not allowed with --profile-bcp195-ex"),
    ],
    ids=["unknown", "NULL under the default profile", "+cs then +pz", "+pz then +cs"],
)
def test_cipher_suite_errors_exit_as_dcmrecv_does(
    config_dir: Path, pki: PKI, tmp_path: Path, extra: list[str], code: int, words: str
) -> None:
    args = [*tls_args(pki), *extra, "-od", str(tmp_path)]
    ours = dcmrecvd("--check-config", *args, "104", config_dir=config_dir)
    assert ours.returncode == code, ours.stderr
    assert words in ours.stderr
    theirs = run([need("dcmrecv"), *args, str(_busy_port())], timeout=30)
    assert theirs.returncode == code, theirs.stdout + theirs.stderr


def _busy_port() -> int:
    """A port dcmrecv cannot bind, so that it exits instead of serving if all checks pass."""
    import socket as socket_mod

    holder = socket_mod.socket()
    holder.bind(("0.0.0.0", 0))
    holder.listen()
    _held.append(holder)
    return int(holder.getsockname()[1])


_held: list[socket.socket] = []


def _listed_suites(config_dir: Path) -> list[str]:
    result = dcmrecvd("+cc", config_dir=config_dir)
    assert result.returncode == 0, result.stderr
    return [line.strip() for line in result.stdout.splitlines() if line.startswith("  TLS_")]


def test_every_suite_cc_lists_is_accepted_by_cs(config_dir: Path, pki: PKI) -> None:
    """#28.1: +cc printed TLS 1.3 names that +cs refused (exit 71).  Every name it prints
    builds a context (a NULL suite under the NULL profile, as dcmrecv demands)."""
    from dcmrecvd.conf.config import TLSConfig
    from dcmrecvd.serve import ciphers

    listed = _listed_suites(config_dir)
    assert "TLS_AES_256_GCM_SHA384" in listed and "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" in listed
    for name in listed:
        profile = "null" if ciphers.is_unencrypted(name) else "bcp195-rfc8996"
        cfg = TLSConfig(
            enabled=True,
            private_key=str(pki.server.key),
            certificate=str(pki.server.cert),
            password_source="empty",
            profile=profile,
            ciphers=[name],
        )
        try:
            tls.build_context(cfg, {})
        except Exception as exc:
            pytest.fail(f"+cc lists {name} but +cs {name} fails: {exc}")


def test_tls13_suite_by_cs_on_the_command_line(daemons: DaemonFactory, pki: PKI, config_dir: Path) -> None:
    """The reproduction of #28.1, and the suite is what a TLS 1.3 client then gets."""
    d = daemons.start(*tls_args(pki, None, "+cs", "TLS_AES_256_GCM_SHA384"))
    with python_client(pki, d.port, pki.client) as conn:
        assert conn.version() == "TLSv1.3"
    assert echoscu(d.port, *client_tls(pki, pki.client)) == 0
    # A profile that stops at TLS 1.2 cannot offer it: refused, saying why.
    refused = dcmrecvd(
        "--check-config", *tls_args(pki), "+pa", "+cs", "TLS_AES_128_GCM_SHA256", "104", config_dir=config_dir
    )
    assert refused.returncode == 71
    assert "TLS 1.3 suite" in refused.stderr and "stops at TLS 1.2" in refused.stderr
