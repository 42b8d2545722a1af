"""Identity of the node's outputs: deterministic UIDs, series numbers, software version.

A job's outputs get SOP and Series Instance UIDs derived from the study's catalog key
and the job version: a job re-run after a crash reproduces the same objects, and a
new version gets new UIDs.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import version as dist_version
from typing import Any

from pydicom.uid import generate_uid

SERIES_NUMBERS = {"seg": 9001, "sr": 9002, "summary": 9003}
"""Series Number of each output kind."""


def output_uid(study_key: str, version: int, what: str) -> str:
    """Deterministic UID for one output of one job version.

    ``study_key`` names the catalog's study row (Study Instance UID and the row's
    creation time), so a study purged and received again never reuses old UIDs.
    """
    return generate_uid(entropy_srcs=["cspine-node", study_key, f"v{version}", what])


def device_uid(name: str, version: str, sha256: str) -> str:
    """Device UID of one model package, as its Contributing Equipment item names it.

    Derived from the package's name, version and weights sha256 (IHE AIR asks for a
    Device UID that changes whenever the algorithm changes): a retrained package (new
    weights) or a new release of the same weights (new version) gets a new UID, the same
    package always the same one, on every host.

    Raises
    ------
    ValueError
        If ``sha256`` is not 64 hexadecimal digits.
    """
    digest = str(sha256).lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f'Argument "sha256" must be 64 hexadecimal digits, got {sha256!r}.')
    return generate_uid(entropy_srcs=["cspine-node", "device", name, version, digest])


def pipeline_device_uid(device_uids: Iterable[str], node_version: str) -> str:
    """Device UID of the whole pipeline (the SR's device observer): the node's version and
    the Device UIDs of its model packages, so it changes whenever any of them changes."""
    return generate_uid(entropy_srcs=["cspine-node", "pipeline", node_version, *device_uids])


def software_version() -> str:
    """Version of the installed distribution (the writers name the product themselves)."""
    try:
        return dist_version("cspine-node")
    except Exception:
        return "0+unknown"


def output_ids(study_key: str, version: int, kind: str, name: str | None = None) -> dict[str, Any]:
    """The identity keywords a writer takes for output ``kind`` of one job version.

    ``name`` names the UIDs when it differs from ``kind``: a failed job's SR is an
    ``"sr"`` (its series number) with UIDs of its own (``"failed-sr"``), so it never
    shares them with the SR of a processed job of the same version.
    """
    what = name or kind
    return {
        "series_instance_uid": output_uid(study_key, version, f"{what}-series"),
        "sop_instance_uid": output_uid(study_key, version, what),
        "series_number": SERIES_NUMBERS[kind],
        "software_version": software_version(),
    }
