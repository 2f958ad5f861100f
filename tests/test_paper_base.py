"""The paper pipelines' shared part (:mod:`triaged.nets.paper_base`): one spelling for each common
provenance key, the registry's lazy class references, and weights checked before the classical run.

Real parts only: the shipped weights and model cards, the real ``classical`` pipeline, a phantom from
:mod:`triaged.lab.phantom`.
"""

from __future__ import annotations

import shutil
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from triaged.domain import RESEARCH_NOTE, Findings, Volume
from triaged.nets.paper_base import ClassicalPlusNetwork
from triaged.nets.pipelines import LEARNED, P_COVID_NOT_ASSESSED, build_pipeline, learned_class
from triaged.nets.weights import MANIFEST, WeightsError, model_dir

PAPER = ("m2unet", "dacmil", "multiscale")
#: The keys every paper pipeline writes once, in this order, after classical's own provenance.
COMMON = (
    "masks_from",
    "model.name",
    "model.version",
    "model.sha256",
    "identification.method",
    "bag.slices",
    "bag.box",
    "precision",
    "time.classical_s",
    "time.network_s",
    "note",
)
#: Spellings the three pipelines used for the same facts before they shared a base.
OLD_SPELLINGS = {"masks.method", "time.dacmil_s", "dacmil", "classification.validated_on"}


@cache
def _phantom() -> Volume:
    """A small COVID-19 phantom (96², 10 mm slices: a few seconds to make and to analyse)."""
    from triaged.lab.phantom import PhantomSpec, generate, to_volume

    return to_volume(
        generate(PhantomSpec(kind="covid", severity=40.0, seed=5, matrix=96, slice_thickness=10.0))
    )


@cache
def _findings(name: str) -> Findings:
    return build_pipeline(name).run(_phantom()).findings


def test_every_learned_reference_resolves_to_its_class() -> None:
    for name, (folder, ref) in LEARNED.items():
        cls = learned_class(name)
        assert ref.endswith(f":{cls.__name__}") and cls.name == name and folder == name
    assert {name for name in LEARNED if issubclass(learned_class(name), ClassicalPlusNetwork)} == set(PAPER)
    with pytest.raises(KeyError):
        learned_class("no-such-pipeline")


@pytest.mark.parametrize("name", PAPER)
def test_each_paper_pipeline_writes_the_common_provenance_keys_once_in_order(name: str) -> None:
    f = _findings(name)
    keys = [k for k, _ in f.provenance]
    added = keys[keys.index("masks_from") :]  # after classical's own provenance
    assert [k for k in added if k in COMMON] == list(COMMON), added
    assert not OLD_SPELLINGS & set(keys)
    prov = dict(f.provenance)
    assert prov["masks_from"].startswith("classical v")
    assert prov["model.name"] == name and prov["model.sha256"] == f.model_sha256
    assert prov["precision"].endswith("fp32") and prov["note"] == RESEARCH_NOTE
    assert int(prov["bag.slices"]) >= 1 and len(prov["bag.box"].split()) == 4
    # the shipped cards name no real validation data: no P(COVID-19), the note says so, once
    assert prov["identification.method"] == P_COVID_NOT_ASSESSED
    assert f.p_covid is None and f.warnings.count(P_COVID_NOT_ASSESSED) == 1
    assert f.pipeline == name and "Masks and measures from classical." in build_pipeline(name).description


@pytest.mark.parametrize("name", PAPER)
def test_missing_weights_fail_before_the_classical_run(name: str, tmp_path: Path) -> None:
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(model_dir(name) / MANIFEST, folder / MANIFEST)
    pipeline = learned_class(name)(folder)
    said: list[str] = []
    volume = Volume(np.zeros((4, 16, 16), np.int16), (5.0, 1.0, 1.0), np.eye(4), ("1.2.3",) * 4, "1.2", "1.3")
    with pytest.raises(WeightsError, match=r"model\.pt is missing"):
        pipeline.run(volume, progress=lambda fraction, message: said.append(message))
    assert said == []  # classical never started
