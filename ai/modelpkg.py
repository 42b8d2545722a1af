"""Model packages: a folder with ``model.json`` and verified safetensors weights.

Layout of a package folder::

    <name>/
        model.json          # identity, architecture, input spec, labels, training, metrics
        model.safetensors   # weights; sha256 recorded in model.json

Weights are never unpickled: they are read with :mod:`safetensors`, and loading
verifies the sha256 first and refuses any mismatch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ai.errors import ModelLoadError
from ai.types import ModelIdentity
from config.digest import sha256_file

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
BUILTIN_REGISTRY = Path(__file__).with_name("models")
DEMO_LABEL = "synthetic demo weights, not for clinical use"


@dataclass(frozen=True)
class ModelPackage:
    """A model package on disk, its metadata read and its weights verified."""

    path: Path
    meta: dict[str, Any]

    @property
    def identity(self) -> ModelIdentity:
        """The identity written into outputs."""
        return ModelIdentity(
            name=str(self.meta["name"]),
            version=str(self.meta["version"]),
            sha256=str(self.meta["weights"]["sha256"]),
            description=str(self.meta.get("description", "")),
            demo=bool(self.meta.get("demo", False)),
        )

    @property
    def architecture(self) -> dict[str, Any]:
        """``{"class": ..., "params": {...}}`` used to rebuild the network."""
        return dict(self.meta["architecture"])


def save_package(
    out_dir: str | Path,
    module: torch.nn.Module,
    meta: dict[str, Any],
    *,
    half: bool = False,
) -> Path:
    """Write a model package.

    Parameters
    ----------
    out_dir
        Folder to create or overwrite.
    module
        Trained network; its ``state_dict`` is saved.
    meta
        Metadata; must hold ``name``, ``version``, ``task`` and ``architecture``.
        The ``weights`` entry is filled in here.
    half
        Store floating-point tensors as float16 (they are cast back on load).

    Returns
    -------
    pathlib.Path
        The package folder.
    """
    for key in ("name", "version", "task", "architecture"):
        if key not in meta:
            raise ValueError(f"model metadata must contain {key!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        if half and t.is_floating_point():
            t = t.half()
        state[key] = t
    weights = out / WEIGHTS_FILE
    save_file(state, str(weights))
    full = dict(meta)
    full["weights"] = {
        "file": WEIGHTS_FILE,
        "sha256": sha256_file(weights),
        "dtype": "float16" if half else "float32",
    }
    (out / META_FILE).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return out


def read_package(path: str | Path) -> ModelPackage:
    """Read ``model.json`` and verify the weights' sha256.

    Raises
    ------
    ModelLoadError
        When the folder, the metadata or the weights are missing, or the hash differs.
    """
    folder = Path(path)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise ModelLoadError(f"{folder} is not a model package: {META_FILE} is missing")
    try:
        meta = json.loads(meta_path.read_text())
        expected = meta["weights"]["sha256"]
        weights = folder / meta["weights"]["file"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{meta_path} is malformed: {exc}") from exc
    verify_file(weights, expected, f"weights of {folder.name}", "model weights")
    return ModelPackage(path=folder, meta=meta)


def verify_file(path: Path, sha256: str, what: str, missing: str) -> None:
    """Refuse a package file that is missing or whose sha256 differs from ``model.json``.

    Raises
    ------
    ModelLoadError
        ``"<missing> missing: <path>"`` or ``"<what> do not match model.json: sha256 ..."``.
    """
    if not path.is_file():
        raise ModelLoadError(f"{missing} missing: {path}")
    actual = sha256_file(path)
    if actual != sha256:
        raise ModelLoadError(f"{what} do not match model.json: sha256 {actual} != {sha256}")


def load_module(
    package: ModelPackage,
    build: Callable[[dict[str, Any]], torch.nn.Module],
    device: torch.device | str = "cpu",
) -> torch.nn.Module:
    """Build the network from the package's architecture and load its verified weights.

    Parameters
    ----------
    package
        A package returned by :func:`read_package`.
    build
        Builds an untrained network from ``package.architecture["params"]``.
    device
        Where to put the network.

    Raises
    ------
    ModelLoadError
        When the architecture cannot be built or the weights do not fit it.
    """
    try:
        module = build(package.architecture.get("params", {}))
    except (TypeError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"cannot build {package.architecture.get('class')} from {package.path}: {exc}"
        ) from exc
    state = load_file(str(package.path / package.meta["weights"]["file"]), device="cpu")
    reference = module.state_dict()
    state = {k: v.to(reference[k].dtype) if k in reference else v for k, v in state.items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise ModelLoadError(
            f"weights of {package.path.name} do not fit architecture "
            f"{package.architecture.get('class')} {package.architecture.get('params')}: "
            + " ".join(first)
        ) from exc
    return module.to(device).eval()


def resolve_package(name_or_path: str | Path, registry: str | Path | None = None) -> Path:
    """Find a model package by folder path or by name in a registry.

    Parameters
    ----------
    name_or_path
        A folder holding ``model.json``, or a package name.
    registry
        Folder of installed packages; empty or ``None`` means the packages shipped in
        ``ai/models``.

    Raises
    ------
    ModelLoadError
        When no such package exists.
    """
    candidate = Path(name_or_path)
    if (candidate / META_FILE).is_file():
        return candidate
    roots = [Path(registry)] if registry else []
    roots.append(BUILTIN_REGISTRY)
    for root in roots:
        if (root / str(name_or_path) / META_FILE).is_file():
            return root / str(name_or_path)
    raise ModelLoadError(
        f"model package {name_or_path!r} not found in {', '.join(str(r) for r in roots)}"
    )


def select_device(spec: str = "auto") -> torch.device:
    """Return ``cuda`` when available and requested (``auto``), else ``cpu``."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)
