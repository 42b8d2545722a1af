"""The one sha256 helper of the node: storage, the worker and model packages use it."""

from __future__ import annotations

import hashlib

from config.digest import sha256_file


def test_sha256_file_matches_hashlib_for_empty_small_and_multi_block_files(tmp_path):
    for name, data in {
        "empty": b"",
        "small": b"DICM",
        "large": bytes(range(256)) * 20_000,  # 5 MB: several read blocks
    }.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert sha256_file(path) == hashlib.sha256(data).hexdigest(), name


def test_storage_and_model_packages_use_the_same_helper():
    import ai.modelpkg
    import storage.catalog

    assert ai.modelpkg.sha256_file is sha256_file
    assert storage.catalog.sha256_file is sha256_file
