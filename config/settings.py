"""Typed settings of the node.

Settings are loaded once, by the CLI, from these sources in increasing priority:

1. ``config/default.toml`` shipped with the package;
2. a TOML file given with ``--config``;
3. environment variables ``CSPINE_<SECTION>__<KEY>`` (for example
   ``CSPINE_NODE__PORT=104``; lists and tables as JSON);
4. CLI flags, passed as ``overrides``.

The layering is pydantic-settings' own: one ``TomlConfigSettingsSource`` per file, an
``EnvSettingsSource`` with prefix ``CSPINE_`` and delimiter ``__`` over the environment
:func:`load_settings` is given, and the CLI flags as init arguments, ordered by
:meth:`Settings.settings_customise_sources`. Tables merge key by key; lists replace.

The result is a frozen :class:`Settings` that is passed down explicitly.
Nothing reads the environment at import time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import ssl
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from config.errors import ConfigError

if TYPE_CHECKING:
    from pydantic_settings.sources.types import Traversable

DEFAULT_TOML = Path(__file__).with_name("default.toml")
_AE_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 _-.+@!#$%&*()")


def _check_ae_title(value: str) -> str:
    value = value.strip()
    if not 1 <= len(value) <= 16:
        raise ValueError("an AE title must have 1 to 16 characters")
    if not set(value) <= _AE_CHARS or "\\" in value:
        raise ValueError(f"AE title {value!r} has characters outside the DICOM default repertoire")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Peer(_Section):
    """A remote AE allowed to associate with the node."""

    ae_title: str
    host: str | None = Field(default=None, description="IP address or network, e.g. 10.0.0.0/24")

    _v_ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))

    @field_validator("host")
    @classmethod
    def _v_host(cls, v: str | None) -> str | None:
        if v is not None:
            ipaddress.ip_network(v, strict=False)
        return v

    def matches(self, ae_title: str, address: str) -> bool:
        """Return whether a calling AE title and peer address match this entry."""
        if ae_title.strip() != self.ae_title:
            return False
        if self.host is None:
            return True
        try:
            return ipaddress.ip_address(address) in ipaddress.ip_network(self.host, strict=False)
        except ValueError:
            return False


def _readable_file(path: str) -> bool:
    return bool(path) and os.path.isfile(path) and os.access(path, os.R_OK)


class TLSSettings(_Section):
    """DICOM TLS (PS3.15 BCP195 profile): TLS 1.2 minimum, 1.3 preferred.

    One certificate, key and CA bundle serve both the SCP (``enabled``) and the SCU
    for destinations with ``tls = true``.
    """

    enabled: bool = False
    certificate: str = ""
    private_key: str = ""
    ca_bundle: str = ""
    require_client_certificate: bool = True
    check_hostname: bool = Field(
        default=True,
        description="SCU: the destination's certificate must name the host it is reached at",
    )

    @model_validator(mode="after")
    def _v_files(self) -> TLSSettings:
        if self.enabled:
            self.check_files()
        return self

    def check_files(self) -> None:
        """Raise ``ValueError`` unless certificate, key and CA bundle are readable files."""
        bad = [
            f"{name} ({getattr(self, name) or 'not set'})"
            for name in ("certificate", "private_key", "ca_bundle")
            if not _readable_file(getattr(self, name))
        ]
        if bad:
            raise ValueError(
                "DICOM TLS needs readable PEM files for certificate, private_key and "
                "ca_bundle; missing or unreadable: " + ", ".join(bad)
            )


_HASH_SCHEME = "pbkdf2_sha256"
_HASH_ITERATIONS = 200_000


def hash_password(password: str, *, iterations: int = _HASH_ITERATIONS) -> str:
    """Hash a passcode for ``[[node.user_identity.users]]``.

    Returns
    -------
    str
        ``pbkdf2_sha256$<iterations>$<salt hex>$<hash hex>``; only this goes into
        the configuration, never the passcode.
    """
    if not password:
        raise ValueError("a passcode must not be empty")
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return f"{_HASH_SCHEME}${iterations}${salt.hex()}${digest.hex()}"


class UserAccount(_Section):
    """A user allowed by User Identity Negotiation (username and passcode, type 2)."""

    username: str = Field(min_length=1, max_length=64)
    password_hash: str = Field(description="from config.settings.hash_password, never plain")

    def __repr__(self) -> str:
        return f"UserAccount(username={self.username!r})"

    @field_validator("password_hash")
    @classmethod
    def _v_hash(cls, v: str) -> str:
        parts = v.split("$")
        try:
            ok = (
                len(parts) == 4
                and parts[0] == _HASH_SCHEME
                and int(parts[1]) >= 10_000
                and len(bytes.fromhex(parts[2])) >= 8
                and len(bytes.fromhex(parts[3])) == 32
            )
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                "password_hash must be pbkdf2_sha256$<iterations>=10000+$<salt hex>$<sha256 hex>"
                " as written by config.settings.hash_password (never a plain passcode)"
            )
        return v

    def verify(self, passcode: bytes | str) -> bool:
        """Whether ``passcode`` matches (constant-time comparison)."""
        if isinstance(passcode, str):
            passcode = passcode.encode("utf-8")
        _, iterations, salt, expected = self.password_hash.split("$")
        digest = hashlib.pbkdf2_hmac("sha256", passcode, bytes.fromhex(salt), int(iterations))
        return hmac.compare_digest(digest, bytes.fromhex(expected))


class UserIdentitySettings(_Section):
    """DICOM User Identity Negotiation (PS3.7 D.3.3.7), only over TLS."""

    enabled: bool = False
    required: bool = Field(
        default=True, description="reject associations that carry no user identity"
    )
    users: tuple[UserAccount, ...] = ()

    @model_validator(mode="after")
    def _v_users(self) -> UserIdentitySettings:
        if self.enabled and not self.users:
            raise ValueError("user identity is enabled but no [[node.user_identity.users]]")
        names = [u.username for u in self.users]
        if len(names) != len(set(names)):
            raise ValueError("user identity usernames must be unique")
        return self

    def find(self, username: str) -> UserAccount | None:
        """The account with this username, if any."""
        return next((u for u in self.users if u.username == username), None)


AUTO_RECEIVERS_MAX = 8
"""``node.receivers = 0`` starts :data:`RECEIVERS_PER_CORE` receiver processes per usable
core, at most this many."""
RECEIVERS_PER_CORE = 2
"""Receiver processes per usable core with ``node.receivers = 0``."""


def auto_receivers() -> int:
    """Two receiver processes per core this process may run on, at most
    :data:`AUTO_RECEIVERS_MAX`.

    Each process holds one interpreter lock, so one process serves at most one core's
    worth of senders (``docs/performance.md``: the cspine rows against cspine-1r); and
    a receiver waits for its flushes part of the time, while two associations in one
    process contend for its lock, so with four senders on two cores four processes
    answered faster than two. Idle ones cost only their memory (about 130 MB resident
    each).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(RECEIVERS_PER_CORE * cores, AUTO_RECEIVERS_MAX))


