"""One set of output kinds: the encode enum (runtime), the config's YAML Literal and the worker's mapping."""

from __future__ import annotations

from typing import get_args

import pytest
from pydicom.uid import (
    Comprehensive3DSRStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from triaged import config
from triaged.encode.uids import OutputKind
from triaged.worker import output_kind


def test_the_config_literal_spells_exactly_the_encode_enum() -> None:
    assert get_args(config.OutputKind) == tuple(kind.value for kind in OutputKind)
    assert config.OUTPUT_KINDS == tuple(OutputKind)


@pytest.mark.parametrize(
    ("sop_class_uid", "kind"),
    [
        (Comprehensive3DSRStorage, OutputKind.SR),
        (SegmentationStorage, OutputKind.SEG),
        (SecondaryCaptureImageStorage, OutputKind.SC),
        (MultiFrameTrueColorSecondaryCaptureImageStorage, OutputKind.SC),
    ],
)
def test_an_encoded_object_gets_its_kind_from_its_sop_class(sop_class_uid: str, kind: OutputKind) -> None:
    assert output_kind(sop_class_uid) is kind
