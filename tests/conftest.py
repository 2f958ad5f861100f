"""Shared fixtures: real temp folders, a real SQLite ledger, free ports, a phantom CT series, real CT data."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.pg import PostgresCluster, postgres_bin
from triaged.config import Config, parse_config
from triaged.lab.paths import real_data_root

if TYPE_CHECKING:
    from triaged.lab.phantom import PhantomSpec


def _real_data() -> Path:
    """The shared real CT data: $TRIAGED_REAL_DATA when set, else ../shared/data/real next to the checkout.

    A $TRIAGED_REAL_DATA that is set but names no folder means "no real data" (the real-data tests skip);
    it does not fall back to the shared folder, so ``TRIAGED_REAL_DATA=/nonexistent pytest`` runs the
    suite as a machine without the data would.
    """
    return real_data_root()


REAL_DATA = _real_data()
PET_CT_DX = REAL_DATA / "chest-ct-lung-pet-ct-dx"
LIDC = REAL_DATA / "lidc-idri-small"

#: First port handed out by :func:`free_port`; below Linux's ephemeral range (32768-60999), so ports the
#: kernel picks for outgoing connections and ``bind(0)`` never collide with these.
PORT_BASE = 20000
#: Ports per pytest process: the controller (or a run without xdist) gets the first block, gwN block N+1.
PORT_BLOCK = 500
PORT_BLOCKS = 25  # 20000 + 25 * 500 = 32500 < 32768


def _port_block() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ... under xdist; unset otherwise
    slot = int(worker[2:]) + 1 if worker.startswith("gw") and worker[2:].isdigit() else 0
    start = PORT_BASE + (slot % PORT_BLOCKS) * PORT_BLOCK
    return range(start, start + PORT_BLOCK)


def _port_candidates() -> Iterator[int]:
    block = _port_block()
    offset = os.getpid() % len(block)  # two concurrent pytest runs on one machine start at different ports
    return itertools.cycle([*block[offset:], *block[:offset]])


_PORTS = _port_candidates()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a config that must name one (it forbids port 0).

    The port is still only *probably* free when the caller binds it. To make a clash unlikely, each
    pytest process hands out ports from its own block (:data:`PORT_BLOCK` ports from :data:`PORT_BASE`,
    chosen by ``$PYTEST_XDIST_WORKER``; outside the kernel's ephemeral range) in turn, so a port comes
    back only after all the others; it starts at an offset derived from the process id (two runs at once)
    and skips any port it cannot bind now.
    """
    for _ in range(PORT_BLOCK):
        port = next(_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use (or lingering in TIME_WAIT): try the next one
        return port
    raise RuntimeError(f"no free port in {_port_block()} on 127.0.0.1")


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


def phantom_ct_spec() -> PhantomSpec:
    """The phantom behind :func:`phantom_ct_series`: small (320 x 320, 2 mm slices every 6 mm, ~3 s to make)
    yet a series the default selection rules accept (30 slices over 174 mm; 29 still cover >= 150 mm, 20
    do not), with both lungs, mediastinum, spine and air around the patient. The Secondary Capture encoder
    needs about 280 columns to burn its text lines into a key slice uncut."""
    from triaged.lab.phantom import PhantomSpec

    return PhantomSpec(
        kind="covid", severity=30.0, seed=7, matrix=320, slice_thickness=2.0, slice_spacing=6.0, slices=30
    )


@pytest.fixture(scope="session")
def phantom_ct_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with one synthetic axial chest CT series (:func:`phantom_ct_spec`), written once per session.

    For tests that need *some* valid CT series to drive the node, the encoders, the ledger or the CLI, and
    nothing that only real anatomy or a real export has: they run without ``$TRIAGED_REAL_DATA``. The files
    are ``I00001.dcm`` ... in instance order (one series, no localizer); treat them as read-only, copy them to
    change them.
    """
    from triaged.lab.datasets import write_dicom_study
    from triaged.lab.phantom import generate, to_datasets

    phantom = generate(phantom_ct_spec())
    files = write_dicom_study(to_datasets(phantom), tmp_path_factory.mktemp("phantom-ct"))
    (folder,) = {f.parent for f in files}
    return folder


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


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL cluster for this pytest process (each xdist worker starts its own)."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: install the postgresql package")
    cluster = PostgresCluster(bindir, free_port())
    yield cluster
    cluster.stop()


@pytest.fixture
def ledger_location(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where a test's ledger lives: a SQLite file under tmp_path, or the emptied database of :func:`postgres`.

    SQLite unless the module parametrizes it (``pytest_generate_tests = tests.pg.both_dialects``).
    """
    if getattr(request, "param", "sqlite") == "sqlite":
        return tmp_path / "var" / "ledger.sqlite"
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    return cluster.ledger_database()
