"""Settings precedence: default.toml < --config < CSPINE_ env < CLI flags."""

from __future__ import annotations

import pytest

from config import ConfigError, Settings, check_bind_safety, load_settings


def test_embedded_defaults():
    s = load_settings(environ={})
    assert (s.node.ae_title, s.node.host, s.node.port) == ("CSPINE", "127.0.0.1", 11112)
    assert s.storage.url.endswith("var/catalog.sqlite")
    assert str(s.storage.store_path) == "var/store"
    assert s.completion.stable_seconds == 10


def test_precedence(tmp_path):
    cfg = tmp_path / "site.toml"
    cfg.write_text('[node]\nport = 2000\nae_title = "FROMFILE"\n[completion]\nstable_seconds = 5\n')
    env = {"CSPINE_NODE__PORT": "3000", "CSPINE_NODE__PEERS": '[{"ae_title": "CT1"}]'}
    s = load_settings(cfg, overrides={"node": {"port": 4000, "ae_title": None}}, environ=env)
    assert s.node.port == 4000  # CLI beats env beats file
    assert s.node.ae_title == "FROMFILE"  # a None flag does not override
    assert s.node.peers[0].ae_title == "CT1"
    assert s.completion.stable_seconds == 5


def test_invalid_values_are_refused_with_the_key():
    with pytest.raises(ConfigError, match=r"node\.port"):
        load_settings(environ={"CSPINE_NODE__PORT": "99999"})
    with pytest.raises(ConfigError, match="ae_title"):
        load_settings(overrides={"node": {"ae_title": "WAY-TOO-LONG-AE-TITLE"}}, environ={})
    with pytest.raises(ConfigError, match="not found"):
        load_settings("/nonexistent.toml", environ={})


def test_open_bind_needs_allow_list_or_explicit_any():
    open_bind = load_settings(overrides={"node": {"host": "0.0.0.0"}}, environ={})
    with pytest.raises(ConfigError, match="allow_any_peer"):
        check_bind_safety(open_bind)
    check_bind_safety(
        load_settings(overrides={"node": {"host": "0.0.0.0", "allow_any_peer": True}}, environ={})
    )
    check_bind_safety(
        load_settings(
            overrides={"node": {"host": "0.0.0.0", "peers": [{"ae_title": "CT1"}]}}, environ={}
        )
    )
    assert isinstance(open_bind, Settings)
