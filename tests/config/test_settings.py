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


def test_receivers_default_to_two_per_usable_core_at_most_eight(monkeypatch):
    import os

    from config import settings as settings_module

    cores = len(os.sched_getaffinity(0))
    assert load_settings(environ={}).node.receivers == min(2 * cores, 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)))
    assert settings_module.auto_receivers() == 8
    assert load_settings(environ={}).node.receivers == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2})
    assert load_settings(environ={}).node.receivers == 6
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0})
    assert load_settings(environ={}).node.receivers == 2
    assert load_settings(environ={"CSPINE_NODE__RECEIVERS": "3"}).node.receivers == 3


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


# --- pydantic-settings sources: precedence, merging, environment, errors ---------------


@pytest.fixture
def site_toml(tmp_path):
    cfg = tmp_path / "site.toml"
    cfg.write_text(
        "[node]\nport = 2000\n"
        "[node.tls]\ncheck_hostname = false\n"
        '[[node.peers]]\nae_title = "FILEPEER"\n'
        '[[destinations]]\nae_title = "FILEPACS"\nhost = "10.0.0.5"\nport = 104\n'
    )
    return cfg


@pytest.mark.parametrize(
    ("use_file", "env_port", "cli_port", "expected"),
    [
        (False, None, None, 11112),  # default.toml
        (True, None, None, 2000),  # --config beats the defaults
        (True, "3000", None, 3000),  # environment beats the file
        (False, "3000", None, 3000),
        (True, "3000", 4000, 4000),  # CLI beats everything
        (False, None, 4000, 4000),
    ],
)
def test_each_layer_beats_the_one_below(site_toml, use_file, env_port, cli_port, expected):
    env = {"CSPINE_NODE__PORT": env_port} if env_port else {}
    s = load_settings(
        site_toml if use_file else None, overrides={"node": {"port": cli_port}}, environ=env
    )
    assert s.node.port == expected


def test_a_partial_section_keeps_the_other_defaults(site_toml):
    s = load_settings(site_toml, environ={"CSPINE_NODE__TLS__ENABLED": "false"})
    assert s.node.port == 2000
    assert (s.node.ae_title, s.node.host) == ("CSPINE", "127.0.0.1")  # rest of [node]
    assert s.node.tls.check_hostname is False  # from the file
    assert s.node.tls.require_client_certificate is True  # rest of [node.tls]
    assert s.selection.min_slices == 20  # sections the file does not name


def test_lists_are_replaced_not_merged(site_toml):
    s = load_settings(site_toml, environ={})
    assert [p.ae_title for p in s.node.peers] == ["FILEPEER"]
    assert [d.ae_title for d in s.destinations] == ["FILEPACS"]
    env = {"CSPINE_NODE__PEERS": '[{"ae_title": "ENVPEER"}]'}
    cli = {"destinations": [{"ae_title": "CLIPACS", "host": "10.0.0.6", "port": 11112}]}
    s = load_settings(site_toml, overrides=cli, environ=env)
    assert [p.ae_title for p in s.node.peers] == ["ENVPEER"]
    assert [d.ae_title for d in s.destinations] == ["CLIPACS"]


def test_environment_lists_and_tables_are_json():
    env = {
        "CSPINE_SELECTION__MODALITIES": '["CT", "MR"]',
        "CSPINE_NODE__PEERS": '[{"ae_title": "CT1", "host": "10.0.0.0/24"}]',
        "CSPINE_NODE__TLS": '{"check_hostname": false}',
        "CSPINE_GATE__STAGE1__SLICE_THICKNESS_MM": "[0.5, 1.0]",
        "CSPINE_GATE__STAGE2": '{"max_tilt_deg": 5}',
        "CSPINE_GATE__PLAUSIBILITY_LIMITS__MAX_LEVELS": "7",
        "CSPINE_STORAGE__FSYNC": "false",
        "CSPINE_COMPLETION__STABLE_SECONDS": "2.5",
    }
    s = load_settings(environ=env)
    assert s.selection.modalities == ("CT", "MR")
    assert s.node.peers[0].host == "10.0.0.0/24"
    assert s.node.tls.check_hostname is False and s.node.tls.require_client_certificate
    assert s.gate.stage1 == {"slice_thickness_mm": [0.5, 1.0]}
    assert s.gate.stage2 == {"max_tilt_deg": 5}
    assert s.gate.plausibility_limits == {"max_levels": 7.0}
    assert s.storage.fsync is False
    assert s.completion.stable_seconds == 2.5


