"""Synthetic chest CT with ground truth, for the demo, the self-test and training (pure layer).

Everything is deterministic from :attr:`PhantomSpec.seed`; nothing here writes files
(:mod:`triaged.lab.datasets` does).
"""

from triaged.lab.phantom.acquisition import RESEARCH_NOTE, study_uid, to_datasets, to_volume, vendor_style
from triaged.lab.phantom.generate import Geometry, generate
from triaged.lab.phantom.spec import (
    KINDS,
    MAX_SEVERITY,
    SUPPORTED_TRANSFER_SYNTAXES,
    VENDORS,
    GroundTruth,
    Kind,
    Phantom,
    PhantomSpec,
    Vendor,
    ct_grade_of,
    dataset_specs,
)

__all__ = [
    "KINDS",
    "RESEARCH_NOTE",
    "MAX_SEVERITY",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "VENDORS",
    "Geometry",
    "GroundTruth",
    "Kind",
    "Phantom",
    "PhantomSpec",
    "Vendor",
    "ct_grade_of",
    "dataset_specs",
    "generate",
    "study_uid",
    "to_datasets",
    "to_volume",
    "vendor_style",
]
