"""Templates, validation rules, teacher metrics and the circuit breaker (pure, fast)."""

from __future__ import annotations

import pytest

from correction_rl.teachers.metrics import TeacherMetrics, percentile
from correction_rl.teachers.templates import BUILTIN, TemplateError, TemplateSet, load_template_file
from correction_rl.teachers.validation import ValidationRules, has_non_text, validate
from correction_rl.types import Prompt, Rollout

INSTRUCT = BUILTIN["instruct"]
RAW = BUILTIN["task_answer"]
RULES = ValidationRules()


def rollout(prompt: str = "rev:abcde=", response: str = "edcab", task: str = "reverse") -> Rollout:
    return Rollout(Prompt("p0", prompt, task), [1, 2], [3], response, policy_version=0)


def test_instruct_template_renders_prompt_and_response_and_parses_between_markers():
    r = rollout()
    messages = INSTRUCT.messages(r)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "FEWEST edits" in messages[0]["content"] and "unchanged" in messages[0]["content"]
    assert "rev:abcde=" in messages[1]["content"] and "<response>\nedcab\n</response>" in messages[1]["content"]
    assert "Task (reverse)" in messages[1]["content"]
    assert INSTRUCT.parse("Sure! Here it is:\n<corrected>\nedcba\n</corrected> done").text == "edcba"
    assert INSTRUCT.parse("<corrected>a\n\nb</corrected>").text == "a\n\nb"
    assert INSTRUCT.parse("edcba").reason == "unparseable"
    assert INSTRUCT.parse("<corrected>edcba").reason == "unparseable"


def test_task_answer_template_is_the_task_prompt_and_the_whole_answer():
    r = rollout()
    assert RAW.completion_prompt(r) == "rev:abcde="
    assert RAW.messages(r) == [{"role": "user", "content": "rev:abcde="}]
    assert RAW.parse("edcba").text == "edcba"
    assert RAW.api == "completions" and INSTRUCT.api == "chat"


@pytest.mark.parametrize(
    "answer, template, reason",
    [
        ("", INSTRUCT, "empty"),
        ("<corrected>   \n</corrected>", INSTRUCT, "empty"),
        ("the answer is edcba", INSTRUCT, "unparseable"),
        ("I'm sorry, but I can't help with that.", INSTRUCT, "refusal"),
        ("<corrected>I cannot correct this response.</corrected>", INSTRUCT, "refusal"),
        ("  As an AI language model, I ...", RAW, "refusal"),
        ("rev:abcde=edcba", RAW, "prompt_echo"),
        ("<corrected>rev:abcde=</corrected>", INSTRUCT, "prompt_echo"),
        ("x" * 129, RAW, "length_blowup"),
        ("edc\x00ba", RAW, "non_text"),
        ("edc\ufffdba", INSTRUCT, "non_text"),
        ("<corrected>ed\x1bcba</corrected>", INSTRUCT, "non_text"),
    ],
)
def test_each_rule_rejects_with_its_reason(answer, template, reason):
    verdict = validate(answer, rollout(), template, RULES)
    assert (verdict.text, verdict.reason) == (None, reason)


def test_good_answers_pass_including_no_op_tabs_and_a_long_but_allowed_fix():
    r = rollout()
    assert validate("<corrected>edcba</corrected>", r, INSTRUCT, RULES).text == "edcba"
    assert validate("<corrected>edcab</corrected>", r, INSTRUCT, RULES).text == "edcab"  # no-op
    assert validate("a\tb\nc", r, RAW, RULES).text == "a\tb\nc"
    # the floor: y has 5 chars, but up to 4 x 32 = 128 chars are allowed
    assert validate("y" * 128, r, RAW, RULES).text == "y" * 128
    # a response that itself starts with the prompt may keep it
    echoing = rollout(response="rev:abcde=edcab")
    assert validate("rev:abcde=edcba", echoing, RAW, RULES).text == "rev:abcde=edcba"
    # refusal words inside a correction are not a refusal
    assert validate("He said: I'm sorry.", rollout(response="He said: Im sorry."), RAW, RULES).accepted


def test_length_ratio_and_refusal_patterns_are_configurable():
    strict = ValidationRules(max_length_ratio=1.5, length_floor_chars=4, refusal_patterns=[r"nope\b"])
    r = rollout(response="abcd")
    assert validate("abcdef", r, RAW, strict).text == "abcdef"
    assert validate("abcdefg", r, RAW, strict).reason == "length_blowup"
    assert validate("Nope, not doing it", r, RAW, strict).reason == "refusal"
    longer = rollout(response="abcdefgh")
    assert validate("I'm sorry", longer, RAW, strict).accepted  # the default patterns were replaced
    assert validate("I'm sorry", longer, RAW, RULES).reason == "refusal"
    with pytest.raises(ValueError, match="refusal_patterns: bad regex"):
        ValidationRules(refusal_patterns=["("])
    with pytest.raises(ValueError, match="max_length_ratio"):
        ValidationRules(max_length_ratio=0)


