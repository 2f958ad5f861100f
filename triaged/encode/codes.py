"""Coded concepts used by the SR, SEG and SC encoders (PS3.16 coding schemes and a private scheme).

Every concept is an immutable :class:`pydicom.sr.coding.Code` (a named tuple), so the constants cannot
be altered by one builder and leak into another; highdicom accepts ``Code`` wherever it wants a coded
concept and converts it to a fresh ``CodedConcept`` item each time.

Standard codes are used wherever DICOM or SNOMED CT has one:

* SNOMED CT (``SCT``): anatomy (lungs, lobes), findings (lesion, lung consolidation, COVID-19,
  pneumonia), segmentation property categories (PS3.16 CID 7150) and laterality.
* DICOM (``DCM``, PS3.16 Annex D): report structure, ground-glass opacity (CID 6104), key images, comment.
* UCUM: units (``ml``, ``%``, ``{probability}``).
* LOINC (``LN``): the procedure reported (CT Chest).
* UMLS: the TID 1500 "Qualitative Evaluations" container (PS3.16 TID 1500 row 12).

Concepts that no public scheme names (the affected-lung percentages, the CT0–CT4 grades of the Russian
visual severity scale, class probabilities of the triage classifier, the triage priority) use the
private coding scheme :data:`PRIVATE_SCHEME` (``99TRIAGED``), declared in each object's Coding Scheme
Identification Sequence (PS3.3 C.12.1.1.2) by :func:`private_scheme_identification` and documented in
``docs/codes.md``.
"""

from __future__ import annotations

import re
from typing import Final

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from triaged.domain import CTGrade

#: Coding Scheme Designator of the project's private codes ("99" prefix: PS3.16 8.2, local schemes).
PRIVATE_SCHEME: Final[str] = "99TRIAGED"
#: Version of the private scheme; bump when a code's meaning changes (never reuse a code value).
PRIVATE_SCHEME_VERSION: Final[str] = "1"
PRIVATE_SCHEME_NAME: Final[str] = "triaged private codes (research use, see docs/codes.md)"
PRIVATE_SCHEME_ORGANIZATION: Final[str] = "triaged project"

# --- anatomy (SNOMED CT; lobes as in PS3.16 CID 6170 with side-specific concepts) -------------------
LUNG: Final = Code("39607008", "SCT", "Lung")
RIGHT_LUNG: Final = Code("3341006", "SCT", "Right lung")
LEFT_LUNG: Final = Code("44029006", "SCT", "Left lung")
RIGHT_UPPER_LOBE: Final = Code("42400003", "SCT", "Upper lobe of right lung")
RIGHT_MIDDLE_LOBE: Final = Code("72481006", "SCT", "Middle lobe of right lung")
RIGHT_LOWER_LOBE: Final = Code("266005", "SCT", "Lower lobe of right lung")
LEFT_UPPER_LOBE: Final = Code("44714003", "SCT", "Upper lobe of left lung")
LEFT_LOWER_LOBE: Final = Code("41224006", "SCT", "Lower lobe of left lung")
CHEST: Final = Code("51185008", "SCT", "Thorax")
RIGHT: Final = Code("24028007", "SCT", "Right")
LEFT: Final = Code("7771000", "SCT", "Left")
BILATERAL: Final = Code("51440002", "SCT", "Bilateral")  # CID 244 Laterality

#: Lobe label of :class:`triaged.domain.Masks` ``lobes`` (1..5) -> concept.
LOBES: Final[tuple[tuple[int, Code], ...]] = (
    (1, RIGHT_UPPER_LOBE),
    (2, RIGHT_MIDDLE_LOBE),
    (3, RIGHT_LOWER_LOBE),
    (4, LEFT_UPPER_LOBE),
    (5, LEFT_LOWER_LOBE),
)

# --- findings ---------------------------------------------------------------------------------------
LESION: Final = Code("52988006", "SCT", "Lesion")
LUNG_CONSOLIDATION: Final = Code("95436008", "SCT", "Lung consolidation")
GROUND_GLASS_OPACITY: Final = Code("112120", "DCM", "Ground glass opacity")  # CID 6104
#: The neutral lesion concept (CID 6102/6104 "Opacity"): what a density-based segmentation finds, whether
#: ground glass or consolidation, without naming a cause.
OPACITY: Final = Code("112001", "DCM", "Opacity")
COVID_19: Final = Code("840539006", "SCT", "COVID-19")
PNEUMONIA: Final = Code("233604007", "SCT", "Pneumonia")
#: Value of a saliency region's ``SALCLASS`` evaluation for seed 003's CAP class.
COMMUNITY_ACQUIRED_PNEUMONIA: Final = Code("385093006", "SCT", "Community acquired pneumonia")
#: PS3.16 CID 7203 "Image Derivation" (AI explanation maps: 130402 Class activation, 130403 Grad-CAM,
#: 130404 Saliency): the finding type of a saliency region, i.e. a region a classifier attended to,
#: derived from its saliency map (integrated gradients, seed 003) -- not a segmented lesion.
SALIENCY: Final = Code("130404", "DCM", "Saliency")

