"""Deterministic UIDs for the objects triaged creates (PS3.5 9 and Annex B.2, UUID-derived UIDs).

A UID is ``2.25.`` followed by the decimal value of a name-based (SHA-1, version 5) UUID of the inputs:
study, pipeline name and version, revision, output kind and instance index.  The same analysis sent
twice therefore carries the same Series and SOP Instance UIDs (a receiving PACS sees a duplicate, not a
second report), while a re-analysis (``revision + 1``) or a new pipeline version gets new UIDs and so
supersedes rather than overwrites the earlier objects (the SR names its predecessor).

PS3.5 B.2 allows UUID-derived UIDs of any UUID variant; a version 5 UUID is one, and 128 bits keep the
chance of a collision with any other UID negligible.  The result is at most 44 characters (<= 64).
"""

from __future__ import annotations

import enum
import json
import uuid
from dataclasses import dataclass
from typing import Final

#: Namespace of every triaged UUID (itself a version 5 UUID of the project name in the OID namespace).
TRIAGED_NAMESPACE: Final[uuid.UUID] = uuid.uuid5(uuid.NAMESPACE_OID, "triaged")


class OutputKind(enum.StrEnum):
    """An encoded output type: TID 1500 SR, SEG, X-ray-like secondary capture.

    The runtime owner of these names: the worker reports each encoded object's kind with it and a
    route's destinations pick kinds by these values (:data:`triaged.config.OutputKind` is the YAML
    schema's ``Literal`` of the same values, kept equal by a test: the config layer imports nothing above it).
    """

    SR = "sr"
    SEG = "seg"
    SC = "sc"


class UIDRole(enum.StrEnum):
    """What a derived UID identifies: a series or an instance of one output kind (the values are hashed)."""

    SR_SERIES = "sr-series"
    SR_INSTANCE = "sr-instance"
    SEG_SERIES = "seg-series"
    SEG_INSTANCE = "seg-instance"
    SC_SERIES = "sc-series"
    SC_INSTANCE = "sc-instance"


def derive_uid(
    study_instance_uid: str,
    pipeline: str,
    pipeline_version: str,
    revision: int,
    kind: UIDRole | str,
    index: int = 0,
) -> str:
    """A ``2.25.`` UID determined by the analysis identity and the output it names.

    Parameters
    ----------
    study_instance_uid
        Study Instance UID of the analysed study.
    pipeline, pipeline_version
        Name and version of the analysis pipeline.
    revision
        1 for the first analysis of the study, 2, 3, ... for re-analyses.
    kind
        Which output UID (see :class:`UIDRole`).
    index
        Instance index within the output's series (several SC images), 0 otherwise.

    Returns
    -------
    str
        ``2.25.<128-bit integer>``.
    """
    if revision < 1:
        raise ValueError(f"revision must be >= 1, got {revision}")
    # JSON of a list is an unambiguous join: no two input tuples give the same name.
    name = json.dumps([study_instance_uid, pipeline, pipeline_version, int(revision), str(kind), int(index)])
    return f"2.25.{uuid.uuid5(TRIAGED_NAMESPACE, name).int}"


@dataclass(frozen=True)
class OutputUIDs:
    """Series and SOP Instance UIDs of one analysis' outputs (see :func:`output_uids`)."""

    study_instance_uid: str
    pipeline: str
    pipeline_version: str
    revision: int
    sr_series: str
    sr_instance: str
    seg_series: str
    seg_instance: str
    sc_series: str

    def sc_instance(self, index: int) -> str:
        """SOP Instance UID of the ``index``-th (0-based) secondary capture image."""
        return derive_uid(
            self.study_instance_uid,
            self.pipeline,
            self.pipeline_version,
            self.revision,
            UIDRole.SC_INSTANCE,
            index,
        )


def output_uids(study_instance_uid: str, pipeline: str, pipeline_version: str, revision: int) -> OutputUIDs:
    """All UIDs of one analysis' SR, SEG and SC outputs.

    Parameters
    ----------
    study_instance_uid
        Study the outputs are added to (they join the original study, PS3.3 C.7.2.1).
    pipeline, pipeline_version
        The analysis pipeline and its version.
    revision
        Analysis revision of the study (1, 2, ...).
    """

    def uid(kind: UIDRole) -> str:
        return derive_uid(study_instance_uid, pipeline, pipeline_version, revision, kind)

    return OutputUIDs(
        study_instance_uid=study_instance_uid,
        pipeline=pipeline,
        pipeline_version=pipeline_version,
        revision=revision,
        sr_series=uid(UIDRole.SR_SERIES),
        sr_instance=uid(UIDRole.SR_INSTANCE),
        seg_series=uid(UIDRole.SEG_SERIES),
        seg_instance=uid(UIDRole.SEG_INSTANCE),
        sc_series=uid(UIDRole.SC_SERIES),
    )


def tracking_uid(uids: OutputUIDs, key: str) -> str:
    """Tracking UID of one tracked structure (``right_lung``, ``lesions``, ``lobe_1``, ``box_0`` ...).

    The SEG segment and the SR measurement group of one structure carry the same Tracking UID
    (PS3.3 C.8.20.2 Tracking UID, PS3.16 TID 1411 row 3), so a reader can pair them.
    """
    name = json.dumps(
        [uids.study_instance_uid, uids.pipeline, uids.pipeline_version, uids.revision, "tracking", key]
    )
    return f"2.25.{uuid.uuid5(TRIAGED_NAMESPACE, name).int}"


def device_uid(device_name: str, manufacturer: str) -> str:
    """Device Observer UID (PS3.16 TID 1004) of a triaged installation, stable across analyses."""
    name = json.dumps(["device", device_name, manufacturer])
    return f"2.25.{uuid.uuid5(TRIAGED_NAMESPACE, name).int}"
