"""Load shipped weights from ``models/<name>/`` after checking them against the model card.

A model folder holds the weights file and ``manifest.yaml`` (the model card: architecture and version,
the weights' sha256, training data and licences, the training command, metrics).  Loading:

1. read and validate the manifest;
2. hash the weights file and compare with ``weights.sha256`` — **before** anything deserialises it; a
   mismatch (a truncated download, a file swapped by hand) raises :class:`WeightsError`;
3. build the architecture from a fixed table of known architectures (the manifest names one; it never
   names code to import), then ``torch.load(weights_only=True)`` the state dict into it.

Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import torch
import yaml
from torch import nn

from triaged.errors import TriagedError
from triaged.nets.dacmil import DACMIL
from triaged.nets.m2unet import DEFAULT_CONCEPTS, DEFAULT_WIDTHS, M2UNet
from triaged.nets.multiscale import DEFAULT_WIDTH as MULTISCALE_WIDTH
from triaged.nets.multiscale import MultiScaleNet
from triaged.nets.multitask import MultitaskNet
from triaged.nets.wu import ConsolidationEM

MANIFEST: Final[str] = "manifest.yaml"


def _models_root() -> Path:
    """Where the shipped models are: the package data folder ``triaged/models``, else the checkout's.

    In a source checkout ``triaged/models`` is a symbolic link to the repository's top-level ``models/``
    (where the weights live); a wheel carries the files themselves there (package data, see
    ``pyproject.toml``), so an installed node finds them through :mod:`importlib.resources` wherever
    it is installed.  A checkout without the link falls back to ``<repository>/models``.
    """
    packaged = importlib.resources.files("triaged").joinpath("models")
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "models"


#: The shipped models: ``triaged/models`` (package data in a wheel, a link to ``models/`` in a checkout).
DEFAULT_MODELS_ROOT: Final[Path] = _models_root()


class WeightsError(TriagedError):
    """A model folder is missing, its manifest is invalid, or its weights do not match the manifest."""


def _multitask(kwargs: Mapping[str, Any]) -> nn.Module:
    return MultitaskNet(
        widths=tuple(kwargs.get("widths", (8, 16, 32, 64))),
        fc_units=int(kwargs.get("fc_units", 128)),
        levels=tuple(kwargs.get("levels", (1, 2, 4, 8))),
    )


def _consolidation_em(kwargs: Mapping[str, Any]) -> nn.Module:
    return ConsolidationEM(widths=tuple(kwargs.get("widths", (16, 32, 64, 128, 128))))


def _m2unet(kwargs: Mapping[str, Any]) -> nn.Module:
    return M2UNet(
        widths=tuple(kwargs.get("widths", DEFAULT_WIDTHS)),
        concepts=tuple(kwargs.get("concepts", DEFAULT_CONCEPTS)),
    )


def _dacmil(kwargs: Mapping[str, Any]) -> nn.Module:
    return DACMIL(
        widths=tuple(kwargs.get("widths", (16, 32, 64, 128))),
        blocks=int(kwargs.get("blocks", 1)),
        spatial_hidden=int(kwargs.get("spatial_hidden", 64)),
        instance_hidden=int(kwargs.get("instance_hidden", 64)),
    )


def _multiscale(kwargs: Mapping[str, Any]) -> nn.Module:
    return MultiScaleNet(
        classes=int(kwargs.get("classes", 3)), width=float(kwargs.get("width", MULTISCALE_WIDTH))
    )


#: Architectures a manifest may name (``architecture.name``) → constructor from ``architecture.kwargs``.
ARCHITECTURES: Final[dict[str, Callable[[Mapping[str, Any]], nn.Module]]] = {
    "MultitaskNet": _multitask,
    "ConsolidationEM": _consolidation_em,
    "DACMIL": _dacmil,
    "M2UNet": _m2unet,
    "MultiScaleNet": _multiscale,
}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference (eval mode) and its model card."""

    name: str
    version: str
    module: nn.Module
    manifest: dict[str, Any]
    sha256: str
    directory: Path
    thresholds: dict[str, float] = field(default_factory=dict)


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_dir(name_or_dir: str | Path, models_root: Path | None = None) -> Path:
    """``<models_root>/<name>`` for a bare name, else the folder given (made absolute, so that messages name it
    wherever the command runs).  A bare name is looked up in the models root first, before a folder of that
    name in the working directory."""
    p = Path(name_or_dir)
    root = DEFAULT_MODELS_ROOT if models_root is None else Path(models_root)
    if len(p.parts) == 1 and (root / p / MANIFEST).is_file():
        return root / p
    if p.is_dir() and (p / MANIFEST).is_file():
        return p.absolute()
    return root / str(name_or_dir)


