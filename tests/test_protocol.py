import random

import pytest

from agent.protocol import parse

GOOD = (
    "<think>I need the author. <begin_search> author of The Glass Orchard </end_search>"
    '<search_result>result 1: "The Glass Orchard"\nwritten by Velora Kastrin</search_result>'
    " So Kastrin. </think> The answer is \\boxed{Velora Kastrin}."
)


def test_well_formed_trajectory():
    p = parse(GOOD)
    assert [s.kind for s in p.steps] == ["think", "action", "observation", "think", "answer"]
    assert p.queries == ["author of The Glass Orchard"]
    assert p.answer == "Velora Kastrin" and p.balanced and not p.issues
    obs = p.steps[2]
    assert GOOD[obs.start : obs.end].startswith("<search_result>") and GOOD[obs.start : obs.end].endswith(
        "</search_result>"
    )


def test_prefilled_think_and_token_offsets():
    text = GOOD[len("<think>") :]
    # a toy tokenizer: one token per 4 characters
    offsets = [(i, min(i + 4, len(text))) for i in range(0, len(text), 4)]
    p = parse(text, think_open=True, token_offsets=offsets)
    assert p.balanced and p.answer == "Velora Kastrin"
    for s in p.steps:
        assert offsets[s.token_start][0] <= s.start < offsets[s.token_start][1]
        assert offsets[s.token_end - 1][0] < s.end <= offsets[s.token_end - 1][1]


@pytest.mark.parametrize(
    "text,issue",
    [
        ("<think>x <begin_search> q", "unclosed <begin_search>"),
        ("<think><begin_search>  </end_search></think>\\boxed{a}", "empty query"),
        ("<think><begin_search> a <begin_search> b </end_search></think>\\boxed{a}", "nested <begin_search>"),
        ("<think>x</think> \\boxed{a} \\boxed{b}", "2 boxed answers"),
        ("</end_search><think>x</think>\\boxed{a}", "stray </end_search>"),
        ("<think>x</think></think>\\boxed{a}", "stray </think>"),
        ("<think>runaway " + "blah " * 2000, "no boxed answer"),
    ],
)
def test_malformed_outputs_are_reported_not_raised(text, issue):
    p = parse(text)
    assert any(issue in i for i in p.issues), p.issues
    assert not p.balanced or issue in ("2 boxed answers", "empty query")


def test_several_boxed_answers_take_the_last():
    assert parse("<think>x</think> \\boxed{a} then \\boxed{b}").answer == "b"


def test_random_garbage_never_crashes():
    rng = random.Random(0)
    pieces = [
        "<think>",
        "</think>",
        "<begin_search>",
        "</end_search>",
        "<search_result>",
        "</search_result>",
        "\\boxed{",
        "}",
        "{",
        "text ",
        "\n",
        "é",
        "<",
        ">",
        "/",
    ]
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        p = parse(text, think_open=rng.random() < 0.5, token_offsets=[(i, i + 1) for i in range(len(text))])
        for s in p.steps:
            assert 0 <= s.start <= s.end <= len(text)
            assert 0 <= s.token_start <= s.token_end <= len(text)
