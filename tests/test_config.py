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
        (["--objective.form", "dpx"], ["objective.form:", "'plain', 'logistic', 'dpo', 'ipo', 'cpl' or 'sft'", "'dpx'"]),
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


# ----------------------------------------------------------------------------------------------
# Issue 16 item 6: the rules live in the schema (ranges, finite floats, task names, paths,
# duplicate keys), so `config`, `train` and `--describe` all know them.


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["--rollout.batch_size", "-5"], "rollout.batch_size: Input should be greater than or equal to 1 (got -5)"),
        (["--learner.micro_batch_pairs", "0"], "learner.micro_batch_pairs: Input should be greater than or equal to 1"),
        (["--total_steps", "-3"], "total_steps: Input should be greater than or equal to 1 (got -3)"),
        (["--buffer.capacity", "-1"], "buffer.capacity:"),
        (["--buffer.max_pending", "0"], "buffer.max_pending:"),
        (["--buffer.max_staleness", "-1"], "buffer.max_staleness: Input should be greater than or equal to 0"),
        (["--eval.every_steps", "-1"], "eval.every_steps:"),
        (["--rollout.top_p", "0"], "rollout.top_p: Input should be greater than 0"),
        (["--rollout.top_p", "1.5"], "rollout.top_p: Input should be less than or equal to 1"),
        (["--rollout.temperature", "-1"], "rollout.temperature:"),
        (["--objective.label_smoothing", "0.5"], "objective.label_smoothing: Input should be less than 0.5"),
        (["--teacher.human.port", "70000"], "teacher.human.port:"),
        (["--resources.num_rollout_workers", "0"], "resources.num_rollout_workers:"),
        (["--learner.lr", ".nan"], "learner.lr: Input should be a finite number (got nan)"),
        (["--learner.lr", ".inf"], "learner.lr: Input should be a finite number"),
        (["--sync.timeout_s", ".inf"], "sync.timeout_s: Input should be a finite number"),
        (["--objective.plain_clamp", ".nan"], "objective.plain_clamp: Input should be a number, not NaN"),
        (["--task.names", "[]"], "task.names: List should have at least 1 item"),
        (["--task.names", "[addition, nope]"], "task.names: unknown task(s) nope; known tasks: addition, reverse, sorting, spelling"),
    ],
)
def test_ranges_finite_floats_and_task_names_are_refused(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert expected in str(info.value), str(info.value)


def test_meaningful_zeros_and_infinity_are_allowed():
    cfg = load_config(None, ["--eval.every_steps", "0", "--checkpoint.every_steps", "0", "--buffer.max_staleness", "0",
                             "--learner.grad_clip", "0", "--objective.plain_clamp", ".inf", "--teacher.human.port", "0",
                             "--rollout.temperature", "0", "--metrics.table_every_steps", "0"])
    assert cfg.objective.plain_clamp == float("inf") and cfg.eval.every_steps == 0


def test_paths_must_exist_when_checked(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["--model.path", str(tmp_path / "no-model")], check_paths=True)
    message = str(info.value)
    assert "model.path: no such file or directory on this machine" in message and "Repo id" not in message
    for field in ("task.prompts_file", "teacher.template_file", "teacher.vllm.model_path"):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.") + ": no such file"):
            load_config(None, ["--model.path", str(tmp_path), f"--{field}", str(tmp_path / "missing")], check_paths=True)
    assert load_config(None, ["--model.path", str(tmp_path)], check_paths=True).model.path == str(tmp_path)
    # a library caller may build a config for another machine (cluster recipes)
    assert load_config(None, ["--model.path", str(tmp_path / "no-model")]).model.path.endswith("no-model")


def test_duplicate_yaml_keys_are_refused_naming_key_and_line(tmp_path):
    src = tmp_path / "dup.yaml"
    src.write_text("name: a\nlearner:\n  lr: 1.0e-3\n  micro_batch_pairs: 4\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError) as info:
        load_config(src)
    assert "duplicate key 'lr'" in str(info.value) and "line 5" in str(info.value) and "line 3" in str(info.value)
    src.write_text("name: a\nname: b\n")
    with pytest.raises(ConfigError, match="duplicate key 'name'"):
        load_config(src)
    # the same key in two sections is not a duplicate
    src.write_text("sync:\n  every_steps: 2\neval:\n  every_steps: 3\n")
    assert load_config(src).eval.every_steps == 3


def test_describe_shows_the_rules():
    lines = {line.split(" = ")[0]: line for line in describe()}
    assert "[>= 1]" in lines["rollout.batch_size"] and "[>= 1]" in lines["total_steps"]
    assert "[>= 0]" in lines["buffer.max_staleness"]
    assert "[> 0 and <= 1]" in lines["rollout.top_p"]
    assert "must exist" in lines["model.path"]
    assert "addition, reverse, sorting, spelling" in lines["task.names"]
    assert "environment variable name" in lines["teacher.http.api_key_env"]


def test_config_command_refuses_with_one_line_and_exit_2(tmp_path, capsys):
    from correction_rl.config_cli import cli

    assert cli(["--model.path", str(tmp_path), "--total_steps", "-3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "total_steps" in err and "Traceback" not in err
    assert cli(["--model.path", str(tmp_path / "gone")]) == 2
    assert "model.path: no such file" in capsys.readouterr().err
    assert cli(["--model.path", str(tmp_path / "gone"), "--no-path-checks"]) == 0
    assert cli(["--describe"]) == 0 and "rollout.batch_size = 32  [>= 1]" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Issue 15 item 6: teacher sub-sections; issue 16 item 8: secrets by mistake.


def test_teacher_sections_and_moved_fields_named():
    cfg = load_config(None, ["--teacher.kind", "human", "--teacher.human.wait_s", "30", "--teacher.retry.max_retries", "4",
                             "--teacher.vllm.max_model_len", "512", "--teacher.http.base_url", "http://x/v1"])
    t = cfg.teacher
    assert (t.human.wait_s, t.retry.max_retries, t.vllm.max_model_len, t.http.base_url) == (30, 4, 512, "http://x/v1")
    for old, new in [("teacher.human_wait_s", "teacher.human.wait_s"), ("teacher.max_retries", "teacher.retry.max_retries"),
                     ("teacher.base_url", "teacher.http.base_url"), ("teacher.vllm_max_model_len", "teacher.vllm.max_model_len")]:
        with pytest.raises(ConfigError, match=f"did you mean '{new}'"):
            load_config(None, [f"--{old}", "1"])


def test_fault_drill_knob_left_the_schema():
    with pytest.raises(ConfigError, match="sync.inject_load_delay_s: unknown field"):
        load_config(None, ["--sync.inject_load_delay_s", "1"])


def test_checkpoint_on_existing_choices():
    assert load_config().checkpoint.on_existing == "refuse"
    assert load_config(None, ["--checkpoint.on_existing", "move_aside"]).checkpoint.on_existing == "move_aside"
    with pytest.raises(ConfigError, match="checkpoint.on_existing"):
        load_config(None, ["--checkpoint.on_existing", "delete"])


SECRET = "sk-live-0123456789abcdefXYZ"


@pytest.mark.parametrize("field", ["teacher.http.api_key_env", "teacher.human.tokens_env"])
@pytest.mark.parametrize("value", [SECRET, "alice=0123456789abcdef0123", "1ABC", "MY KEY"])
def test_secret_env_fields_take_only_variable_names_and_never_echo_the_value(tmp_path, field, value, capsys):
    from correction_rl.config_cli import cli

    with pytest.raises(ConfigError) as info:
        load_config(None, [f"--{field}", value])
    message = str(info.value)
    assert field in message and "NAME of an environment variable" in message and value not in message
    src = tmp_path / "secret.yaml"
    section, _, leaf = field.rpartition(".")
    src.write_text(f"teacher:\n  {section.split('.')[1]}:\n    {leaf}: '{value}'\n")
    assert cli(["--config", str(src), "--no-path-checks"]) == 2
    out = capsys.readouterr()
    assert value not in out.err and value not in out.out
    assert load_config(None, [f"--{field}", "MY_KEY_2"])


def test_non_loopback_human_host_warns_about_clear_text_tokens(capsys):
    from correction_rl.config import config_warnings
    from correction_rl.config_cli import cli

    exposed = load_config(None, ["--teacher.kind", "human", "--teacher.human.host", "0.0.0.0"])
    assert any("clear text" in w for w in config_warnings(exposed))
    for host in ("127.0.0.1", "localhost", "::1"):
        assert not config_warnings(load_config(None, ["--teacher.kind", "human", "--teacher.human.host", host]))
    assert not config_warnings(load_config(None, ["--teacher.human.host", "0.0.0.0"]))  # not a human teacher
    assert cli(["--teacher.kind", "human", "--teacher.human.host", "10.0.0.5", "--no-path-checks"]) == 0
    assert "warning: teacher.human.host=10.0.0.5" in capsys.readouterr().err


def test_train_refuses_a_bad_range_before_writing_anything(tmp_path, capsys):
    from correction_rl.cli import main

    rc = main(["train", "--output_dir", str(tmp_path), "--name", "neg", "--mode", "inprocess",
               "--model.path", str(tmp_path), "--total_steps", "-3"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "total_steps: Input should be greater than or equal to 1 (got -3)" in err and "Traceback" not in err
    assert not (tmp_path / "neg").exists()


def test_the_demo_finds_its_config():
    """``make demo`` runs ``correction-rl demo`` with no flags: its default config must exist (a
    module move once pointed it into the package)."""
    from correction_rl.tools.demo import REPO

    assert (REPO / "configs" / "demo.yaml").is_file() and (REPO / "pyproject.toml").is_file()


def test_object_store_size_is_optional_and_at_least_what_ray_accepts():
    assert load_config(None, []).resources.object_store_mb is None
    assert load_config(None, ["--resources.object_store_mb", "400"]).resources.object_store_mb == 400
    with pytest.raises(ConfigError, match="resources.object_store_mb"):
        load_config(None, ["--resources.object_store_mb", "10"])
