"""A small PKI made with the openssl command line, for the TLS tests.

``openssl ca`` keeps a real CA database, so certificates can be issued with
any validity window (expired ones included), revoked, and listed in CRLs.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

CA_CONFIG = """
[ca]
default_ca = this
[this]
dir = {dir}
database = {dir}/index.txt
serial = {dir}/serial
crlnumber = {dir}/crlnumber
new_certs_dir = {dir}/issued
default_md = sha256
default_crl_days = 30
policy = anything
unique_subject = no
copy_extensions = copy
[anything]
commonName = supplied
[leaf]
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
[sub_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
"""


def openssl(*args: str, cwd: Path | None = None) -> None:
    result = subprocess.run(["openssl", *args], capture_output=True, text=True, cwd=cwd)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {result.stderr}")


def new_key_and_request(key: Path, csr: Path, name: str) -> None:
    """A fresh RSA key and a certificate request for CN=name."""
    openssl(
        "req",
        "-new",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        f"/CN={name}",
    )


@dataclass
class Issued:
    key: Path
    cert: Path


class CA:
    """A certificate authority in a directory."""

    def __init__(self, directory: Path, name: str, parent: CA | None = None) -> None:
        self.dir = directory
        self.name = name
        directory.mkdir(parents=True)
        (directory / "issued").mkdir()
        (directory / "index.txt").write_text("")
        (directory / "serial").write_text("1000\n")
        (directory / "crlnumber").write_text("1000\n")
        self.config = directory / "ca.cnf"
        self.config.write_text(CA_CONFIG.format(dir=directory))
        self.key = directory / "ca.key"
        self.cert = directory / "ca.pem"
        if parent is None:
            openssl(
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                str(self.key),
                "-out",
                str(self.cert),
                "-days",
                "3650",
                "-subj",
                f"/CN={name}",
            )
        else:
            csr = directory / "ca.csr"
            new_key_and_request(self.key, csr, name)
            parent.sign(csr, self.cert, extensions="sub_ca")

    def sign(
        self,
        csr: Path,
        out: Path,
        *,
        extensions: str = "leaf",
        start: str | None = None,
        end: str | None = None,
    ) -> None:
        args = ["-batch", "-in", str(csr), "-out", str(out), "-extensions", extensions, "-notext"]
        args += ["-startdate", start] if start else []
        args += ["-enddate", end] if end else ["-days", "365"]
        self.ca(*args)

    def issue(
        self, name: str, *, start: str | None = None, end: str | None = None, password: str | None = None
    ) -> Issued:
        key = self.dir / f"{name}.key"
        csr = self.dir / f"{name}.csr"
        cert = self.dir / f"{name}.pem"
        new_key_and_request(key, csr, name)
        if password is not None:
            encrypted = self.dir / f"{name}.enc.key"
            openssl(
                "pkey", "-in", str(key), "-out", str(encrypted), "-aes256", "-passout", f"pass:{password}"
            )
            key = encrypted
        self.sign(csr, cert, start=start, end=end)
        return Issued(key, cert)

    def ca(self, *args: str) -> None:
        """``openssl ca`` with this CA's database, certificate and key."""
        openssl("ca", "-config", str(self.config), "-cert", str(self.cert), "-keyfile", str(self.key), *args)

    def revoke(self, cert: Path) -> None:
        self.ca("-revoke", str(cert))

    def crl(self, out: Path) -> Path:
        self.ca("-gencrl", "-out", str(out))
        return out


def to_der(issued: Issued, directory: Path) -> Issued:
    """The same key and certificate in DER."""
    key = directory / (issued.key.stem + ".der.key")
    cert = directory / (issued.cert.stem + ".der.crt")
    openssl("pkey", "-in", str(issued.key), "-outform", "DER", "-out", str(key))
    openssl("x509", "-in", str(issued.cert), "-outform", "DER", "-out", str(cert))
    return Issued(key, cert)


def chain_file(path: Path, *certs: Path) -> Path:
    path.write_text("".join(c.read_text() for c in certs))
    return path
