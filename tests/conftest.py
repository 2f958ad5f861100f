"""Shared fixtures: real temp folders, a real SQLite ledger, free ports, the real CT data."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from triaged.config import Config, parse_config


def _real_data() -> Path:
    """The shared real CT data: $TRIAGED_REAL_DATA, else ../shared/data/real next to the checkout."""
    candidates = [Path(p) for p in [os.environ.get("TRIAGED_REAL_DATA", "")] if p]
    candidates += [Path(__file__).resolve().parents[2] / "shared" / "data" / "real"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


REAL_DATA = _real_data()
PET_CT_DX = REAL_DATA / "chest-ct-lung-pet-ct-dx"
LIDC = REAL_DATA / "lidc-idri-small"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; `make test` installs it (apt: dcmtk, dicom3tools, orthanc)")
    return path


@pytest.fixture
def pet_ct_dx() -> Path:
    if not PET_CT_DX.is_dir():
        pytest.skip(f"real data folder {PET_CT_DX} is absent (only on development machines)")
    return PET_CT_DX


def config_data(tmp_path: Path, **sections: dict[str, object]) -> dict[str, dict[str, object]]:
    """Config data with its own port, spool and ledger under tmp_path; sections override defaults."""
    data: dict[str, dict[str, object]] = {
        "listener": {"ae_title": "TRIAGED", "bind_address": "127.0.0.1", "port": free_port()},
        "storage": {
            "spool": str(tmp_path / "spool"),
            "ledger": str(tmp_path / "ledger.sqlite"),
            "min_free_mb": 0,
        },
        "completion": {"delay_seconds": 1, "sweep_interval_seconds": 0.2},
        # Fast, deterministic stand-in pipelines (tests/worker_pipelines.py); analysis tests override.
        "analysis": {"registry": "tests.worker_pipelines:registry", "default_pipeline": "ok", "threads": 1},
        "worklist": {"http_port": 0},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return data


def make_config(tmp_path: Path, **sections: dict[str, object]) -> Config:
    """A validated config with its own port, spool and ledger under tmp_path."""
    import yaml

    return parse_config(yaml.safe_dump(config_data(tmp_path, **sections)), "test-config", base_dir=tmp_path)


def write_config(tmp_path: Path, **sections: dict[str, object]) -> Path:
    """The same as :func:`make_config`, written to ``tmp_path/config.yaml`` (for the CLI)."""
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_data(tmp_path, **sections)))
    return path


@pytest.fixture
def config(tmp_path: Path) -> Iterator[Config]:
    yield make_config(tmp_path)