class NodeSettings(_Section):
    """The listening Application Entity."""

    ae_title: str = "CSPINE"
    host: str = "127.0.0.1"
    port: int = Field(default=11112, ge=0, le=65535)
    peers: tuple[Peer, ...] = ()
    allow_any_peer: bool = False
    extra_storage_sop_classes: tuple[str, ...] = ()
    max_associations: int = Field(default=10, ge=1)
    receivers: int = Field(
        default=0,
        ge=0,
        le=64,
        description=(
            "receiver processes sharing the listening socket (cspine serve); 0: "
            f"{RECEIVERS_PER_CORE} per usable core, at most {AUTO_RECEIVERS_MAX}"
        ),
    )
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=30.0, gt=0)
    network_timeout: float = Field(default=60.0, gt=0)
    max_association_seconds: float = Field(default=3600.0, gt=0)
    max_pdu_size: int = Field(
        default=131072,
        ge=4096,
        le=16 * 1024**2,
        description="largest P-DATA PDU accepted; 0 (unlimited) is not allowed",
    )
    max_instance_bytes: int = Field(default=2 * 1024**3, gt=0)
    max_pixels: int = Field(default=512 * 1024 * 1024, gt=0)
    tls: TLSSettings = TLSSettings()
    user_identity: UserIdentitySettings = UserIdentitySettings()

    _v_ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))

    @field_validator("receivers")
    @classmethod
    def _v_receivers(cls, v: int) -> int:
        return v or auto_receivers()

    @model_validator(mode="after")
    def _v_identity_needs_tls(self) -> NodeSettings:
        if self.user_identity.enabled and not self.tls.enabled:
            raise ValueError(
                "node.user_identity needs node.tls.enabled = true: User Identity "
                "passcodes travel in clear text without TLS"
            )
        return self


