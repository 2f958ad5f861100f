"""The installable package: a wheel built from the checkout carries its models, and a fresh venv finds them.

Nothing is downloaded: the wheel is built without build isolation (the project venv's setuptools), installed
with ``--no-deps``, and the fresh venv reaches the dependencies through a ``.pth`` file that appends the
project venv's site-packages *after* its own, so ``triaged`` itself is imported from the wheel, not from the
project venv's editable install.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PIPELINES = ("classical", "consolidation-em", "multitask", "threshold")
SHIPPED = {"triaged/models/multitask/model.pt", "triaged/models/consolidation-em/model.pt"}


def _run(cmd: list[str | Path], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PIP_NO_INDEX"] = "1"  # never reach for a registry
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the checkout (no build/ or egg-info left in the working tree)."""
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("triaged", "models"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    build = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", dist, "."], src
    )
    assert build.returncode == 0, build.stdout + build.stderr
    [whl] = dist.glob("triaged-*.whl")
    return whl


@pytest.fixture(scope="module")
def fresh_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv with only the wheel installed; the dependencies come from the project venv."""
    venv = tmp_path_factory.mktemp("venv")
    made = _run([sys.executable, "-m", "venv", "--without-pip", venv], venv)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    purelib = Path(
        _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], venv).stdout.strip()
    )
    # the project venv's pip installs into the fresh interpreter (its console script runs the fresh python)
    install = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "--no-deps",
            "--no-index",
            "--no-compile",
            wheel,
        ],
        venv,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    ours = [p for p in {*site.getsitepackages(), sysconfig.get_path("purelib")} if Path(p).is_dir()]
    # a .pth line is appended to sys.path after the fresh venv's own site-packages: the wheel wins
    (purelib / "zz_project_deps.pth").write_text("".join(f"{p}\n" for p in ours), encoding="utf-8")
    yield venv


def test_the_wheel_carries_the_models(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert SHIPPED <= names
    assert {
        "triaged/models/multitask/manifest.yaml",
        "triaged/models/consolidation-em/manifest.yaml",
    } <= names
    assert wheel.stat().st_size < 50 * 2**20  # about 7 MB today, mostly the two weight files


def test_an_installed_wheel_lists_every_pipeline(fresh_venv: Path, tmp_path: Path) -> None:
    where = _run([fresh_venv / "bin" / "python", "-c", "import triaged; print(triaged.__file__)"], tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(fresh_venv), where.stdout + where.stderr
    listed = _run([fresh_venv / "bin" / "triaged", "analyze", "--list"], tmp_path)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    names = {line.split()[0] for line in listed.stdout.splitlines() if line and not line[0].isspace()}
    assert set(PIPELINES) <= names, listed.stdout
    assert "Traceback" not in listed.stderr


def test_a_corrupt_installed_weight_file_is_a_clear_error_naming_it(fresh_venv: Path, tmp_path: Path) -> None:
    import yaml

    purelib = next((fresh_venv / "lib").glob("python3*/site-packages"))
    folder = purelib / "triaged" / "models" / "multitask"
    weights = folder / "model.pt"
    expected = yaml.safe_load((folder / "manifest.yaml").read_text(encoding="utf-8"))["weights"]["sha256"]
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[: len(original) // 2])  # a truncated copy
        ct = tmp_path / "ct.nii.gz"
        ct.write_bytes(b"never read: the weights are checked first")
        ran = _run(
            [fresh_venv / "bin" / "triaged", "analyze", "-p", "multitask", ct, "-o", tmp_path / "out"],
            tmp_path,
        )
        assert ran.returncode == 1, ran.stdout + ran.stderr
        assert str(weights) in ran.stderr and expected in ran.stderr, ran.stderr
        assert "unknown pipeline" not in ran.stderr and "Traceback" not in ran.stderr
        weights.unlink()  # gone altogether: still listed, marked BROKEN with the file and its sha256
        listed = _run([fresh_venv / "bin" / "triaged", "analyze", "--list"], tmp_path)
        assert listed.returncode == 1, listed.stdout + listed.stderr
        assert set(PIPELINES) <= {
            line.split()[0] for line in listed.stdout.splitlines() if line[:1].isalpha()
        }
        broken = [line for line in listed.stdout.splitlines() if line.startswith("multitask")]
        assert "BROKEN" in broken[0], listed.stdout
        assert f"{weights} is missing" in listed.stdout and expected in listed.stdout, listed.stdout
    finally:
        weights.write_bytes(original)
