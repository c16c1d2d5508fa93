"""TLS: dcmrecv's transport-security options -> an ``ssl.SSLContext``.

Built once per Runtime, so a reload re-reads keys, certificates, CAs and
CRLs, and associations in flight keep the context (and session) they started
with.  Any unusable key, certificate or profile raises TransportError (exit
71); a profile the local OpenSSL cannot provide is refused, never weakened.
The handshake itself runs on the association's thread (see ``association``),
never on the accept path.
"""

from __future__ import annotations

import getpass
import os
import ssl
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from dcmrecvd.conf.config import TLSConfig
from dcmrecvd.errors import TransportError
from dcmrecvd.serve import ciphers


@dataclass(frozen=True)
class TLSProfile:
    """One of DCMTK's security profiles, as protocol versions and TLS 1.2 cipher suites."""

    label: str
    minimum: ssl.TLSVersion
    maximum: ssl.TLSVersion
    ciphers: str
    allow_extra_ciphers: bool = True


_GCM = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384"
)
_CHACHA = "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
_V12, _V13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3

#: The documented mapping (see dcmrecvd(8), "TLS security profiles").
PROFILES: dict[str, TLSProfile] = {
    "bcp195-rfc8996": TLSProfile("BCP 195 RFC 8996 (TLS 1.2+, AEAD with forward secrecy)", _V12, _V13, _GCM),
    "bcp195-rfc8996-modified": TLSProfile(
        "Modified BCP 195 RFC 8996 (TLS 1.2+, AEAD incl. ChaCha20)", _V12, _V13, f"{_GCM}:{_CHACHA}"
    ),
    "bcp195-nd": TLSProfile("Non-downgrading BCP 195 (TLS 1.2+)", _V12, _V13, _GCM),
    "bcp195": TLSProfile(
        "BCP 195 (TLS 1.2+, AEAD, plus AES-CBC-SHA fallback)", _V12, _V13, f"{_GCM}:AES128-SHA:AES256-SHA"
    ),
    "bcp195-extended": TLSProfile(
        "Extended BCP 195 (TLS 1.2+, ECDHE AES-GCM only)",
        _V12,
        _V13,
        "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
        "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384",
        allow_extra_ciphers=False,
    ),
    "basic": TLSProfile("Basic (TLS_RSA_WITH_3DES_EDE_CBC_SHA)", _V12, _V12, "DES-CBC3-SHA:@SECLEVEL=0"),
    "aes": TLSProfile(
        "AES (TLS_RSA_WITH_AES_128_CBC_SHA, 3DES fallback)", _V12, _V12, "AES128-SHA:DES-CBC3-SHA:@SECLEVEL=0"
    ),
    "null": TLSProfile(
        "Authenticated unencrypted (TLS_RSA_WITH_NULL_SHA)", _V12, _V12, "NULL-SHA:@SECLEVEL=0"
    ),
}

PasswordPrompt = Callable[[str], str]


def read_password(cfg: TLSConfig, environ: Mapping[str, str]) -> str | None:
    """The key password from the configured source (None: ask only if the key needs one)."""
    source = cfg.password_source
    if source == "value":
        return cfg.password
    if source == "empty":
        return ""
    if source == "file":
        return _first_line(Path(cfg.password_file), "password_file")
    if source == "credential":
        directory = environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise TransportError(
                "tls.password_source is 'credential' but $CREDENTIALS_DIRECTORY is not set "
                f"(LoadCredential={cfg.credential_name}:/path in the unit)"
            )
        return _first_line(Path(directory) / cfg.credential_name, "credential")
    return None  # prompt: only if the key turns out to be encrypted