class StorageSettings(_Section):
    """Where the catalog and the file store live."""

    data_dir: Path = Path("./var")
    store_dir: str = ""
    database_url: str = ""
    min_free_bytes: int = Field(default=512 * 1024**2, ge=0)
    fsync: bool = True
    acknowledge: Literal["catalog", "journal"] = "journal"
    """When a C-STORE is answered 0x0000. ``catalog``: after the file is at its content
    address and its catalog row is committed (both flushed). ``journal``: after the
    validated file is flushed into the ingest journal (``storage/journal.py``); an
    applier process writes the row behind the answer, and ``cspine serve`` applies
    what is left before it listens again after a crash."""
    journal_flush: Literal["file", "filesystem"] = "file"
    """How a journal entry is made durable before its answer. ``file``: ``fdatasync`` of
    the entry, rename, ``fsync`` of the journal folder (two flushes). ``filesystem``:
    rename, then one ``syncfs(2)`` of the store's filesystem (Linux), which also flushes
    everything else dirty there: for a store on a filesystem of its own."""
    appliers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="journal applier processes of cspine serve, each on its share of entries",
    )
    apply_batch: int = Field(default=64, ge=1, le=1024)
    """Journal entries an applier records in one catalog transaction (their names
    flushed together, one commit for all). Larger batches cost less CPU per instance
    and hold the catalog's writer lock longer at a time (about 0.06 ms per entry)."""
    apply_delay_seconds: float = Field(default=2.0, ge=0, le=3600)
    """How long an applier may hold answered entries back while instances keep
    arriving: it applies after a pause in arrivals (50 ms), or once its oldest entry
    has waited this long. During a burst the receivers then keep the cores and the disk
    to themselves; the catalog (and ``cspine studies``) lags by up to this much under a
    steady stream. 0: apply as soon as entries wait."""
    applier_nice: int = Field(default=19, ge=0, le=19)
    """Niceness added to each applier process. The senders wait for the receivers'
    answers, not for the applier: at 19 it yields the cores to receivers (and to the
    worker) and catches up in their gaps, so the catalog lags the answers during a busy
    burst; the journal keeps every answered instance meanwhile, and a study is not
    complete while its entries wait. 0: the applier competes as an equal."""
    orphan_grace_seconds: float | None = Field(default=None, ge=0)
    """The start-up repair leaves spool and unrecorded store files younger than this
    (another host's receiver may be between its rename and its commit). ``None``: 0 on
    SQLite, 900 on PostgreSQL (a store shared by several hosts)."""

    @property
    def store_path(self) -> Path:
        """Root of the file store."""
        return Path(self.store_dir) if self.store_dir else self.data_dir / "store"

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the catalog."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'catalog.sqlite').as_posix()}"


class CompletionSettings(_Section):
    """When a study counts as complete."""

    stable_seconds: float = Field(default=10.0, ge=0)
    check_interval_seconds: float = Field(default=2.0, gt=0)


class ModelSettings(_Section):
    """Which model packages the worker loads."""

    registry: str = ""
    seg_model: str = "seg-demo"
    cls_model: str = "cls-demo"
    device: str = "auto"
    fracture_threshold: float = Field(default=0.5, gt=0, lt=1)


class GateSettings(_Section):
    """The AI's guards: each stage's intended use and the plausibility of stage 1.

    ``stage1``/``stage2`` may narrow the limits a model package states in its
    ``model.json`` (``intended_use``), never widen them: a wider value is refused when
    the worker loads the models.
    """

    intended_use: bool = True
    plausibility: bool = True
    stage1: dict[str, Any] = Field(default_factory=dict)
    stage2: dict[str, Any] = Field(default_factory=dict)
    plausibility_limits: dict[str, float] = Field(default_factory=dict)