def test_has_non_text():
    assert not has_non_text("plain text\twith\ttabs\r\nand é ü 中文")
    assert has_non_text("\x07bell") and has_non_text("a\ufffdb") and has_non_text("\x00")


def test_template_set_per_task_and_from_a_file(tmp_path):
    path = tmp_path / "templates.yaml"
    path.write_text(
        "code_fix:\n"
        "  system: 'Fix the {task} code.'\n"
        "  user: \"Q: {prompt}\\nA: {response}\\nFixed:\"\n"
        "  start_marker: '```'\n"
        "  end_marker: '```'\n"
    )
    templates = TemplateSet("instruct", {"reverse": "task_answer", "python": "code_fix"}, path)
    assert templates.for_rollout(rollout()).name == "task_answer"
    assert templates.for_rollout(rollout(task="addition")).name == "instruct"
    code = templates.for_rollout(rollout(prompt="def f(", response="pass", task="python"))
    assert code.completion_prompt(rollout(prompt="def f(", response="pass", task="python")) == (
        "Fix the python code.\n\nQ: def f(\nA: pass\nFixed:"
    )
    assert code.parse("```\nreturn 1\n```").text == "return 1"
    with pytest.raises(TemplateError, match=r"teacher.templates_by_task.sorting: unknown template 'nope'"):
        TemplateSet("instruct", {"sorting": "nope"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("t:\n  user: 'hello {name}'\n")
    with pytest.raises(TemplateError, match=r"template 't': user text has a bad placeholder"):
        load_template_file(bad)
    bad.write_text("t:\n  user: 'x'\n  colour: red\n")
    with pytest.raises(TemplateError, match=r"unknown field\(s\) \['colour'\]"):
        load_template_file(bad)
    with pytest.raises(TemplateError, match="not found"):
        load_template_file(tmp_path / "missing.yaml")


def test_percentile_matches_hand_computed_values():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0.5) == 2.5
    assert percentile(values, 0.9) == pytest.approx(3.7)
    assert percentile(values, 0.0) == 1.0 and percentile(values, 1.0) == 4.0
    assert percentile([], 0.5) == 0.0


def test_teacher_metrics_counts_outcomes_errors_tokens_and_edit_distance():
    m = TeacherMetrics()
    for latency in (0.1, 0.2, 0.3, 0.4, 1.0):
        m.request(latency, prompt_tokens=10, completion_tokens=3)
    m.error("http_429")
    m.error("http_429")
    m.retry()
    m.outcome("edcab", "edcba", None)  # 2 character edits
    m.outcome("abc", "abc", None)  # no-op
    m.outcome("abc", None, "refusal")
    m.add_busy(2.0)
    out = m.snapshot()
    assert out["teacher/requests"] == 5 and out["teacher/rollouts"] == 3 and out["teacher/accepted"] == 2
    assert out["teacher/rejected/refusal"] == 1 and out["teacher/errors/http_429"] == 2
    assert out["teacher/retries"] == 1
    assert out["teacher/latency_p50_s"] == pytest.approx(0.3)
    assert out["teacher/latency_p90_s"] == pytest.approx(0.76)
    assert out["teacher/latency_mean_s"] == pytest.approx(0.4)
    assert out["teacher/prompt_tokens"] == 50 and out["teacher/completion_tokens"] == 15
    assert out["teacher/corrections_per_s"] == pytest.approx(1.5)
    assert out["teacher/accepted_edit_distance_mean"] == pytest.approx(1.0)
    assert out["teacher/accepted_noop_rate"] == pytest.approx(0.5)


def test_circuit_breaker_opens_after_consecutive_failures_and_half_opens_after_cooldown():
    from correction_rl.teachers.http_teacher import CircuitBreaker

    now = [0.0]
    breaker = CircuitBreaker(threshold=3, cooldown_s=10.0, clock=lambda: now[0])
    assert breaker.allow()
    assert not breaker.failure() and not breaker.failure()
    breaker.success()  # a success resets the count
    assert [breaker.failure() for _ in range(3)] == [False, False, True]
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 9.9
    assert not breaker.allow()
    now[0] = 10.0
    assert breaker.allow() and not breaker.allow()  # one trial request only
    assert breaker.failure() and breaker.state == "open"  # the trial failed: open again
    now[0] = 20.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow() and breaker.allow()


def test_config_builds_teacher_settings_and_rejects_unknown_templates(tmp_path):
    from correction_rl.run.components import build_teacher
    from correction_rl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="teacher.on_rejection"):
        load_config(None, ["--teacher.on_rejection", "sometimes"])
    cfg = load_config(None, ["--teacher.kind", "http", "--teacher.http.base_url", "http://127.0.0.1:9/v1",
                             "--teacher.http.model", "m", "--teacher.template", "nope"])
    with pytest.raises(TemplateError, match="teacher.template: unknown template 'nope'"):
        build_teacher(cfg)
    cfg = load_config(None, ["--teacher.kind", "http", "--teacher.http.model", "m"])
    with pytest.raises(ValueError, match="teacher.http.base_url is required"):
        build_teacher(cfg)