# --- segmentation property categories (PS3.16 CID 7150) ---------------------------------------------
ANATOMICAL_STRUCTURE: Final = Code("123037004", "SCT", "Anatomical Structure")
MORPHOLOGICALLY_ABNORMAL_STRUCTURE: Final = Code("49755003", "SCT", "Morphologically Abnormal Structure")

# --- measurements and report structure --------------------------------------------------------------
VOLUME: Final = Code("118565006", "SCT", "Volume")
KEY_IMAGES: Final = Code("121180", "DCM", "Key Images")
COMMENT: Final = Code("121106", "DCM", "Comment")
QUALITATIVE_EVALUATIONS: Final = Code("C0034375", "UMLS", "Qualitative Evaluations")
CT_CHEST: Final = Code("24627-2", "LN", "CT Chest")

# --- algorithm families (PS3.16 CID 7162 "Surface Processing Algorithm Family", the context group of
# PS3.3 C.8.20.2.1 Algorithm Family Code Sequence and of PS3.16 TID 4019) ---------------------------
ARTIFICIAL_INTELLIGENCE: Final = Code("123110", "DCM", "Artificial Intelligence")
HISTOGRAM_ANALYSIS: Final = Code("123105", "DCM", "Histogram Analysis")
MORPHOLOGICAL_OPERATIONS: Final = Code("123104", "DCM", "Morphological Operations")
#: Family of each built-in non-learned pipeline (triaged.analysis.pipeline): ``threshold`` is an HU
#: window, a blur and a cut (a histogram/intensity method); ``classical`` is built on grey-level opening
#: (vessel suppression) and component filtering (morphological operations).  A pipeline with a model
#: (``Findings.model_sha256``) is Artificial Intelligence; any other pipeline without one falls back to
#: :data:`HISTOGRAM_ANALYSIS`, the family of a plain HU threshold.
NON_LEARNED_FAMILIES: Final[tuple[tuple[str, Code], ...]] = (
    ("threshold", HISTOGRAM_ANALYSIS),
    ("classical", MORPHOLOGICAL_OPERATIONS),
)

# --- planar and per-lesion measurements -------------------------------------------------------------
AREA: Final = Code("42798000", "SCT", "Area")
LONG_AXIS: Final = Code("103339001", "SCT", "Long axis")
SHORT_AXIS: Final = Code("103340004", "SCT", "Short axis")
MEAN_ATTENUATION: Final = Code("112181", "DCM", "Mean Attenuation Coefficient")  # CID 6141

# --- units (UCUM) -----------------------------------------------------------------------------------
UNIT_ML: Final = Code("ml", "UCUM", "milliliter")
UNIT_PERCENT: Final = Code("%", "UCUM", "percent")
UNIT_PROBABILITY: Final = Code("{probability}", "UCUM", "probability")
UNIT_MM: Final = Code("mm", "UCUM", "millimeter")
UNIT_MM2: Final = Code("mm2", "UCUM", "square millimeter")
UNIT_HU: Final = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
UNIT_SCORE: Final = Code("{score}", "UCUM", "score")
UNIT_RATIO: Final = Code("{ratio}", "UCUM", "ratio")

# --- private codes (99TRIAGED); docs/codes.md explains each ------------------------------------------
LESION_VOLUME: Final = Code("LESVOL", PRIVATE_SCHEME, "Lesion volume (GGO + consolidation)")
CONSOLIDATION_VOLUME: Final = Code("CONSVOL", PRIVATE_SCHEME, "Consolidation volume")
AFFECTED_PERCENT: Final = Code("AFFPCT", PRIVATE_SCHEME, "Affected lung percentage")
CONSOLIDATION_PERCENT: Final = Code("CONSPCT", PRIVATE_SCHEME, "Consolidation percentage")
SEVERITY_PERCENT: Final = Code("SEVPCT", PRIVATE_SCHEME, "Study severity, affected percentage of worse lung")
CT_SEVERITY_GRADE: Final = Code("CTGRADE", PRIVATE_SCHEME, "CT severity grade (CT0-CT4)")
#: CT severity score (Chung et al. 2020, Pan et al. 2020): no LOINC or SNOMED CT code exists for it.
CT_SEVERITY_SCORE: Final = Code("CTSS", PRIVATE_SCHEME, "CT severity score (0-25, sum of 5 lobes)")
CT_SEVERITY_LOBE_SCORE: Final = Code("CTSSLOBE", PRIVATE_SCHEME, "CT severity score of a lobe (0-5)")
TRIAGE_PRIORITY: Final = Code("PRIORITY", PRIVATE_SCHEME, "Triage priority")
PROBABILITY_COVID_19: Final = Code("PCOVID", PRIVATE_SCHEME, "Probability of COVID-19 pneumonia")
#: P(severe) of seed 000's severe / non-severe classifier (hierarchical MIL; severe = CT3-CT4, worse
#: lung more than 50 % affected).  No public code names it.
PROBABILITY_SEVERE: Final = Code("PSEVERE", PRIVATE_SCHEME, "Probability of severe COVID-19 pneumonia")
#: Mean normalised saliency (0-1) inside a saliency region's box (seed 003's integrated gradients).
SALIENCY_SCORE: Final = Code("SALSCORE", PRIVATE_SCHEME, "Mean normalised saliency in region")
#: The class a saliency region explains (value: COVID-19 or community acquired pneumonia, SCT).
SALIENCY_CLASS: Final = Code("SALCLASS", PRIVATE_SCHEME, "Class explained by saliency")
#: Value of a ``PCOVID`` qualitative evaluation when the pipeline has no classifier validated on real
#: data.  DICOM's nearest standard concept, (114007, DCM, "Measurement not attempted"), is a Numeric
#: Value Qualifier (CID 42) of a NUM item; a coded value that says "not assessed" reads the same in
#: every viewer.
NOT_ASSESSED: Final = Code("NOTASSESSED", PRIVATE_SCHEME, "Not assessed")