class Destination(_Section):
    """A place that receives the node's results: a remote AE by C-STORE (``kind =
    "cstore"``, the default), a DICOMweb server by STOW-RS (``kind = "stow"``) or a
    webhook that gets signed JSON notifications of findings (``kind = "webhook"``).

    ``name`` identifies the destination in the catalog across restarts (default
    ``AE@HOST:PORT``, or the URL of a STOW-RS or webhook destination): deliveries
    waiting for it follow a change of address or transport under the same name, and
    are held (never sent elsewhere) when the name leaves the configuration.

    The credentials of a STOW-RS destination (``bearer_token``, or ``username`` and
    ``password``) and the ``secret`` of a webhook stay in the configuration; the
    catalog never holds them.
    """

    name: str | None = Field(default=None, min_length=1, max_length=128)
    kind: Literal["cstore", "stow", "webhook"] = "cstore"
    ae_title: str = ""
    host: str = ""
    port: int = Field(default=104, ge=1, le=65535)
    outputs: tuple[str, ...] = ("seg", "sr", "summary")
    """Output kinds it takes (a webhook takes ``notification`` only, its default)."""
    tls: bool = False
    url: str | None = Field(default=None, max_length=1024)
    """STOW-RS: the DICOMweb base URL (``.../dicom-web``); webhook: the URL posted to."""
    bearer_token: SecretStr | None = None
    username: str | None = None
    password: SecretStr | None = None
    ca_file: Path | None = None
    """HTTPS: the CA bundle the server's certificate must chain to (default: the
    system's)."""
    tls_verify: bool = True
    """HTTPS: check the server's certificate (leave on outside a test bench)."""
    secret: SecretStr | None = None
    """Webhook: the HMAC-SHA256 key of the ``X-Cspine-Signature`` header."""
    timeout_s: float = Field(default=30.0, gt=0)
    """STOW-RS and webhook: seconds to wait for the server's answer."""

    _v_ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v) if v else v))

    @model_validator(mode="before")
    @classmethod
    def _v_webhook_outputs(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind") == "webhook" and "outputs" not in data:
            return {**data, "outputs": ("notification",)}
        return data

    @model_validator(mode="after")
    def _v_kind(self) -> Destination:
        if self.kind == "cstore":
            if not self.ae_title or not self.host:
                raise ValueError("a cstore destination needs ae_title and host")
        else:
            if not self.url or not self.url.startswith(("http://", "https://")):
                raise ValueError(f"a {self.kind} destination needs an http:// or https:// url")
            if (self.username is None) != (self.password is None):
                raise ValueError("username and password go together")
            if self.bearer_token is not None and self.username is not None:
                raise ValueError("use bearer_token or username/password, not both")
            if self.kind == "webhook" and self.secret is None:
                raise ValueError("a webhook destination needs a secret")
            if self.ca_file is not None and not self.ca_file.is_file():
                raise ValueError(f"ca_file {self.ca_file} is not a readable file")
        return self

    @property
    def label(self) -> str:
        """Its ``name``, or ``AE@HOST:PORT`` (the URL for STOW-RS and webhooks)."""
        if self.name:
            return self.name
        if self.kind == "cstore":
            return f"{self.ae_title}@{self.host}:{self.port}"
        return str(self.url)

    @classmethod
    def parse(cls, spec: str) -> Destination:
        """Parse ``AE@HOST:PORT``."""
        ae, host, port = parse_ae_spec(spec)
        return cls(ae_title=ae, host=host, port=port)


class NotificationSettings(_Section):
    """Notifications of findings to ``kind = "webhook"`` destinations (see
    ``dicom_node.notify``). Nothing is queued while no webhook destination is
    configured."""

    threshold: float | None = Field(default=None, ge=0, le=1)
    """Patient-level probability at or above which a study is notified (default:
    ``models.fracture_threshold``)."""
    on_not_processed: bool = False
    """Also notify studies that end NOT_PROCESSED."""
    include_identifiers: bool = False
    """Add the Study Instance UID, Accession Number and Patient ID to the body (off: the
    body names the study by its catalog id only)."""


class DeliverySettings(_Section):
    """Retries of the outbox (see ``dicom_node.delivery``)."""

    max_attempts: int = Field(default=100, ge=1)
    """Failed attempts of one delivery before it is dead-lettered (``cspine resend``
    queues it again); with the default backoff cap about 8 hours of trying."""
    max_backoff_s: float = Field(default=300.0, gt=0)
    """Longest wait between two attempts (the wait doubles from 1 s)."""


class SelectionSettings(_Section):
    """Series-selection rules, applied in order (see ``dicom_node.selection``)."""

    modalities: tuple[str, ...] = ("CT",)
    require_image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY")
    max_obliquity_degrees: float = Field(default=10.0, ge=0)
    exclude_image_types: tuple[str, ...] = ("LOCALIZER",)
    min_slices: int = Field(default=20, ge=1)
    min_coverage_mm: float = Field(default=40.0, ge=0)
    bone_kernel_patterns: tuple[str, ...] = (
        "BONE",
        "SHARP",
        "LUNG",
        "DETAIL",
        "EDGE",
        "B6",
        "B7",
        "B8",
        "Br6",
        "H6",
        "H7",
        "FC3",
        "FC5",
        "FC8",
        "YC",
        "YD",
    )
    soft_kernel_patterns: tuple[str, ...] = (
        "SOFT",
        "STANDARD",
        "STND",
        "B2",
        "B3",
        "Br3",
        "H3",
        "H4",
        "FC1",
        "FC0",
    )
    send_not_processed_sr: bool = True


class WorkerSettings(_Section):
    """The local inference worker."""

    enabled: bool = True
    poll_seconds: float = Field(default=1.0, gt=0)
    send_failed_sr: bool = True
    """Deliver a not-processed SR ("internal error (job N)") when a job fails."""


class LoggingSettings(_Section):
    """Log level and format."""

    level: str = "INFO"


WEB_TOKEN_MIN_LENGTH = 16
"""Shortest bearer token the status page accepts."""


class WebSettings(_Section):
    """The read-only status page and Prometheus metrics, served by ``cspine serve``.

    Off by default, on loopback unless ``allow_remote`` is set. Patient-related
    identifiers (Study Instance UID, study date) are shown only with ``show_identifiers``.

    Who may read it:

    * without ``tls_ca``: every request needs ``Authorization: Bearer <token>``
      (over plain HTTP, or HTTPS with ``tls_cert`` and ``tls_key``);
    * with ``tls_ca`` (needs ``tls_cert`` and ``tls_key``): the TLS handshake requires
      a client certificate signed by that CA, and that certificate is the credential;
      ``token`` may then be empty. A token that is set is required as well (both
      credentials), never accepted instead of the certificate.

    The TLS files are checked when the page is enabled: readable PEM files, and a
    certificate that loads with its key.
    """

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=8088, ge=0, le=65535)
    token: str = Field(default="", repr=False)
    allow_remote: bool = False
    show_identifiers: bool = False
    tls_cert: str = ""
    """PEM server certificate (chain): the page is served over HTTPS when set."""
    tls_key: str = ""
    """PEM private key of ``tls_cert`` (unencrypted)."""
    tls_ca: str = ""
    """PEM CA bundle: when set, clients must present a certificate it signed."""

    @property
    def tls(self) -> bool:
        """Whether the page is served over HTTPS (``tls_cert`` and ``tls_key`` set)."""
        return bool(self.tls_cert)

    @property
    def client_certificate(self) -> bool:
        """Whether a client certificate signed by ``tls_ca`` is required."""
        return bool(self.tls_ca)

    @model_validator(mode="after")
    def _v_enabled(self) -> WebSettings:
        self._check_tls_pairs()
        if not self.enabled:
            return self
        if (self.token or not self.client_certificate) and len(self.token) < WEB_TOKEN_MIN_LENGTH:
            raise ValueError(
                f"web.enabled needs web.token of at least {WEB_TOKEN_MIN_LENGTH} characters "
                "(for example from: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
                ", or CSPINE_WEB__TOKEN), or client certificates (web.tls_ca with "
                "web.tls_cert and web.tls_key) and no token"
            )
        if not self.allow_remote and not _is_loopback(self.host):
            raise ValueError(
                f"refusing to serve the status page on {self.host}: a non-loopback address "
                "needs web.allow_remote = true (and web.tls_cert/web.tls_key, or a TLS proxy "
                "in front)"
            )
        if self.tls:
            self._check_tls_files()
        return self

    def _check_tls_pairs(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            given, missing = ("tls_cert", "tls_key") if self.tls_cert else ("tls_key", "tls_cert")
            raise ValueError(
                f"web.{given} needs web.{missing}: HTTPS for the status page takes a "
                "certificate and its private key (PEM files)"
            )
        if self.tls_ca and not self.tls_cert:
            raise ValueError(
                "web.tls_ca (client certificates) needs HTTPS: set web.tls_cert and "
                "web.tls_key as well"
            )

    def _check_tls_files(self) -> None:
        names = ("tls_cert", "tls_key", "tls_ca") if self.tls_ca else ("tls_cert", "tls_key")
        bad = [
            f"web.{name} ({getattr(self, name)})"
            for name in names
            if not _readable_file(getattr(self, name))
        ]
        if bad:
            raise ValueError(
                "the status page's TLS needs readable PEM files; missing or unreadable: "
                + ", ".join(bad)
            )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"cannot load web.tls_cert {self.tls_cert!r} with web.tls_key "
                f"{self.tls_key!r}: {exc}"
            ) from exc
        if self.tls_ca:
            try:
                ctx.load_verify_locations(cafile=self.tls_ca)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"cannot load web.tls_ca {self.tls_ca!r}: {exc}") from exc


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Settings(BaseSettings):
    """All settings of one node process."""

    model_config = SettingsConfigDict(
        env_prefix="CSPINE_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    node: NodeSettings = NodeSettings()
    storage: StorageSettings = StorageSettings()
    completion: CompletionSettings = CompletionSettings()
    models: ModelSettings = ModelSettings()
    gate: GateSettings = GateSettings()
    destinations: tuple[Destination, ...] = ()
    delivery: DeliverySettings = DeliverySettings()
    notifications: NotificationSettings = NotificationSettings()
    selection: SelectionSettings = SelectionSettings()
    worker: WorkerSettings = WorkerSettings()
    logging: LoggingSettings = LoggingSettings()
    web: WebSettings = WebSettings()

    @model_validator(mode="after")
    def _v_destination_names(self) -> Settings:
        names = [d.label for d in self.destinations]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"destination names must be unique; repeated: {', '.join(repeated)}")
        return self

    @model_validator(mode="after")
    def _v_destination_tls(self) -> Settings:
        tls_dests = [d.label for d in self.destinations if d.tls and d.kind == "cstore"]
        if tls_dests:
            try:
                self.node.tls.check_files()
            except ValueError as exc:
                raise ValueError(
                    f"destination {tls_dests[0]} has tls = true, which uses node.tls: {exc}"
                ) from None
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The sources, highest priority first: CLI flags, environment, TOML files.

        The TOML files and the environment are those :func:`load_settings` was given;
        ``Settings(**flags)`` on its own reads ``config/default.toml`` and ``os.environ``
        when it is called. pydantic-settings deep-merges the sources' tables, so a file or
        variable that sets one key of a section keeps the other keys of the layers
        below; a list (``[[destinations]]``, ``node.peers``) is replaced whole.
        """
        inputs = _LOAD_INPUTS.get() or _LoadInputs((DEFAULT_TOML,), os.environ)
        return (
            init_settings,
            _EnvironSource(settings_cls, inputs.environ),
            *(_TomlFileSource(settings_cls, path) for path in reversed(inputs.toml_files)),
        )


@dataclass(frozen=True)
class _LoadInputs:
    """What one :func:`load_settings` call reads: TOML files (lowest first), environment."""

    toml_files: tuple[Path, ...]
    environ: Mapping[str, str]


# settings_customise_sources is a classmethod with no per-call arguments: load_settings
# hands it the files and environment through this, set and reset around one Settings().
_LOAD_INPUTS: ContextVar[_LoadInputs | None] = ContextVar("cspine_settings_inputs", default=None)


class _TomlFileSource(TomlConfigSettingsSource):
    """One TOML file; unlike the stock source, a missing or broken file is an error."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        if not path.is_file():
            raise ConfigError(f"config file {path} is not a file")
        super().__init__(settings_cls, toml_file=path)

    def _read_file(self, file_path: Path | Traversable) -> dict[str, Any]:
        try:
            return super()._read_file(file_path)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file_path} is not valid TOML: {exc}") from exc
        except OSError as exc:
            raise ConfigError(f"cannot read config file {file_path}: {exc}") from exc


