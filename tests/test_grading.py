"""EM/F1/cover-EM against the official HotpotQA scorer's definitions, on hand-checked cases."""

import pytest

from qadata.answers import cover_exact_match, exact_match, extract_boxed, f1, normalise_answer, score


@pytest.mark.parametrize(
    "text,want",
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  an   apple, a day!  ", "apple day"),
        ("Theatre", "theatre"),  # 'the' only as a whole word
        ("U.S.A.", "usa"),
        ("Café «Noir»", "café «noir»"),  # unicode kept, non-ASCII punctuation kept (official)
        ("Ångström—unit", "ångström—unit"),
        ("", ""),
    ],
)
def test_normalise_answer(text, want):
    assert normalise_answer(text) == want


def test_exact_match_and_f1_hand_checked():
    assert exact_match("the Beatles", "Beatles")
    assert not exact_match("Beatles band", "Beatles")
    # pred 'new york city' vs gold 'new york': P=2/3, R=1 -> F1=0.8
    assert f1("New York City", "New York") == pytest.approx(0.8)
    assert f1("Paris", "London") == 0.0
    assert f1("a", "the") == 0.0  # both normalise to empty: no common token


@pytest.mark.parametrize(
    "pred,gold,want",
    [
        ("yes", "no", 0.0),
        ("yes", "yes it is", 0.0),  # prediction is special and differs: zero, not partial credit
        ("noanswer", "no answer", 0.0),
        ("no idea", "no", 0.0),  # gold is special and differs
        ("Yes.", "yes", 1.0),
        ("no way out", "way out", 0.8),  # 'no' inside a longer answer is an ordinary token
    ],
)
def test_yes_no_noanswer_rule(pred, gold, want):
    assert f1(pred, gold) == pytest.approx(want)


def test_cover_em_and_several_golds():
    assert cover_exact_match("It was born in New York City in 1990", "new york city")
    assert not cover_exact_match("York", "New York")
    s = score("the Big Apple", ["New York City", "Big Apple"])
    assert (s.em, s.f1, s.cover_em) == (1.0, 1.0, 1.0)
    s = score("Big", ["New York City", "Big Apple"])
    assert s.em == 0.0 and s.f1 == pytest.approx(2 / 3) and s.cover_em == 0.0
    assert score(None, ["x"]).f1 == 0.0 and score("x", []).em == 0.0


@pytest.mark.parametrize(
    "text,want",
    [
        ("<think>maybe \\boxed{A}</think> The answer is \\boxed{B}.", "B"),
        ("<think>x</think>\\boxed{first} then \\boxed{second}", "second"),
        ("<think>x</think> \\boxed{ {nested} braces {ok} }", "{nested} braces {ok}"),
        ("<think>x</think> \\boxed{unclosed", None),
        ("<think>only inside \\boxed{A}</think> no answer", None),
        ("no think tags \\boxed{42}", "42"),
        ("<think>a</think><think>b</think> \\boxed {spaced}", "spaced"),
        ("", None),
    ],
)
def test_extract_boxed(text, want):
    assert extract_boxed(text) == want