#: CT0–CT4 values of the Russian visual scale (seed 004): no SNOMED CT or DICOM code exists for them.
CT_GRADES: Final[tuple[tuple[CTGrade, Code], ...]] = (
    (CTGrade.CT0, Code("CT0", PRIVATE_SCHEME, "CT0: no findings of viral pneumonia")),
    (CTGrade.CT1, Code("CT1", PRIVATE_SCHEME, "CT1: mild, 25 % or less of a lung affected")),
    (CTGrade.CT2, Code("CT2", PRIVATE_SCHEME, "CT2: moderate, 25-50 % of a lung affected")),
    (CTGrade.CT3, Code("CT3", PRIVATE_SCHEME, "CT3: severe, 50-75 % of a lung affected")),
    (CTGrade.CT4, Code("CT4", PRIVATE_SCHEME, "CT4: critical, 75 % or more of a lung affected")),
)

#: Class names the classifiers emit -> private probability concept (``PROB-<CLASS>`` otherwise).
_CLASS_PROBABILITIES: Final[tuple[tuple[str, Code], ...]] = (
    ("covid", PROBABILITY_COVID_19),
    ("healthy", Code("PHEALTHY", PRIVATE_SCHEME, "Probability of no pneumonia")),
    ("bacterial", Code("PBACTERIAL", PRIVATE_SCHEME, "Probability of bacterial pneumonia")),
    ("other", Code("POTHER", PRIVATE_SCHEME, "Probability of other lung disease")),
)

# Short String (SH) limit of Code Value (PS3.5 6.2) for generated class codes.
_CODE_VALUE_MAX = 16


def ct_grade_code(grade: CTGrade) -> Code:
    """Private code of a CT0–CT4 grade."""
    for g, code in CT_GRADES:
        if g == grade:
            return code
    raise ValueError(f"unknown CT grade {grade!r}")


def class_probability_code(class_name: str) -> Code:
    """Private concept name for the probability of one classifier class.

    Known classes (covid, healthy, bacterial, other) have fixed codes; any other class name becomes
    ``P-<NAME>`` (upper case, characters outside ``A-Z0-9`` dropped, at most 16 characters), meaning
    "Probability of class '<name>'".
    """
    key = class_name.strip().lower()
    for name, code in _CLASS_PROBABILITIES:
        if name == key:
            return code
    value = ("P-" + re.sub(r"[^A-Z0-9]", "", class_name.upper()))[:_CODE_VALUE_MAX]
    return Code(value, PRIVATE_SCHEME, f"Probability of class '{class_name.strip()}'")


def saliency_class_code(label: str) -> Code:
    """Value of ``SALCLASS`` for a saliency box's class label ("covid", "cap"; any other label: ``CLS-<NAME>``)."""
    key = label.strip().lower()
    if key == "covid":
        return COVID_19
    if key == "cap":
        return COMMUNITY_ACQUIRED_PNEUMONIA
    value = ("CLS-" + re.sub(r"[^A-Z0-9]", "", label.upper()))[:_CODE_VALUE_MAX]
    return Code(value, PRIVATE_SCHEME, f"Class '{label.strip()}'")


def private_scheme_identification() -> Dataset:
    """One Coding Scheme Identification Sequence item declaring :data:`PRIVATE_SCHEME`.

    PS3.3 C.12.1.1.2: a private Coding Scheme Designator used in an instance should be identified in
    (0008,0110) with its name, version and responsible organization.
    """
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeVersion = PRIVATE_SCHEME_VERSION
    item.CodingSchemeResponsibleOrganization = PRIVATE_SCHEME_ORGANIZATION
    return item


def algorithm_family(pipeline: str, learned: bool) -> Code:
    """PS3.16 CID 7162 family of a pipeline: AI when it runs a model, else :data:`NON_LEARNED_FAMILIES`."""
    if learned:
        return ARTIFICIAL_INTELLIGENCE
    return dict(NON_LEARNED_FAMILIES).get(pipeline, HISTOGRAM_ANALYSIS)
