"""TLS material for a test session, generated with the ``openssl`` CLI.

The CLI (not the ``cryptography`` package) because it is what operators use to
make a ThingsBoard CA, and it keeps the test extra small.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import attrs
import pytest

# Short validity is enough for one session; the CA must stay valid across it.
_DAYS = "7"


@attrs.frozen
class TlsMaterial:
    """A CA, a server certificate for localhost/127.0.0.1 and an unrelated CA."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    other_ca_cert: Path


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"openssl {' '.join(args)} failed:\n{proc.stderr}", pytrace=False)


def _make_ca(directory: Path, name: str, common_name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", _DAYS,
        "-keyout", key.name, "-out", cert.name, "-subj", f"/CN={common_name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )
    return cert, key


def make_tls_material(directory: Path) -> TlsMaterial:
    """Write a CA, a server cert signed by it and a second CA into ``directory``."""
    ca_cert, ca_key = _make_ca(directory, "ca", "TEG test CA")
    other_ca_cert, _ = _make_ca(directory, "other-ca", "TEG unrelated CA")
    # SAN, not CN, is what TLS clients check; AKI/SKI keep strict verifiers
    # (Python 3.13's VERIFY_X509_STRICT) happy.
    (directory / "server.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
        "-out", "server.csr", "-subj", "/CN=localhost",
        cwd=directory,
    )
    _openssl(
        "x509", "-req", "-sha256", "-days", _DAYS, "-in", "server.csr",
        "-CA", ca_cert.name, "-CAkey", ca_key.name, "-CAcreateserial",
        "-extfile", "server.ext", "-out", "server.crt",
        cwd=directory,
    )
    return TlsMaterial(
        ca_cert=ca_cert,
        ca_key=ca_key,
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        other_ca_cert=other_ca_cert,
    )


@pytest.fixture(scope="session")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    """Session CA + server cert (SAN localhost, 127.0.0.1) + an unrelated CA."""
    return make_tls_material(tmp_path_factory.mktemp("tls"))
