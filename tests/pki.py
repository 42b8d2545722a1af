"""A throwaway PKI for TLS tests, made with the ``openssl`` command-line tool.

``site-ca`` signs ``node``, ``pacs`` and ``scanner``; ``rogue-ca`` signs
``intruder``, a client no site trusts. Every leaf is valid for ``127.0.0.1`` and
``localhost`` as server and as client (``serverAuth``, ``clientAuth``). Used by the
DICOM TLS tests (``tests/reliability/test_security.py``) and the status page's HTTPS
tests (``tests/dicom_node/test_web.py``), each through a module-scoped ``pki``
fixture that calls :func:`make_pki`.
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(folder: Path, name: str) -> None:
    """Write ``name.crt`` and ``name.key``: a self-signed P-256 CA valid for 2 days."""
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
        "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip


def make_leaf(folder: Path, name: str, ca: str) -> None:
    """Write ``name.crt`` and ``name.key``: a P-256 leaf signed by ``ca`` (2 days)."""
    (folder / f"{name}.ext").write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyAgreement\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
    )
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=folder,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
        cwd=folder,
    )  # fmt: skip


def make_pki(folder: Path) -> Path:
    """Write the PKI into ``folder`` and return it.

    ``site-ca`` signs ``node``, ``pacs`` and ``scanner``; ``rogue-ca`` signs
    ``intruder``. Each has ``NAME.crt`` and ``NAME.key`` (PEM) in ``folder``.
    """
    make_ca(folder, "site-ca")
    make_ca(folder, "rogue-ca")
    for name in ("node", "pacs", "scanner"):
        make_leaf(folder, name, "site-ca")
    make_leaf(folder, "intruder", "rogue-ca")
    return folder