def read_manifest(directory: Path) -> dict[str, Any]:
    """Parse and check the fields of ``<directory>/manifest.yaml`` that loading needs."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise WeightsError(f"{path} is missing: no model card, so the weights cannot be verified")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise WeightsError(f"{path}: not valid YAML ({exc})") from exc
    problems = []
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a mapping at the top level")
    for key in ("name", "version", "architecture", "weights"):
        if key not in data:
            problems.append(f"'{key}' is missing")
    arch = data.get("architecture") or {}
    weights = data.get("weights") or {}
    if not isinstance(arch, dict) or arch.get("name") not in ARCHITECTURES:
        problems.append(f"architecture.name must be one of {sorted(ARCHITECTURES)}")
    if not isinstance(weights, dict) or not weights.get("file") or not weights.get("sha256"):
        problems.append("weights.file and weights.sha256 are required")
    elif Path(str(weights["file"])).name != str(weights["file"]):
        problems.append("weights.file must be a plain file name inside the model folder")
    if problems:
        raise WeightsError(f"{path}: " + "; ".join(problems))
    return data


def verify_weights(directory: Path, manifest: Mapping[str, Any] | None = None) -> Path:
    """Return the weights file of a model folder after checking its sha256 against the manifest.

    Raises
    ------
    WeightsError
        If the file is missing or its sha256 differs from ``weights.sha256`` of the manifest.
    """
    directory = Path(directory)
    manifest = read_manifest(directory) if manifest is None else manifest
    weights = Path(directory) / str(manifest["weights"]["file"])
    expected = str(manifest["weights"]["sha256"]).lower()
    if not weights.is_file():
        raise WeightsError(
            f"{weights} is missing: the model card {directory / MANIFEST} names it, with sha256 {expected} "
            "(restore the shipped file or re-install the package)"
        )
    actual = sha256_of(weights)
    if actual != expected:
        raise WeightsError(
            f"{weights}: sha256 {actual} does not match the manifest's {expected}; refusing to load "
            "(re-train or restore the shipped file)"
        )
    return weights


def build_module(manifest: Mapping[str, Any]) -> nn.Module:
    """An untrained module of the manifest's architecture."""
    arch = manifest["architecture"]
    return ARCHITECTURES[str(arch["name"])](arch.get("kwargs") or {})


def load_model(
    name_or_dir: str | Path, models_root: Path | None = None, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Verify and load a shipped model (module docstring); the module is in eval mode on ``device``."""
    directory = model_dir(name_or_dir, models_root)
    manifest = read_manifest(directory)
    weights = verify_weights(directory, manifest)
    module = build_module(manifest)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        module.load_state_dict(state)
    except Exception as exc:  # a hash-valid file that does not fit the architecture is a card error
        raise WeightsError(
            f"{weights}: cannot be loaded into {manifest['architecture']['name']} ({exc})"
        ) from exc
    module.eval().to(device)
    thresholds = {str(k): float(v) for k, v in (manifest.get("thresholds") or {}).items()}
    return LoadedModel(
        name=str(manifest["name"]),
        version=str(manifest["version"]),
        module=module,
        manifest=dict(manifest),
        sha256=str(manifest["weights"]["sha256"]).lower(),
        directory=directory,
        thresholds=thresholds,
    )


def weights_present(name: str, models_root: Path | None = None) -> bool:
    """Whether ``models/<name>`` has a manifest and the weights file it names (hash not checked)."""
    directory = model_dir(name, models_root)
    try:
        manifest = read_manifest(directory)
    except WeightsError:
        return False
    return (directory / str(manifest["weights"]["file"])).is_file()
