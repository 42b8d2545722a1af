"""The real-data rule: skipped with a reason outside CI, a failure with ``CI=true``."""

from __future__ import annotations

import pytest

from tests import conftest


def test_missing_real_data_skips_outside_ci(monkeypatch, tmp_path):
    monkeypatch.setenv("CSPINE_REAL_DATA", str(tmp_path / "absent"))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="is not a folder"):
        conftest.require_real_data()


def test_missing_real_data_fails_in_ci(monkeypatch, tmp_path):
    monkeypatch.setenv("CSPINE_REAL_DATA", str(tmp_path / "absent"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        conftest.require_real_data()


def test_unset_variable_falls_back_to_the_folder_beside_the_checkout(monkeypatch, tmp_path):
    monkeypatch.delenv("CSPINE_REAL_DATA", raising=False)
    monkeypatch.setattr(conftest, "REAL_DATA_DEFAULT", tmp_path)
    assert conftest.require_real_data() == tmp_path.resolve()
    monkeypatch.setattr(conftest, "REAL_DATA_DEFAULT", tmp_path / "absent")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CSPINE_REAL_DATA is not set"):
        conftest.require_real_data()
