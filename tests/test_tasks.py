"""Tasks: checkers and minimal corrections on hand-written cases, splits, knobs, minimality."""

from __future__ import annotations

import random

import pytest

from correction_rl.edits import edit_distance
from correction_rl.models import ALPHABET
from correction_rl.tasks import TaskError, get_task, make_prompts, parse_difficulty, task_names
from correction_rl.types import Prompt

GARBAGE = "\x00<eos>\tµ#@!"


def prompt(task: str, text: str) -> Prompt:
    return get_task(task).make_prompt(text)


# -- addition -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, ok, fixed",
    [
        ("122", True, "122"),
        ("0122", True, "0122"),  # leading zeros spell the same number: already right
        ("123", False, "122"),  # one wrong digit: one substitution
        ("112", False, "122"),
        ("", False, "122"),  # empty response
        ("1222", False, "122"),  # over-long: delete the extra digit
        ("122122122122", False, "122"),
        ("0123", False, "0122"),  # keeps the leading zero (distance 1, canonical is 2 away)
        ("-122", False, "122"),
        ("12 2", False, "122"),
        ("122\n", False, "122"),
        ("abc", False, "122"),  # garbage
        (GARBAGE, False, "122"),
    ],
)
def test_addition_check_and_correction(response, ok, fixed):
    p = prompt("addition", "37+85=")
    assert p.answer == "122"
    task = get_task("addition")
    assert task.check(p, response) is ok
    assert task.minimal_correction(p, response) == fixed


def test_addition_carry_and_zero():
    task = get_task("addition")
    assert task.solve("999+1=") == "1000"
    assert task.solve("0+0=") == "0"
    p = prompt("addition", "0+0=")
    assert task.check(p, "000") and not task.check(p, "")
    assert task.minimal_correction(p, "") == "0"


# -- sorting ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, ok, fixed",
    [
        ("5,9,31", True, "5,9,31"),
        ("9,5,31", False, "5,9,31"),  # swapped
        ("5,31", False, "5,9,31"),  # dropped item
        ("5,9,31,31", False, "5,9,31"),  # over-long
        ("5, 9, 31", False, "5,9,31"),  # strict format
        ("", False, "5,9,31"),
        (GARBAGE, False, "5,9,31"),
    ],
)
def test_sorting_check_and_correction(response, ok, fixed):
    p = prompt("sorting", "sort:31,5,9=")
    task = get_task("sorting")
    assert task.check(p, response) is ok
    assert task.minimal_correction(p, response) == fixed


def test_sorting_duplicates_and_numeric_order():
    assert get_task("sorting").solve("sort:10,9,10,100=") == "9,10,10,100"


# -- reverse ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, ok, fixed",
    [
        ("edcba", True, "edcba"),
        ("edcab", False, "edcba"),
        ("abcde", False, "edcba"),
        ("", False, "edcba"),
        ("edcbaa", False, "edcba"),
        ("EDCBA", False, "edcba"),
        (GARBAGE, False, "edcba"),
    ],
)
def test_reverse_check_and_correction(response, ok, fixed):
    p = prompt("reverse", "rev:abcde=")
    task = get_task("reverse")
    assert task.check(p, response) is ok
    assert task.minimal_correction(p, response) == fixed


# -- shared properties --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["addition", "sorting", "reverse"])
def test_minimality_over_random_responses(name):
    """y' is right, equals y when y is right, and is never farther from y than the answer is."""
    task = get_task(name)
    rng = random.Random(0)
    prompts = task.generate(30, "eval", seed=1)
    for p in prompts:
        answer = p.answer
        candidates = [answer, "", answer * 2, answer[:-1], "0" + answer, "00" + answer[1:]]
        for _ in range(40):
            chars = list(answer)
            for _ in range(rng.randint(1, 4)):  # random edits of the right answer
                op, i = rng.choice("sid"), rng.randint(0, len(chars))
                c = rng.choice("0123456789,abcdez" + "".join(rng.sample(ALPHABET, 3)))
                if op == "s" and i < len(chars):
                    chars[i] = c
                elif op == "i":
                    chars.insert(i, c)
                elif op == "d" and i < len(chars):
                    del chars[i]
            candidates.append("".join(chars))
        candidates += ["".join(rng.choices(ALPHABET, k=rng.randint(0, 12))) for _ in range(20)]
        for y in candidates:
            fixed = task.minimal_correction(p, y)
            assert task.check(p, fixed), (p.text, y, fixed)
            assert edit_distance(y, fixed) <= edit_distance(y, answer), (p.text, y, fixed)
            if task.check(p, y):
                assert fixed == y