class _EnvironSource(EnvSettingsSource):
    """``CSPINE_<SECTION>__<KEY>`` variables read from a given mapping, not ``os.environ``.

    On top of the stock source: a variable naming a section the settings do not have
    is refused (``extra="forbid"``) instead of ignored, as a misspelt key is; a value
    that is not valid JSON where a list or table is expected is passed on as text,
    so that validation names the setting; and entries of free-form tables
    (``gate.stage1``) are decoded from JSON like the rest.
    """

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ  # read by _load_env_vars, which the base __init__ calls
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        if self.case_sensitive:
            return dict(self._environ)
        return {name.lower(): value for name, value in self._environ.items()}

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        """JSON-decode a list or table; text that is not JSON is returned unchanged."""
        try:
            return super().decode_complex_value(field_name, field, value)
        except ValueError:
            return value

    def explode_env_vars(
        self, field_name: str, field: FieldInfo, env_vars: Mapping[str, str | None]
    ) -> dict[str, Any]:
        """Nested variables of one section, free-form table entries decoded from JSON."""
        exploded = super().explode_env_vars(field_name, field, env_vars)
        decoded: dict[str, Any] = _decode_free_form(exploded, field.annotation)
        return decoded

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        prefix = self._apply_case_sensitive(self.env_prefix)
        delimiter = self.env_nested_delimiter or ""
        for name, raw in self.env_vars.items():
            if not delimiter or not name.startswith(prefix):
                continue
            section, sep, rest = name[len(prefix) :].partition(delimiter)
            if sep and section not in self.settings_cls.model_fields:
                data.setdefault(section, {})[rest] = raw
        return data


