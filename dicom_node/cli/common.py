"""Options and helpers shared by every CLI subcommand."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import click

from config import Settings, load_settings

F = TypeVar("F", bound=Callable[..., Any])


def settings_options(fn: F) -> F:
    """Add ``--config`` and ``--data-dir`` to a command.

    The command receives ``config_file`` and ``data_dir`` and calls :func:`make_settings`.
    """

    @click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False),
        default=None,
        help="TOML file layered over the embedded defaults.",
    )
    @click.option(
        "--data-dir",
        type=click.Path(file_okay=False),
        default=None,
        help="Keep the catalog and the store under DIR.",
    )
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def make_settings(
    config_file: str | None, data_dir: str | None, overrides: dict[str, Any] | None = None
) -> Settings:
    """Load settings for this invocation (TOML, environment, then these flags)."""
    merged: dict[str, Any] = dict(overrides or {})
    if data_dir is not None:
        merged.setdefault("storage", {})["data_dir"] = data_dir
    settings = load_settings(config_file, overrides=merged)
    configure_logging(settings.logging.level)
    return settings


def configure_logging(level: str) -> None:
    """Configure key=value logging with the patient-identifier filter installed."""
    from dicom_node.logsafe import install_log_safety

    root = logging.getLogger()
    if not any(getattr(h, "_cspine", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler._cspine = True  # type: ignore[attr-defined]
        handler.setFormatter(
            logging.Formatter("%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
        )
        root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    install_log_safety()


def quiet_client_logging(settings: Settings) -> None:
    """For one-shot client commands: the command reports failures itself in one line."""
    if settings.logging.level.upper() != "DEBUG":
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


rsna_data_option = click.option(
    "--data",
    "data",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="RSNA 2022 layout root (train.csv, train_images/, segmentations/).",
)
"""``--data RSNA_ROOT`` shared by the train and evaluate commands."""
