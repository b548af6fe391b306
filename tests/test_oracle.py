"""The oracle teacher: minimal corrections through the Teacher protocol."""

from __future__ import annotations

import pytest

from correction_rl.tasks import TaskError, get_task
from correction_rl.teachers.base import Teacher
from correction_rl.teachers.oracle import OracleTeacher
from correction_rl.types import Prompt, Rollout


def rollout(prompt: Prompt, text: str, finish: str = "stop") -> Rollout:
    return Rollout(
        prompt=prompt,
        prompt_ids=[],
        response_ids=list(range(len(text))),
        response_text=text,
        policy_version=3,
        finish_reason=finish,  # type: ignore[arg-type]
    )


def test_oracle_is_a_teacher_and_corrects_minimally():
    teacher = OracleTeacher()
    assert isinstance(teacher, Teacher) and teacher.name == "oracle"
    add = get_task("addition").make_prompt("37+85=")
    srt = get_task("sorting").make_prompt("sort:31,5,9=")
    rev = get_task("reverse").make_prompt("rev:abcde=")
    cases = [
        (add, "122", "122"),
        (add, "123", "122"),
        (add, "0123", "0122"),
        (add, "", "122"),
        (add, "1229999999", "122", "length"),
        (srt, "9,5,31", "5,9,31"),
        (srt, "5,9,31", "5,9,31"),
        (rev, "edcab", "edcba"),
        (rev, "#!?\n", "edcba"),
    ]
    rollouts = [rollout(c[0], c[1], *c[3:]) for c in cases]
    corrections = teacher.correct(rollouts)
    assert [c.corrected_text for c in corrections] == [c[2] for c in cases]
    assert [c.rollout for c in corrections] == rollouts  # one per rollout, in order
    assert all(c.accepted and c.rejection is None and c.teacher == "oracle" for c in corrections)
    assert [c.is_noop for c in corrections] == [c[1] == c[2] for c in cases]


def test_oracle_uses_the_records_answer_for_file_prompts():
    # A prompt written by hand: the task parses its text, the record's answer is authoritative.
    p = Prompt(prompt_id="f-1", text="2+2=", task="addition", answer="4")
    assert OracleTeacher("o2").correct([rollout(p, "5")])[0].corrected_text == "4"
    odd = Prompt(prompt_id="f-2", text="What is two plus two?", task="addition", answer="4")
    assert OracleTeacher().correct([rollout(odd, "04")])[0].corrected_text == "04"


def test_oracle_errors_name_the_prompt():
    with pytest.raises(TaskError, match="prompt 'x-1'.*unknown task 'poetry'"):
        OracleTeacher().correct([rollout(Prompt(prompt_id="x-1", text="hi", task="poetry"), "a")])
    unparsable = Prompt(prompt_id="x-2", text="2 plus 2", task="addition")
    with pytest.raises(TaskError, match="prompt 'x-2'.*not an addition prompt"):
        OracleTeacher().correct([rollout(unparsable, "4")])


def test_empty_batch():
    assert OracleTeacher().correct([]) == []


def test_reference_correction_is_the_gold_answer_whatever_y_was():
    teacher = OracleTeacher(correction="reference")
    add = get_task("addition").make_prompt("37+85=")
    rev = get_task("reverse").make_prompt("rev:abcde=")
    got = teacher.correct([rollout(add, "0123"), rollout(add, "0122"), rollout(rev, "edcab"), rollout(rev, "edcba")])
    # minimal would keep "0122" (a right spelling) and fix "0123" to "0122"; reference rewrites both
    assert [c.corrected_text for c in got] == ["122", "122", "edcba", "edcba"]
    assert [c.corrected_text for c in OracleTeacher().correct([rollout(add, "0123")])] == ["0122"]
    with pytest.raises(ValueError, match="oracle_correction"):
        OracleTeacher(correction="gold")  # type: ignore[arg-type]


def test_config_oracle_correction_reaches_the_teacher():
    from correction_rl.config import RunConfig, TeacherConfig
    from correction_rl.run.components import build_teacher

    cfg = RunConfig(teacher=TeacherConfig(oracle_correction="reference"))
    assert build_teacher(cfg).correction == "reference"
    assert build_teacher(RunConfig()).correction == "minimal"
