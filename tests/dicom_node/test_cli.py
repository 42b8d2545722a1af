"""The admin CLI as a subprocess against a real server; no identifiers in any log. The
commands that use the catalog run on SQLite and on PostgreSQL."""

from __future__ import annotations

import time

import pytest

from tests.conftest import free_port
from tests.dicom_node.proc import Server, cspine
from tests.helpers import SECRET_ACCESSION, SECRET_BIRTH, SECRET_ID, SECRET_NAME, write_series

SECRETS = (SECRET_NAME, SECRET_ID, SECRET_BIRTH, SECRET_ACCESSION, "SECRETNAME", "TESTPATIENT")


def _assert_no_phi(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"patient identifier {secret!r} leaked"


@pytest.mark.slow
def test_send_studies_show_echo_and_no_identifiers_in_logs(tmp_path, database_url):
    data_dir = tmp_path / "var"
    port = free_port()
    series = write_series(tmp_path / "study", 8)
    db = {"CSPINE_STORAGE__DATABASE_URL": database_url}
    env = {"CSPINE_LOGGING__LEVEL": "DEBUG", **db}
    server = Server(data_dir, port, "--no-worker", "--stable-seconds", "1", env=env).start()
    try:
        echo = cspine("echo", f"127.0.0.1:{port}", "--ae-title", "CSPINE", env=env)
        assert echo.returncode == 0, echo.stderr
        sent = cspine("send", str(series[0].parent), "--to", f"CSPINE@127.0.0.1:{port}", env=env)
        assert sent.returncode == 0, sent.stderr
        assert "0x0000: 8" in sent.stdout and "sent 8 of 8" in sent.stdout
        deadline = time.monotonic() + 30
        listing = ""
        while time.monotonic() < deadline:
            listing = cspine("studies", "--data-dir", str(data_dir), env=db).stdout
            if "COMPLETE" in listing:
                break
            time.sleep(0.5)
        assert "COMPLETE" in listing, listing
        shown = cspine("show", "1", "--data-dir", str(data_dir), env=db)
        assert shown.returncode == 0 and "8 instances" in shown.stdout
        assert "complete: no new instance" in shown.stdout
        replayed = cspine("replay", "1", "--data-dir", str(data_dir), env=db)
        assert replayed.returncode == 0 and "queued version 2" in replayed.stdout
        status = cspine("status", "--data-dir", str(data_dir), env=db)
        assert status.returncode == 0 and "QUEUED 1" in status.stdout
        assert "SUPERSEDED 1" in status.stdout
        for out in (echo, sent, shown, replayed, status):
            _assert_no_phi(out.stdout + out.stderr)
        _assert_no_phi(listing)
    finally:
        server.stop()
    log = server.log()
    assert "association accepted calling_ae=CSPINE" in log  # AE titles are logged
    assert "study complete study_id=1" in log  # catalog ids are logged
    _assert_no_phi(log)


def test_import_uses_the_same_checks(tmp_path, database_url):
    data_dir = tmp_path / "var"
    db = {"CSPINE_STORAGE__DATABASE_URL": database_url}
    good = write_series(tmp_path / "good", 3)
    bad = tmp_path / "bad" / "not-dicom.dcm"
    bad.parent.mkdir()
    bad.write_bytes(b"this is not DICOM")
    ok = cspine("import", "--data-dir", str(data_dir), str(tmp_path / "good"), env=db)
    assert ok.returncode == 0, ok.stderr
    assert "0x0000 STORED: 3" in ok.stdout
    again = cspine("import", "--data-dir", str(data_dir), str(tmp_path / "good"), env=db)
    assert "0x0000 DUPLICATE: 3" in again.stdout
    refused = cspine("import", "--data-dir", str(data_dir), str(bad), env=db)
    assert refused.returncode != 0
    assert "0xC210" in refused.stdout
    assert refused.stderr.strip().splitlines()[-1].startswith("cspine: error:")
    listing = cspine("studies", "--data-dir", str(data_dir), env=db).stdout
    assert " 3 " in listing and "RECEIVING" in listing
    assert good[0].exists()  # import never consumes the user's files


def test_cli_errors_are_one_line_and_nonzero(tmp_path):
    missing = cspine("show", "999", "--data-dir", str(tmp_path / "var"))
    assert missing.returncode != 0
    assert missing.stderr.strip() == "cspine: error: no study with id or Study Instance UID '999'"
    bad_dest = cspine("send", str(tmp_path), "--to", "nonsense")
    assert bad_dest.returncode != 0 and "AE@HOST:PORT" in bad_dest.stderr
    refused = cspine("echo", f"127.0.0.1:{free_port()}")
    assert refused.returncode != 0 and refused.stderr.count("\n") <= 3


def test_serve_refuses_open_bind_without_allow_list(tmp_path):
    run = cspine("serve", "--data-dir", str(tmp_path / "var"), "--host", "0.0.0.0", timeout=60)
    assert run.returncode != 0
    assert "allow_any_peer" in run.stderr and "peer allow-list" in run.stderr