@pytest.mark.parametrize("name", ["addition", "sorting", "reverse"])
def test_splits_are_disjoint_deterministic_and_short(name):
    task = get_task(name)
    train = task.generate(2000, "train", seed=0)
    held_out = task.generate(200, "eval", seed=0)
    assert len({p.text for p in train}) == 2000 and len({p.text for p in held_out}) == 200
    assert not {p.text for p in train} & {p.text for p in held_out}
    # another seed draws other problems, but a problem's split never changes
    other = task.generate(200, "eval", seed=1)
    assert [p.text for p in other] != [p.text for p in held_out]
    assert not {p.text for p in other} & {p.text for p in train}
    assert task.generate(200, "eval", seed=0) == held_out
    for p in train + held_out:
        assert p.task == name and p.answer == task.solve(p.text)
        assert len(p.text) <= 40 and len(p.answer) <= 24
        assert set(p.text + p.answer) <= set(ALPHABET)
        assert task.check(p, p.answer)


def test_stream_stays_in_its_split():
    task = get_task("addition", max_digits=2)
    stream = task.stream("train", seed=3)
    held_out = {p.text for p in task.generate(100, "eval", seed=0)}
    drawn = [next(stream) for _ in range(500)]
    assert all(task.split_of(p.text) == "train" for p in drawn)
    assert not {p.text for p in drawn} & held_out


def test_difficulty_knobs_change_problems():
    task = get_task("addition", min_digits=4, max_digits=4)
    for p in task.generate(50, "train", seed=0):
        a, b = p.text[:-1].split("+")
        assert len(a) == len(b) == 4
    sort = get_task("sorting", min_len=2, max_len=2, max_value=9)
    assert all(len(p.answer.split(",")) == 2 for p in sort.generate(20, "train", seed=0))
    rev = get_task("reverse", min_len=5, max_len=5, alphabet=2)
    assert all(set(p.answer) <= {"a", "b"} and len(p.answer) == 5 for p in rev.generate(20, "train", 0))


def test_bad_task_input_is_named():
    with pytest.raises(TaskError, match="unknown task 'nope'.*addition"):
        get_task("nope")
    with pytest.raises(TaskError, match="unknown difficulty knob.*max_digit.*allowed"):
        get_task("addition", max_digit=2)
    with pytest.raises(TaskError, match="min_digits <= max_digits"):
        get_task("addition", min_digits=3, max_digits=2)
    with pytest.raises(TaskError, match="must be an int"):
        get_task("sorting", max_len="5")
    with pytest.raises(TaskError, match="not an addition prompt"):
        get_task("addition").solve("sort:1,2=")
    with pytest.raises(TaskError, match="found only [0-2] distinct train prompts, asked for 50"):
        get_task("reverse", min_len=1, max_len=1, alphabet=2).generate(50, "train", seed=0)
    with pytest.raises(TaskError, match="unknown split"):
        get_task("addition").generate(5, "test", seed=0)  # type: ignore[arg-type]


def test_make_prompts_scopes_knobs():
    prompts = make_prompts(
        ["addition", "reverse"], {"addition.max_digits": 1, "max_len": 4}, 5, "train", 0
    )
    assert [p.task for p in prompts] == ["addition"] * 5 + ["reverse"] * 5
    assert all(len(p.text) <= len("9+9=") for p in prompts[:5])
    assert all(len(p.answer) <= 4 for p in prompts[5:])
    with pytest.raises(TaskError, match="unknown knob 'max_digit'"):
        make_prompts(["addition"], {"max_digit": 1}, 5, "train", 0)
    with pytest.raises(TaskError, match="unknown knob 'sorting.max_len'"):
        make_prompts(["addition"], {"sorting.max_len": 1}, 5, "train", 0)


def test_registry_lists_the_tasks():
    assert task_names() == ["addition", "reverse", "sorting", "spelling"]


def test_parse_difficulty():
    assert parse_difficulty(["max_digits=2", "addition.min_digits=1"]) == {
        "max_digits": 2,
        "addition.min_digits": 1,
    }
    with pytest.raises(TaskError, match="expected KNOB=INT, got 'max_digits'"):
        parse_difficulty(["max_digits"])
    with pytest.raises(TaskError, match="got 'max_digits=two'"):
        parse_difficulty(["max_digits=two"])