def _decode_free_form(value: Any, annotation: Any) -> Any:
    """JSON-decode text found where ``annotation`` is ``Any`` (inside ``dict[str, Any]``).

    pydantic-settings decodes a variable whose field is a list, a table or a model; an
    entry of a free-form table has no such type and would stay text.
    """
    if isinstance(value, dict):
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            fields = annotation.model_fields
            return {
                key: _decode_free_form(item, fields[key].annotation if key in fields else None)
                for key, item in value.items()
            }
        if get_origin(annotation) is dict:
            inner = get_args(annotation)[-1]
            return {key: _decode_free_form(item, inner) for key, item in value.items()}
        return value
    if isinstance(value, str) and annotation is Any:
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def parse_ae_spec(spec: str) -> tuple[str, str, int]:
    """Split ``AE@HOST:PORT`` into its parts.

    Raises
    ------
    ConfigError
        When the text is not of that form.
    """
    try:
        ae, rest = spec.split("@", 1)
        host, port = rest.rsplit(":", 1)
        return _check_ae_title(ae), host.strip("[]"), int(port)
    except ValueError as exc:
        raise ConfigError(f"expected AE@HOST:PORT, got {spec!r}") from exc


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Load the settings of this process.

    Parameters
    ----------
    config_file
        Optional TOML file layered over the embedded defaults.
    overrides
        Nested mapping from CLI flags, highest priority. ``None`` values are ignored.
    environ
        Environment to read ``CSPINE_`` variables from; defaults to ``os.environ``.

    Returns
    -------
    Settings
        The frozen settings.

    Raises
    ------
    ConfigError
        When a source is unreadable or a value is invalid.
    """
    files = (DEFAULT_TOML, Path(config_file)) if config_file else (DEFAULT_TOML,)
    inputs = _LoadInputs(files, os.environ if environ is None else environ)
    token = _LOAD_INPUTS.set(inputs)
    try:
        return Settings(**_drop_none(overrides or {}))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"invalid setting {where}: {first['msg']}") from exc
    except SettingsError as exc:
        raise ConfigError(f"invalid environment setting: {exc}: {exc.__cause__}") from exc
    finally:
        _LOAD_INPUTS.reset(token)


def _drop_none(mapping: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            inner = _drop_none(value)
            if inner:
                out[key] = inner
        elif value is not None:
            out[key] = value
    return out


def check_bind_safety(settings: Settings) -> None:
    """Refuse an open listener: non-loopback bind with no peer allow-list.

    Raises
    ------
    ConfigError
        When ``node.host`` is not a loopback address, ``node.peers`` is empty and
        ``node.allow_any_peer`` is not set.
    """
    node = settings.node
    try:
        loopback = ipaddress.ip_address(node.host).is_loopback
    except ValueError:
        loopback = node.host == "localhost"
    if not loopback and not node.peers and not node.allow_any_peer:
        raise ConfigError(
            f"refusing to listen on {node.host}: a non-loopback address needs a peer allow-list "
            "([[node.peers]]) or an explicit node.allow_any_peer = true"
        )
