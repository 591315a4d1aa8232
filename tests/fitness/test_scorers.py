"""Scorers on hand-written text: every extraction, normalization and match mode, plus properties."""

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evomerge.fitness import scorers as s


@pytest.mark.parametrize(
    ("text", "stop", "expected"),
    [("42\nmore", ["\n"], "42"), ("a. b", [".", " "], "a"), ("abc", [], "abc"), ("abc", ["x"], "abc")],
)
def test_truncate_at_stop(text, stop, expected):
    assert s.truncate_at_stop(text, stop) == expected


def test_extract_regex_groups():
    assert s.extract_regex("The answer is (B).", r"answer is \((\w)\)") == "B"
    assert s.extract_regex("x=3, y=4", r"y=(?P<y>\d)", "y") == "4"
    assert s.extract_regex("x=3, y=4", r"(x)=(\d)", 2) == "3"
    assert s.extract_regex("nothing here", r"answer: (\d+)") is None
    assert s.extract_regex("ab", r"a(c)?b") is None  # optional group that did not take part


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 42.", "42"),
        ("3 apples and 5 pears", "5"),
        ("costs $1,234.50 total", "1,234.50"),
        ("x = -7", "-7"),
        ("5-3", "3"),  # a minus after a digit is an operator
        ("1,2,3", "3"),  # not a thousands separator
        ("about .5 of it", ".5"),
        ("2e3", "2e3"),
        ("no digits", None),
        ("", None),
    ],
)
def test_last_number(text, expected):
    assert s.last_number(text) == expected


def test_first_line_skips_blank_lines():
    assert s.first_line("\n\n  Paris\nLondon") == "  Paris"
    assert s.first_line("   \n") == ""


def test_extract_modes():
    text = "\nParis is the answer. 12"
    assert s.extract_answer(text, "full") == text
    assert s.extract_answer(text, "first_line") == "Paris is the answer. 12"
    assert s.extract_answer(text, "last_number") == "12"
    assert s.extract_answer(text, "regex", r"(\w+) is the answer") == "Paris"
    with pytest.raises(ValueError, match="pattern"):
        s.extract_answer(text, "regex")
    with pytest.raises(ValueError, match="allowed: regex, last_number"):
        s.extract_answer(text, "middle")


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ((), "  Hello, World! \n"),
        (("strip",), "Hello, World!"),
        (("lowercase",), "  hello, world! \n"),
        (("remove_punctuation",), "  Hello World \n"),
        (("remove_whitespace",), "Hello,World!"),
        (("strip", "lowercase", "remove_punctuation"), "hello world"),
    ],
)
def test_normalize_each_step(steps, expected):
    assert s.normalize("  Hello, World! \n", steps) == expected


def test_normalize_unicode_punctuation_and_unknown_step():
    assert s.normalize("«Ça va?»", ["remove_punctuation"]) == "Ça va"
    with pytest.raises(ValueError, match="allowed: strip"):
        s.normalize("x", ["upper"])


@given(st.text(max_size=30), st.lists(st.sampled_from(s.NORMALIZATIONS), unique=True))
def test_normalize_is_order_free_and_idempotent(text, steps):
    once = s.normalize(text, steps)
    assert all(s.normalize(text, p) == once for p in itertools.permutations(steps))
    assert s.normalize(once, steps) == once


@pytest.mark.parametrize(
    ("text", "expected"),
    [("42", 42.0), (" -3.5 ", -3.5), ("$1,000.", 1000.0), ("50%", 50.0), ("1e3", 1000.0)],
)
def test_parse_number(text, expected):
    assert s.parse_number(text) == expected


@pytest.mark.parametrize("text", ["nan", "inf", "1e400", "4 2", "12,34", "forty", ""])
def test_parse_number_rejects(text):
    assert s.parse_number(text) is None


@given(st.integers(-(10**12), 10**12))
def test_last_number_reads_back_formatted_integers(n):
    for written in (f"{n}", f"{n:,}"):
        assert s.parse_number(s.last_number(f"So the total is {written}.")) == n


def test_match_modes():
    assert s.match_exact("paris", "paris") and not s.match_exact("Paris", "paris")
    assert s.match_numeric("42.0", "42") and s.match_numeric("1,000", "1000")
    assert not s.match_numeric("42.1", "42") and s.match_numeric("42.1", "42", tolerance=0.1 + 1e-9)
    assert not s.match_numeric("forty-two", "42")


def test_grade_generation_modes():
    assert s.grade_generation(" The answer is 17 apples", "17", extract="last_number", match="numeric") == (
        1.0,
        "17",
    )
    assert s.grade_generation("no idea", "17", extract="last_number", match="numeric") == (0.0, None)
    paris = s.grade_generation(
        "\nPARIS.\nmore", "paris", extract="first_line", steps=("strip", "lowercase", "remove_punctuation")
    )
    assert paris == (1.0, "paris")
    assert s.grade_generation(
        "ANSWER: (c)", "C", extract="regex", pattern=r"\((\w)\)", steps=("lowercase",)
    ) == (1.0, "c")
    assert s.grade_generation("  yes ", "yes", extract="full", steps=()) == (0.0, "  yes ")
    with pytest.raises(ValueError, match="allowed: exact, numeric"):
        s.grade_generation("1", "1", match="fuzzy")


def test_choose_breaks_ties_first_and_refuses_nan():
    assert s.choose([-1.0, -0.5, -0.5]) == 1
    assert s.choose([-1.0, float("nan")]) == -1
    with pytest.raises(ValueError):
        s.choose([])


def test_multiple_choice_acc_norm_divides_by_characters():
    # 'a' (1 char) at -2.0 beats 'bbbbbbbb' (8 chars) at -4.0 raw, but not per character (-2.0 vs -0.5).
    assert s.multiple_choice_scores([-2.0, -4.0], ["a", "bbbbbbbb"], gold=1) == (0.0, 1.0)
    assert s.multiple_choice_scores([-2.0, -4.0], ["a", "bbbbbbbb"], gold=0) == (1.0, 0.0)
    assert s.multiple_choice_scores([float("nan"), -1.0], ["a", "b"], gold=0) == (0.0, 0.0)
    with pytest.raises(ValueError, match="out of range"):
        s.multiple_choice_scores([-1.0, -2.0], ["a", "b"], gold=2)


def test_logprob_and_perplexity():
    assert s.mean_logprob(-6.0, 3) == -2.0
    assert s.mean_logprob(float("nan"), 3) == -math.inf
    assert s.perplexity(-6.0, 3) == pytest.approx(math.exp(2.0))
    assert s.perplexity(-1e6, 1) == math.inf
    assert s.perplexity(float("nan"), 4) == math.inf
    with pytest.raises(ValueError):
        s.mean_logprob(-1.0, 0)
