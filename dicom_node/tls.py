"""DICOM TLS contexts (PS3.15 Annex B.12, the BCP 195 profile).

The node uses one certificate, private key and CA bundle (``node.tls``) for both
directions:

* :func:`server_context` for the Storage SCP: TLS 1.2 minimum (1.3 is negotiated
  whenever the peer offers it), ECDHE key exchange with AES-GCM or ChaCha20-Poly1305
  only, and a client certificate signed by the CA bundle when
  ``require_client_certificate`` is set;
* :func:`client_context` for the sending SCU (result delivery, ``send``): the same
  protocol floor and cipher list, the destination's certificate verified against the
  CA bundle and, with ``check_hostname``, against the host name or IP address the
  node connects to; the node's certificate is presented as the client certificate.

Plain RSA key exchange, CBC suites, SHA-1 MACs, compression and renegotiation are
all off. TLS 1.3 suites are fixed by OpenSSL (all AEAD) and need no list.
"""

from __future__ import annotations

import logging
import ssl

from config import ConfigError, Settings
from config.settings import Destination, TLSSettings

LOGGER = logging.getLogger(__name__)

#: TLS 1.2 suites allowed: forward-secret ECDHE with an AEAD cipher (RFC 9325, BCP 195).
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!SHA1:!DSS:!PSK:!SRP"


def _base_context(server_side: bool, tls: TLSSettings) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    _require_files(tls)
    try:
        ctx.load_cert_chain(tls.certificate, tls.private_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load node.tls.certificate {tls.certificate!r} with node.tls.private_key "
            f"{tls.private_key!r}: {exc}"
        ) from exc
    try:
        ctx.load_verify_locations(cafile=tls.ca_bundle)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load node.tls.ca_bundle {tls.ca_bundle!r}: {exc}") from exc
    return ctx


def _require_files(tls: TLSSettings) -> None:
    missing = [
        name for name in ("certificate", "private_key", "ca_bundle") if not getattr(tls, name)
    ]
    if missing:
        raise ConfigError(
            "DICOM TLS needs node.tls." + ", node.tls.".join(missing) + " (PEM file paths)"
        )


def server_context(tls: TLSSettings) -> ssl.SSLContext:
    """Build the SCP's TLS context from ``node.tls``.

    Parameters
    ----------
    tls
        The TLS settings; ``certificate``, ``private_key`` and ``ca_bundle`` must name
        readable PEM files.

    Returns
    -------
    ssl.SSLContext
        Server context: TLS 1.2 minimum, BCP 195 TLS 1.2 suites, server cipher
        preference, client certificate required (``CERT_REQUIRED``) when
        ``require_client_certificate``, else verified when presented
        (``CERT_OPTIONAL``).

    Raises
    ------
    ConfigError
        When a file is not configured, unreadable, or not a matching key pair.
    """
    ctx = _base_context(True, tls)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return ctx


def client_context(tls: TLSSettings) -> ssl.SSLContext:
    """Build the SCU's TLS context from ``node.tls``.

    Parameters
    ----------
    tls
        The TLS settings; the node's certificate is offered as client certificate and
        the remote certificate must chain to ``ca_bundle``.

    Returns
    -------
    ssl.SSLContext
        Client context: TLS 1.2 minimum, BCP 195 suites, ``CERT_REQUIRED``; the host
        name (or IP address) is checked against the certificate when
        ``tls.check_hostname``.

    Raises
    ------
    ConfigError
        When a file is not configured, unreadable, or not a matching key pair.
    """
    ctx = _base_context(False, tls)
    ctx.check_hostname = tls.check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def find_destination(settings: Settings, ae_title: str, host: str, port: int) -> Destination | None:
    """The configured destination with this AE title, host and port, if any."""
    for dest in settings.destinations:
        if (dest.ae_title, dest.host, dest.port) == (ae_title.strip(), host, port):
            return dest
    return None


def destination_context(
    settings: Settings, ae_title: str, host: str, port: int
) -> ssl.SSLContext | None:
    """The client TLS context for sending to ``ae_title@host:port``.

    Returns
    -------
    ssl.SSLContext or None
        A :func:`client_context` when the matching ``[[destinations]]`` entry has
        ``tls = true``; ``None`` (plain TCP) otherwise.
    """
    dest = find_destination(settings, ae_title, host, port)
    if dest is None or not dest.tls:
        return None
    return client_context(settings.node.tls)


def describe(sock: object) -> str:
    """``version cipher`` of a TLS socket, or ``plain`` for a plain TCP socket."""
    if isinstance(sock, ssl.SSLSocket):
        cipher = sock.cipher()
        return f"{sock.version()} {cipher[0] if cipher else '?'}"
    return "plain"


__all__ = [
    "BCP195_CIPHERS",
    "client_context",
    "describe",
    "destination_context",
    "find_destination",
    "server_context",
]
