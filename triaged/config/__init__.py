"""Configuration: pydantic models (``extra="forbid"``) and :func:`load_config`.

Every problem in a file is reported at once, each with its YAML path and line, so an admin fixes a
config in one pass; a config that does not validate is never used (``triaged check-config``, SIGHUP).
Relative paths are resolved against the folder of the config file.

:mod:`~triaged.config.schema` holds the settings of each section, :mod:`~triaged.config.rules` the
routing rules and priority policies, :mod:`~triaged.config.load` the loader and the checks across
sections; every public name is importable from here.
"""

from __future__ import annotations

from triaged.config.load import load_config, parse_config, sop_class_uids, validate_pipelines
from triaged.config.rules import (
    DEFAULT_PRIORITY_POLICY,
    ESCALATION_LEVELS,
    OUTPUT_KINDS,
    PRIORITY_LEVELS,
    DestinationTarget,
    DicomKeyword,
    Escalation,
    MatchBlock,
    Matcher,
    OutputKind,
    PolicyWeights,
    PriorityMeasure,
    PriorityPolicyConfig,
    RouteAction,
    RoutingConfig,
    RoutingRule,
)
from triaged.config.schema import (
    AETitle,
    AnalysisConfig,
    CompletionConfig,
    Config,
    DestinationConfig,
    DispatchConfig,
    ListenerConfig,
    LoggingConfig,
    PriorityConfig,
    SeriesSelectionConfig,
    StorageConfig,
    WorklistConfig,
    check_ip_address,
)
from triaged.domain import UID_RE

__all__ = [
    "DEFAULT_PRIORITY_POLICY",
    "ESCALATION_LEVELS",
    "OUTPUT_KINDS",
    "PRIORITY_LEVELS",
    "UID_RE",
    "AETitle",
    "AnalysisConfig",
    "CompletionConfig",
    "Config",
    "DestinationConfig",
    "DestinationTarget",
    "DicomKeyword",
    "DispatchConfig",
    "Escalation",
    "ListenerConfig",
    "LoggingConfig",
    "MatchBlock",
    "Matcher",
    "OutputKind",
    "PolicyWeights",
    "PriorityConfig",
    "PriorityMeasure",
    "PriorityPolicyConfig",
    "RouteAction",
    "RoutingConfig",
    "RoutingRule",
    "SeriesSelectionConfig",
    "StorageConfig",
    "WorklistConfig",
    "check_ip_address",
    "load_config",
    "parse_config",
    "sop_class_uids",
    "validate_pipelines",
]