def _first_line(path: Path, what: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TransportError(f"cannot read the key password {what} {path}: {exc.strerror or exc}") from None
    return text.splitlines()[0] if text else ""


#: A password read from a non-terminal standard input, kept for reloads: the pipe
#: it came from is at its end by the time SIGHUP asks again.
_stdin_password: str | None = None


def _prompt_callback(prompt: PasswordPrompt | None) -> Callable[[], str]:
    def ask() -> str:
        global _stdin_password
        if prompt is not None:
            return prompt("Enter PEM pass phrase: ")
        if sys.stdin is None or not sys.stdin.isatty():
            # +ps as dcmrecv: `echo secret | dcmrecvd +tls enc.key cert.pem ...` works.
            if _stdin_password is None:
                try:
                    line = sys.stdin.readline() if sys.stdin is not None else ""
                except (OSError, ValueError):  # closed or unreadable
                    line = ""
                if not line:  # /dev/null, a closed pipe, systemd: nothing to read
                    raise TransportError(
                        "the private key is encrypted and there is no terminal or standard input "
                        "to read its password from (+ps); use tls.password_file or a systemd credential"
                    )
                _stdin_password = line.rstrip("\r\n")
            return _stdin_password
        return getpass.getpass("Enter PEM pass phrase: ")

    return ask


_PEM_KEY_LABELS = ("PRIVATE KEY", "ENCRYPTED PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY")


def _pem(der: bytes, label: str) -> str:
    import base64

    body = base64.encodebytes(der).decode().replace("\n", "")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----\n"


def _load_chain(context: ssl.SSLContext, cfg: TLSConfig, password: str | Callable[[], str] | None) -> None:
    key, cert = Path(cfg.private_key), Path(cfg.certificate)
    for path, what in ((key, "private key"), (cert, "certificate")):
        if not path.is_file():
            raise TransportError(f"cannot read {what} file {path}")
    try:
        if cfg.key_format == "pem":
            context.load_cert_chain(str(cert), str(key), password)
            return
        # DER: OpenSSL's loader wants PEM; convert in a private temp dir, try each key label.
        with tempfile.TemporaryDirectory(prefix="dcmrecvd-der-") as tmp:
            cert_pem = Path(tmp) / "cert.pem"
            cert_pem.write_text(ssl.DER_cert_to_PEM_cert(cert.read_bytes()))
            last: Exception | None = None
            for label in _PEM_KEY_LABELS:
                key_pem = Path(tmp) / "key.pem"
                key_pem.write_text(_pem(key.read_bytes(), label))
                try:
                    context.load_cert_chain(str(cert_pem), str(key_pem), password)
                    return
                except ssl.SSLError as exc:
                    last = exc
            raise last or ssl.SSLError("unreadable DER key")
    except TransportError:
        raise
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TransportError(
            f"cannot use private key {key} with certificate {cert} ({cfg.key_format.upper()}): {exc}"
        ) from None


def build_context(
    cfg: TLSConfig,
    environ: Mapping[str, str] | None = None,
    *,
    prompt: PasswordPrompt | None = None,
    warn: Callable[[str], None] = lambda message: None,
) -> ssl.SSLContext:
    """A server context for ``cfg`` (which must have ``enabled``)."""
    env = os.environ if environ is None else environ
    profile = PROFILES[cfg.profile]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = profile.minimum
    context.maximum_version = profile.maximum
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ciphers = profile.ciphers
    if cfg.ciphers:
        if not profile.allow_extra_ciphers:
            raise TransportError(f"tls.ciphers (+cs) cannot be used with profile {cfg.profile}")
        ciphers = ":".join([*_extra_ciphers(cfg, profile, warn), ciphers])
    try:
        context.set_ciphers(ciphers)
    except ssl.SSLError:
        raise TransportError(
            f"TLS profile {cfg.profile} ({profile.label}) needs cipher suites that the local "
            f"{ssl.OPENSSL_VERSION} does not provide"
        ) from None
    if profile.maximum == _V12 and not _has_tls12_cipher(context):
        raise TransportError(f"TLS profile {cfg.profile} has no usable cipher suite here")
    password = read_password(cfg, env)
    _load_chain(context, cfg, password if password is not None else _prompt_callback(prompt))
    _load_trust(context, cfg, warn)
    if cfg.dh_params:
        try:
            context.load_dh_params(cfg.dh_params)
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(f"cannot read DH parameters {cfg.dh_params}: {exc}") from None
    context.verify_mode = {
        "require": ssl.CERT_REQUIRED,
        "verify": ssl.CERT_OPTIONAL,
        "ignore": ssl.CERT_NONE,
    }[cfg.peer_cert]
    if cfg.expect_sni:
        context.sni_callback = _expect_sni(cfg.expect_sni)
    if cfg.seed_file or cfg.write_seed or cfg.write_seed_file:
        warn("+rs/+ws/+wf: the random seed file is not used; Python's ssl module seeds itself")
    return context


def _extra_ciphers(cfg: TLSConfig, profile: TLSProfile, warn: Callable[[str], None]) -> list[str]:
    """OpenSSL names of the +cs suites, checked against the profile as dcmrecv checks them."""
    names = []
    for name in cfg.ciphers:
        if ciphers.is_tls13(name):
            # Offered whenever TLS 1.3 is: nothing to add to the TLS 1.2 list.
            if profile.maximum < _V13:
                raise TransportError(
                    f"ciphersuite '{name}' is a TLS 1.3 suite, and security profile "
                    f"'{profile.label}' stops at TLS 1.2"
                )
            continue
        try:
            names.append(ciphers.openssl_name(name))
        except ciphers.UnknownSuite:
            raise TransportError(
                f"unknown TLS ciphersuite '{name}' (--list-ciphers shows the supported ones)"
            ) from None
        if ciphers.is_unencrypted(name) and cfg.profile != "null":
            raise TransportError(
                f"Unencrypted ciphersuite '{name}' not permitted with security profile '{profile.label}'"
            )
        if ciphers.uses_rsa_key_transport(name):
            warn(
                f"Ciphersuite '{name}' uses RSA key transport. "
                "RFC 7525 recommends that such cipher suites should not be used."
            )
    return names


def _has_tls12_cipher(context: ssl.SSLContext) -> bool:
    return any(c.get("protocol") != "TLSv1.3" for c in context.get_ciphers())


def _load_trust(context: ssl.SSLContext, cfg: TLSConfig, warn: Callable[[str], None]) -> None:
    """CA certificates (+cf, +cd) and CRLs (+crl), in PEM or, with -der, DER, as dcmrecv reads them."""
    der = cfg.key_format == "der"
    for path in cfg.ca_files:
        if not Path(path).is_file():
            warn(f"cannot read certificate file {path}, ignoring")  # as dcmrecv does
            continue
        _load_certificates(context, Path(path), der)
    for path in cfg.ca_dirs:
        if not Path(path).is_dir():
            raise TransportError(f"certificate directory {path} does not exist")
        if not der:
            context.load_verify_locations(capath=path)
        for entry in sorted(Path(path).iterdir()):
            if entry.is_file() and (der or entry.suffix in (".pem", ".crt")):
                _load_certificates(context, entry, der)
    for path in cfg.crl_files:
        try:
            if der:
                with tempfile.TemporaryDirectory(prefix="dcmrecvd-crl-") as tmp:
                    pem = Path(tmp) / "crl.pem"
                    pem.write_text(_pem(Path(path).read_bytes(), "X509 CRL"))
                    context.load_verify_locations(cafile=str(pem))
            else:
                context.load_verify_locations(cafile=path)
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(f"cannot read certificate revocation list {path}: {exc}") from None
    if cfg.crl_check == "leaf":
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    elif cfg.crl_check == "chain":
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN


def _load_certificates(context: ssl.SSLContext, path: Path, der: bool) -> None:
    try:
        if der:
            context.load_verify_locations(cadata=path.read_bytes())
        else:
            context.load_verify_locations(cafile=str(path))
    except (OSError, ssl.SSLError) as exc:
        encoding = "DER" if der else "PEM"
        raise TransportError(f"cannot use certificate file {path} ({encoding}): {exc}") from None


def _expect_sni(expected: str) -> Callable[[ssl.SSLObject, str | None, ssl.SSLContext], int | None]:
    def check(_conn: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> int | None:
        if name != expected:
            return int(ssl.AlertDescription.ALERT_DESCRIPTION_UNRECOGNIZED_NAME)
        return None

    return check


def describe_peer(conn: ssl.SSLSocket) -> dict[str, str]:
    """Subject, protocol and cipher of an established TLS connection, for the logs."""
    cert = conn.getpeercert() or {}
    subject = ", ".join("=".join(pair) for rdn in cert.get("subject", ()) for pair in rdn)
    cipher = conn.cipher()
    return {
        "tls_protocol": conn.version() or "",
        "tls_cipher": cipher[0] if cipher else "",
        "tls_peer_subject": subject or "(no certificate)",
    }
