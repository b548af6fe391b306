"""Config: YAML + dotted overrides round trip, and every kind of error names the dotted field."""

from __future__ import annotations

import pytest

from correction_rl.config import (
    ConfigError,
    RunConfig,
    describe,
    dump_config,
    field_docs,
    load_config,
    parse_overrides,
)


def test_yaml_and_overrides_round_trip(tmp_path):
    src = tmp_path / "run.yaml"
    src.write_text(
        "name: demo\nlearner:\n  lr: 1.0e-3\n  zero_stage: 2\nobjective:\n  form: logistic\n"
        "  length_prior:\n    mean: 5\n"
    )
    cfg = load_config(src, ["--learner.lr", "1e-5", "--task.names", "[addition, sorting]", "--seed=7"])
    assert cfg.name == "demo"
    assert cfg.learner.lr == pytest.approx(1e-5)  # override beats the file
    assert cfg.learner.zero_stage == 2  # the file beats the default
    assert cfg.objective.form == "logistic"
    assert cfg.objective.length_prior.mean == 5.0
    assert cfg.task.names == ["addition", "sorting"]
    assert cfg.seed == 7
    out = dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(out) == cfg


def test_defaults_validate():
    assert load_config() == RunConfig()


def test_parse_overrides_types():
    tree = parse_overrides(["--a.b", "1e-5", "--a.c", "true", "--d", "null", "--e=[1, 2]", "--f", "x"])
    assert tree == {"a": {"b": 1e-5, "c": True}, "d": None, "e": [1, 2], "f": "x"}


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["--learner.lrr", "1"], ["learner.lrr: unknown field", "did you mean 'learner.lr'", "allowed:"]),
        (["--nope", "1"], ["nope: unknown field", "allowed:"]),
        (["--objective.length_prior.meen", "2"], ["objective.length_prior.meen", "length_prior.mean"]),
        (["--learner.lr", "fast"], ["learner.lr:", "valid number", "'fast'"]),
        (["--resources.num_rollout_workers", "1.5"], ["resources.num_rollout_workers:", "1.5"]),
        (["--objective.form", "dpx"], ["objective.form:", "'plain', 'logistic', 'dpo', 'ipo' or 'cpl'", "'dpx'"]),
        (["--learner.zero_stage", "5"], ["learner.zero_stage:", "0, 1, 2 or 3", "5"]),
        (["--learner", "3"], ["learner:", "3"]),
        (["--task.names", "addition"], ["task.names:", "valid list"]),
    ],
)
def test_errors_name_the_dotted_field(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    for fragment in expected:
        assert fragment in message, message


def test_all_errors_reported_at_once(tmp_path):
    src = tmp_path / "bad.yaml"
    src.write_text("learner:\n  lr: abc\nobjective:\n  form: nope\n")
    with pytest.raises(ConfigError) as info:
        load_config(src)
    message = str(info.value)
    assert str(src) in message and "learner.lr" in message and "objective.form" in message


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)


def test_malformed_override_flags():
    with pytest.raises(ConfigError, match="missing value"):
        parse_overrides(["--learner.lr"])
    with pytest.raises(ConfigError, match="expected --dotted.field"):
        parse_overrides(["learner.lr", "1"])


def test_every_field_has_a_docstring():
    import dataclasses

    def walk(cls):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(default):
                yield from walk(type(default))
            else:
                yield cls.__name__, f.name, docs.get(f.name)

    missing = [(c, n) for c, n, doc in walk(RunConfig) if not doc]
    assert not missing
    assert any(line.startswith("learner.lr = ") for line in describe())
