"""Throwaway certificate authorities and leaf certificates for TLS tests, made with ``openssl``.

Two unrelated CAs: ``ca`` signs the certificates the tests trust, ``other`` signs
certificates that must be refused. Leaves are for 127.0.0.1 (subjectAltName
IP:127.0.0.1) and good for both server and client auth, like a node's certificate
(one certificate serves its HTTPS and authenticates it to its peers). EC keys keep
generation fast; the extensions satisfy strict X.509 verification.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = shutil.which("openssl")

_CA_EXT = """\
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""

_LEAF_EXT = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def _openssl(*args: str | Path) -> None:
    assert OPENSSL is not None, "openssl is not installed"
    subprocess.run(
        [OPENSSL, *map(str, args)], check=True, capture_output=True, timeout=30, text=True
    )


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class CA:
    name: str
    pair: CertPair
    directory: Path

    @property
    def cert(self) -> Path:
        return self.pair.cert

    def issue(self, name: str) -> CertPair:
        """A leaf for 127.0.0.1 signed by this CA, usable as server and client certificate."""
        d = self.directory
        key, csr, cert, ext = (
            d / f"{name}.key",
            d / f"{name}.csr",
            d / f"{name}.pem",
            d / f"{name}.ext",
        )
        ext.write_text(_LEAF_EXT)
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key)
        _openssl("req", "-new", "-key", key, "-subj", f"/CN={name}", "-out", csr)
        _openssl(
            "x509", "-req", "-in", csr, "-CA", self.pair.cert, "-CAkey", self.pair.key,
            "-CAcreateserial", "-days", "2", "-sha256", "-extfile", ext, "-out", cert,
        )  # fmt: skip
        return CertPair(cert, key)


def make_ca(directory: Path, name: str) -> CA:
    """A self-signed CA in ``directory`` (created), named ``name``."""
    directory.mkdir(parents=True, exist_ok=True)
    key, cert, ext = directory / f"{name}.key", directory / f"{name}.pem", directory / "ca.ext"
    ext.write_text(_CA_EXT)
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key)
    _openssl(
        "req", "-x509", "-new", "-key", key, "-subj", f"/CN={name}", "-days", "2", "-sha256",
        "-extensions", "v3_ca_test", "-config", _ca_config(directory, ext), "-out", cert,
    )  # fmt: skip
    return CA(name, CertPair(cert, key), directory)


def _ca_config(directory: Path, ext: Path) -> Path:
    """A minimal openssl config whose ``v3_ca_test`` section holds the CA extensions."""
    config = directory / "ca.cnf"
    config.write_text("[req]\ndistinguished_name = dn\n[dn]\n[v3_ca_test]\n" + ext.read_text())
    return config


@dataclass(frozen=True)
class TlsFiles:
    """Everything a TLS test needs: the trusted CA and its leaves, and an unrelated CA's leaf."""

    ca: CA
    node: CertPair  # signed by ``ca``: a node's server and client certificate
    client: CertPair  # signed by ``ca``: a plain API client
    other_ca: CA
    stranger: CertPair  # signed by ``other_ca``: must be refused everywhere


def make_tls_files(root: Path) -> TlsFiles:
    ca = make_ca(root / "ca", "test-ca")
    other = make_ca(root / "other", "other-ca")
    return TlsFiles(ca, ca.issue("node"), ca.issue("client"), other, other.issue("stranger"))


# --- SSL contexts --------------------------------------------------------------------


def server_context(pair: CertPair, *, require_client_ca: Path | None = None) -> ssl.SSLContext:
    """Serve with ``pair``; with ``require_client_ca``, demand a client certificate from it."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pair.cert, pair.key)
    if require_client_ca is not None:
        ctx.load_verify_locations(require_client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(trust: Path, pair: CertPair | None = None) -> ssl.SSLContext:
    """Verify servers against the CA ``trust``; present ``pair`` when given."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=trust)
    if pair is not None:
        ctx.load_cert_chain(pair.cert, pair.key)
    return ctx
