"""Send any file, even a broken one, to the node as a peer would, byte for byte."""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.dicom_node.scu_tools import chunked_send, serves_no_requests
from tests.helpers import CT

NOT_DICOM = (".nii", ".nii.gz", ".json", ".md", ".nrrd", ".txt", ".csv")
IMPLICIT_LE = "1.2.840.10008.1.2"
RAW_SOP_UID = "1.2.826.0.1.3680043.8.498.999999"


def dicom_candidates(root: Path) -> list[str]:
    """Every file under ``root`` that is not a known non-DICOM format, relative paths."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not p.name.endswith(NOT_DICOM)
    )


def send_plan(path: Path, scratch: Path) -> tuple[Path, str, str, str]:
    """How a peer would send ``path``: ``(file, SOP class, transfer syntax, mode)``.

    A file with a usable file meta group is sent as it is (``exact``). Otherwise the
    file's bytes after any preamble are wrapped in a minimal file meta group declaring
    CT and implicit VR little endian (``raw``): a hostile peer sending whatever it has.
    """
    try:
        meta = read_file_meta_info(path)
        sop_class = str(meta.MediaStorageSOPClassUID)
        ts = str(meta.TransferSyntaxUID)
        if sop_class and ts:
            return path, sop_class, ts, "exact"
    except Exception:
        pass
    data = path.read_bytes()
    if data[128:132] == b"DICM":
        data = _skip_group_2(data[132:])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT
    meta.MediaStorageSOPInstanceUID = RAW_SOP_UID
    meta.TransferSyntaxUID = IMPLICIT_LE
    out = scratch / (path.name + ".raw.dcm")
    with out.open("wb") as fh:
        fh.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fh, meta, enforce_standard=True)
        fh.write(data)
    return out, CT, IMPLICIT_LE, "raw"


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}
_LONG_VRS.add(b"UV")


def _skip_group_2(data: bytes) -> bytes:
    """Drop leading (0002,xxxx) elements (explicit VR little endian)."""
    pos = 0
    while len(data) >= pos + 8 and data[pos : pos + 2] == b"\x02\x00":
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            pos += 12 + int.from_bytes(data[pos + 8 : pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(data[pos + 6 : pos + 8], "little")
    return data[pos:]


def send_one(port: int, path: Path, sop_class: str, ts: str) -> tuple[str, str]:
    """C-STORE one file; return (``0xNNNN``, ``context-rejected`` or ``no-response``,
    and the Error Comment)."""
    ae = AE(ae_title="REALSCU")
    ae.add_requested_context(sop_class, ts)
    ae.add_requested_context(Verification)  # so a refused context still associates
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = serves_no_requests(ae.associate("127.0.0.1", port, ae_title="CSPINE"))
    if not assoc.is_established:
        return "association-failed", ""
    try:
        if not [c for c in assoc.accepted_contexts if c.abstract_syntax == sop_class]:
            return "context-rejected", ""
        with chunked_send():
            rsp = assoc.send_c_store(path)
        if "Status" not in rsp:
            return "no-response", ""
        return f"0x{int(rsp.Status):04X}", str(rsp.get("ErrorComment", ""))
    finally:
        if assoc.is_established:
            assoc.release()