def test_only_the_given_environment_is_read(monkeypatch):
    monkeypatch.setenv("CSPINE_NODE__PORT", "3000")
    monkeypatch.setenv("CSPINE_REAL_DATA", "/somewhere")  # not a setting: no "__"
    assert load_settings(environ={}).node.port == 11112
    assert load_settings().node.port == 3000  # environ=None: os.environ


def test_a_load_leaves_nothing_behind_for_the_next(site_toml):
    assert load_settings(site_toml, environ={"CSPINE_NODE__HOST": "::1"}).node.port == 2000
    with pytest.raises(ConfigError):
        load_settings(site_toml, environ={"CSPINE_NODE__PORT": "0x"})
    s = load_settings(environ={})
    assert (s.node.port, s.node.host, s.destinations) == (11112, "127.0.0.1", ())


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("[nodee]\nport = 1\n", {}, "invalid setting nodee: Extra inputs are not permitted"),
        (
            "[node]\nportt = 1\n",
            {},
            "invalid setting node.portt: Extra inputs are not permitted",
        ),
        (
            None,
            {"CSPINE_LOGGING__LEVL": "INFO"},
            "invalid setting logging.levl: Extra inputs are not permitted",
        ),
        (
            None,
            {"CSPINE_LOGGNG__LEVEL": "INFO"},
            "invalid setting loggng: Extra inputs are not permitted",
        ),
        (
            None,
            {"CSPINE_NODE__PORT": "abc"},
            "invalid setting node.port: Input should be a valid integer, unable to parse "
            "string as an integer",
        ),
        (
            None,
            {"CSPINE_NODE__PORT": "99999"},
            "invalid setting node.port: Input should be less than or equal to 65535",
        ),
        (
            None,
            {"CSPINE_SELECTION__MODALITIES": "CT"},
            "invalid setting selection.modalities: Input should be a valid tuple",
        ),
        (
            None,
            {"CSPINE_NODE__PEERS": '[{"ae_title": '},
            "invalid setting node.peers: Input should be a valid tuple",
        ),
        (
            None,
            {"CSPINE_NODE__PEERS": '[{"ae_title": "CT1", "hst": "10.0.0.1"}]'},
            "invalid setting node.peers.0.hst: Extra inputs are not permitted",
        ),
        (
            '[node]\nae_title = "WAY-TOO-LONG-AE-TITLE"\n',
            {},
            "invalid setting node.ae_title: Value error, an AE title must have 1 to 16 characters",
        ),
    ],
)
def test_errors_name_the_setting(tmp_path, toml, env, message):
    cfg = None
    if toml is not None:
        cfg = tmp_path / "site.toml"
        cfg.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ=env)
    assert str(info.value) == message


def test_unreadable_config_files_are_refused(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_settings(missing, environ={})
    assert str(info.value) == f"config file not found: {missing}"
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path, environ={})
    assert str(info.value) == f"config file {tmp_path} is not a file"
    broken = tmp_path / "broken.toml"
    broken.write_text("[node\nport = 1\n")
    with pytest.raises(ConfigError) as info:
        load_settings(broken, environ={})
    assert str(info.value).startswith(f"config file {broken} is not valid TOML: Expected ']'")


def test_stow_and_webhook_destinations_need_a_url_and_keep_their_secrets_out_of_repr():
    stow = {"kind": "stow", "url": "https://pacs.example/dicom-web", "bearer_token": "t0k3n"}
    hook = {"kind": "webhook", "url": "http://127.0.0.1:9/hook", "secret": "s3cr3t"}
    s = load_settings(overrides={"destinations": [stow, hook]}, environ={})
    assert [d.label for d in s.destinations] == [stow["url"], hook["url"]]
    assert s.destinations[0].outputs == ("seg", "sr", "summary")
    assert s.destinations[1].outputs == ("notification",)
    assert "t0k3n" not in repr(s) and "s3cr3t" not in repr(s)
    bad = [
        {"kind": "stow"},
        {"kind": "stow", "url": "ftp://pacs.example/"},
        {"kind": "stow", "url": "http://pacs.example/", "username": "node"},
        {"kind": "stow", "url": "http://p/", "bearer_token": "t", "username": "u", "password": "p"},
        {"kind": "webhook", "url": "http://127.0.0.1:9/hook"},
        {"kind": "cstore", "host": "pacs.example"},
    ]
    for dest in bad:
        with pytest.raises(ConfigError):
            load_settings(overrides={"destinations": [dest]}, environ={})
