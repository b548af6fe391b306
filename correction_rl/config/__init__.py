"""Run configuration: nested dataclasses, loaded from YAML with dotted command-line overrides.

Why this shape: a dataclass per component keeps each component's knobs next to each other with
a docstring per field (``correction-rl config --describe`` prints them), ``Literal`` types make
every mode an enumerated choice, typed aliases (``rules.py``) put each value's range in the
schema, and where things run (``resources``) stays apart from what the algorithm does.

- ``rules.py``: the value rules (ranges, finite floats, existing paths, task names, variable
  names);
- ``sections.py``: model, task, rollout, objective, buffer, learner, sync, eval, metrics;
- ``teacher.py``: ``teacher`` and its per-kind sub-sections;
- ``run.py``: resources, checkpoint and ``RunConfig``;
- ``loading.py``: YAML + overrides -> a validated ``RunConfig``;
- ``describe.py``: ``--describe`` and the warnings about valid but risky settings.
"""

from correction_rl.config.describe import config_warnings, describe, field_docs, field_rules, warn_config
from correction_rl.config.loading import (
    ConfigError,
    config_from_dict,
    describe_error,
    dump_config,
    field_names,
    load_config,
    parse_overrides,
    parse_yaml,
    to_dict,
)
from correction_rl.config.run import CheckpointConfig, ResourcesConfig, RunConfig
from correction_rl.config.sections import (
    BufferConfig,
    EvalConfig,
    LearnerConfig,
    LengthPriorConfig,
    MetricsConfig,
    ModelConfig,
    ObjectiveConfig,
    RolloutConfig,
    SyncConfig,
    TaskConfig,
)
from correction_rl.config.teacher import (
    HTTPTeacherConfig,
    HumanTeacherConfig,
    RetryConfig,
    TeacherConfig,
    VLLMTeacherConfig,
)
from correction_rl.config.rules import section

__all__ = [
    "BufferConfig", "CheckpointConfig", "ConfigError", "EvalConfig", "HTTPTeacherConfig",
    "HumanTeacherConfig", "LearnerConfig", "LengthPriorConfig", "MetricsConfig", "ModelConfig",
    "ObjectiveConfig", "ResourcesConfig", "RetryConfig", "RolloutConfig", "RunConfig", "SyncConfig",
    "TaskConfig", "TeacherConfig", "VLLMTeacherConfig", "config_from_dict", "config_warnings",
    "describe", "describe_error", "dump_config", "field_docs", "field_names", "field_rules",
    "load_config", "parse_overrides", "parse_yaml", "section", "to_dict", "warn_config",
]
