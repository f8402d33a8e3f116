"""Property tests (hypothesis): the tag protocol parser, answer extraction and metrics, the loaders and the
rollout's span/mask invariants, over generated inputs. Profiles ("ci", "dev") are in tests/conftest.py;
the per-test example counts scale with the loaded profile's ``max_examples``."""

from __future__ import annotations

import json
import math
import string

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from agent.engine_api import cut_at_stop
from agent.protocol import ACTION_CLOSE, ACTION_OPEN, OBS_CLOSE, OBS_OPEN, THINK_CLOSE, THINK_OPEN, parse
from agent.rollout import (
    FORCE_ANSWER,
    FORCE_BOX,
    OBS_CLOSE_TEXT,
    OBS_OPEN_TEXT,
    SEARCH_LIMIT,
    TRUNCATED,
    Rollout,
    RolloutConfig,
    render_observation,
)
from qadata.answers import (
    cover_exact_match,
    exact_match,
    extract_boxed,
    f1,
    f1_precision_recall,
    normalise_answer,
    score,
)
from qadata.loaders import SourceSpec, count_records, load_source, load_sources
from qadata.schema import Rejected, questions_table, rejected_table

TAGS = (THINK_OPEN, THINK_CLOSE, ACTION_OPEN, ACTION_CLOSE, OBS_OPEN, OBS_CLOSE)
EXAMPLES = settings.default.max_examples  # the loaded profile's


def scaled(fraction: float, **kw) -> settings:
    """This test's share of the profile's examples (an expensive test runs fewer)."""
    return settings(max_examples=max(10, int(EXAMPLES * fraction)), **kw)


def _no_tags(s: str) -> bool:
    return not any(t in s for t in TAGS)


# free text: printable ASCII with the tags' characters, and unicode that tokenizers and str.lower/strip/split treat
# specially (multi-byte, combining, case-changing, non-ASCII whitespace and line breaks); never a whole tag
_chars = (
    string.ascii_letters
    + string.digits
    + " \n\t.,;:!?'\"-()<>/_{}\\"
    + "éßİıſ\u212a中文\u00a0\u2028\u3000\u0301ﬁ\U0001f642"
)
free = st.text(_chars, max_size=24).filter(_no_tags)
plain = free.filter(lambda s: "\\boxed" not in s)  # free text with no box either
nonblank = st.builds(lambda a, c, b: a + c + b, plain, st.sampled_from(string.ascii_letters + "é中"), plain).filter(
    lambda s: _no_tags(s) and "\\boxed" not in s
)
_fragments = st.sampled_from(TAGS + ("\\boxed{", "\\boxed {", "}", "{", "<", "/", ">", "think", "search", " ", "\n"))
arbitrary = st.lists(st.one_of(st.text(_chars, max_size=8), _fragments), max_size=40).map("".join)


_no_braces = plain.map(lambda s: s.replace("{", "").replace("}", ""))
# text whose curly braces balance (a boxed answer's content), with no tag and no box
braced = st.recursive(
    _no_braces,
    lambda inner: st.lists(inner | inner.map(lambda s: "{" + s + "}"), max_size=3).map("".join),
    max_leaves=8,
)


# -- the tag protocol -------------------------------------------------------------------------------------------


@st.composite
def trajectories(draw):
    """A well-formed completion from the protocol's grammar, with what it is made of."""
    think_open = draw(st.booleans())
    hops = draw(st.lists(st.tuples(free, nonblank, plain), max_size=5))  # (reasoning, query, observation)
    final, prefix, suffix = draw(free), draw(plain), draw(plain)
    answer = draw(braced)
    box = draw(st.sampled_from(["\\boxed{", "\\boxed {", "\\boxed\n{"]))
    parts = [] if think_open else [THINK_OPEN]
    for reasoning, query, obs in hops:
        parts += [reasoning, ACTION_OPEN, query, ACTION_CLOSE, OBS_OPEN, obs, OBS_CLOSE]
    parts += [final, THINK_CLOSE, prefix, box, answer, "}", suffix]
    return "".join(parts), think_open, hops, answer


@given(arbitrary, st.booleans())
@scaled(1.0)
def test_parse_never_raises_and_its_steps_lie_in_the_text(text, think_open):
    p = parse(text, think_open=think_open)
    for s in p.steps:
        assert 0 <= s.start <= s.end <= len(text)
        assert s.kind in ("think", "action", "observation", "answer")
        assert s.text == s.text.strip()
    if p.balanced:
        assert not any(i.startswith(("stray", "nested", "unclosed")) for i in p.issues)
    else:
        assert p.issues  # never silently unbalanced
    assert p.answer is None or p.think_closed
    if p.think_closed:
        assert p.answer == extract_boxed(text)
    assert all(q and q == q.strip() for q in p.queries)


@given(trajectories())
@scaled(1.0)
def test_a_grammar_trajectory_parses_back_to_its_queries_and_answer(case):
    text, think_open, hops, answer = case
    p = parse(text, think_open=think_open)
    assert p.issues == [] and p.balanced
    assert p.queries == [q.strip() for _, q, _ in hops]
    assert [s.text for s in p.steps if s.kind == "observation"] == [o.strip() for _, _, o in hops]
    assert p.answer == answer.strip()
    kinds = [s.kind for s in p.steps if s.kind != "think"]
    assert kinds == ["action", "observation"] * len(hops) + ["answer"]
    for a, b in zip(p.steps, p.steps[1:]):  # ordered, never overlapping
        assert a.end <= b.start
    for s in p.actions:
        assert text[s.start : s.end].startswith(ACTION_OPEN) and text[s.start : s.end].endswith(ACTION_CLOSE)


@given(trajectories(), st.lists(st.integers(1, 7), min_size=1, max_size=400))
@scaled(0.5)
def test_token_spans_cover_each_step(case, widths):
    """Given per-token character offsets (a toy tokenizer of random widths), each step's token span starts at
    the token holding its first character and ends with the token holding its last."""
    text, think_open, _, _ = case
    offsets, pos, i = [], 0, 0
    while pos < len(text):
        w = widths[i % len(widths)]
        offsets.append((pos, min(pos + w, len(text))))
        pos, i = pos + w, i + 1
    p = parse(text, think_open=think_open, token_offsets=offsets)
    for s in p.steps:
        assert offsets[s.token_start][0] <= s.start < offsets[s.token_start][1]
        assert offsets[s.token_end - 1][0] < s.end <= offsets[s.token_end - 1][1]


@given(trajectories(), st.data())
@scaled(1.0)
def test_a_missing_tag_is_reported_not_raised(case, data):
    """Deleting any one tag from a well-formed trajectory leaves it unbalanced, with an issue saying why."""
    text, think_open, _, _ = case
    where = [(i, t) for t in TAGS for i in range(len(text)) if text.startswith(t, i)]
    i, tag = data.draw(st.sampled_from(where))
    broken = text[:i] + text[i + len(tag) :]
    assume(sum(broken.count(t) for t in TAGS) == sum(text.count(t) for t in TAGS) - 1)  # no tag formed anew
    p = parse(broken, think_open=think_open)
    assert not p.balanced and p.issues


# -- answer extraction and metrics ------------------------------------------------------------------------------


@given(
    head=st.lists(st.one_of(plain, braced.map(lambda s: "\\boxed{" + s + "}")), max_size=3).map("".join),
    observation=braced,
    first=st.none() | braced,
    last=braced,
    mid=plain,
    post=plain,
    unclosed=st.none() | plain.map(lambda s: s.replace("}", "")),
)
@scaled(1.0)
def test_extract_boxed_returns_the_last_complete_box_after_think(head, observation, first, last, mid, post, unclosed):
    """Boxes in the reasoning or in a search result never count; the last complete box after ``</think>`` does
    (nested braces balanced); a trailing unclosed box does not."""
    text = head + OBS_OPEN + "\\boxed{" + observation + "}" + OBS_CLOSE + THINK_CLOSE
    if first is not None:
        text += "\\boxed{" + first + "}" + mid
    text += "\\boxed{" + last + "}" + post
    assert extract_boxed(text) == last.strip()
    if unclosed is not None:
        assert extract_boxed(text + "\\boxed{" + unclosed) == last.strip()
    only_first = head + THINK_CLOSE + ("" if first is None else "\\boxed{" + first + "}") + mid
    assert extract_boxed(only_first) == (None if first is None else first.strip())


@given(st.text(max_size=40) | st.text(string.printable, max_size=40))
@scaled(2.0)
def test_normalise_is_idempotent_and_canonical(text):
    once = normalise_answer(text)
    assert normalise_answer(once) == once
    assert once == " ".join(once.split())  # single spaces, none at the ends
    assert not set(once) & set(string.punctuation)
    assert not {"a", "an", "the"} & set(once.split())
    assert exact_match(text, once)


_word = st.text(string.ascii_letters + string.digits, min_size=1, max_size=8)


@st.composite
def surface_variant(draw):
    """Gold words, and a prediction that differs only in case, punctuation, articles and whitespace."""
    words = draw(st.lists(_word, min_size=1, max_size=6))
    out = []
    for w in words:
        if draw(st.booleans()):
            out.append(draw(st.sampled_from(["a", "an", "the", "The", "A", "AN"])))
        w = "".join(c.upper() if draw(st.booleans()) else c.lower() for c in w)
        cut = draw(st.integers(0, len(w)))
        w = w[:cut] + draw(st.text(string.punctuation, max_size=2)) + w[cut:]  # punctuation inside a word
        out.append(draw(st.text(string.punctuation, max_size=2)) + w + draw(st.text(string.punctuation, max_size=2)))
    seps = draw(st.lists(st.text(" \t\n", min_size=1, max_size=3), min_size=len(out) + 1, max_size=len(out) + 1))
    pred = seps[0] + "".join(w + s for w, s in zip(out, seps[1:]))
    return " ".join(words), pred


@given(surface_variant())
@scaled(1.0)
def test_em_ignores_case_punctuation_articles_and_whitespace(case):
    gold, pred = case
    assert exact_match(pred, gold) and exact_match(gold, pred)
    if normalise_answer(gold):
        assert f1(pred, gold) == 1.0 and cover_exact_match(pred, gold)
        assert score(pred, ["something else", gold]).em == 1.0


_answers = st.one_of(
    st.lists(st.sampled_from(["yes", "no", "noanswer", "the", "Paris", "paris", "city", "of", "a", "1990", "."])).map(
        " ".join
    ),
    st.text(string.printable, max_size=30),
    st.text(max_size=20),
)


@given(_answers, _answers)
@scaled(2.0)
def test_f1_is_bounded_symmetric_and_agrees_with_em(pred, gold):
    value, precision, recall = f1_precision_recall(pred, gold)
    assert 0.0 <= value <= 1.0 and 0.0 <= precision <= 1.0 and 0.0 <= recall <= 1.0
    assert math.isclose(value, f1(gold, pred), rel_tol=1e-12)
    swapped = f1_precision_recall(gold, pred)
    assert math.isclose(precision, swapped[2], rel_tol=1e-12) and math.isclose(recall, swapped[1], rel_tol=1e-12)
    assert exact_match(pred, gold) == exact_match(gold, pred)
    if normalise_answer(gold):  # both empty after normalisation: EM 1 but F1 0, as in the official scorer
        assert f1(gold, gold) == 1.0
        if exact_match(pred, gold):
            assert value == 1.0 and cover_exact_match(pred, gold)
    if value == 1.0:
        assert sorted(normalise_answer(pred).split()) == sorted(normalise_answer(gold).split())


@given(st.none() | _answers, st.lists(_answers, max_size=4), st.randoms())
@scaled(0.5)
def test_score_is_the_best_over_golds_and_order_free(pred, golds, rnd):
    s = score(pred, golds)
    shuffled = list(golds)
    rnd.shuffle(shuffled)
    assert score(pred, shuffled) == s
    if pred is None or not golds:
        assert (s.em, s.f1, s.cover_em) == (0.0, 0.0, 0.0)
        return
    assert s.em == max(float(exact_match(pred, g)) for g in golds)
    assert s.f1 == max(f1(pred, g) for g in golds)
    assert s.cover_em == max(float(cover_exact_match(pred, g)) for g in golds)
    if any(exact_match(pred, g) and normalise_answer(g) for g in golds):
        assert s.cover_em == 1.0


# -- loaders ----------------------------------------------------------------------------------------------------

_scalar = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([-1, 2**31, 2**63, 10**30])  # out of range for int32/int64 columns
    | st.floats()
    | st.text(max_size=8)
)
_json = st.recursive(
    _scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_name = st.text(string.ascii_letters + " ", min_size=1, max_size=8).filter(str.strip)


@st.composite
def hotpot_row(draw, official: bool, qid: str) -> dict:
    """A well-formed HotpotQA question: the official layout (lists of pairs) or the Hugging Face one."""
    titles = draw(st.lists(_name, min_size=1, max_size=3, unique=True))
    sentences = [draw(st.lists(st.text(max_size=12), min_size=1, max_size=3)) for _ in titles]
    facts = draw(st.lists(st.integers(0, len(titles) - 1), max_size=3))
    fact_pairs = [(titles[i], draw(st.integers(0, len(sentences[i]) - 1))) for i in facts]
    row = {"question": draw(_name) + "?", "answer": draw(_name), "type": "bridge", "level": "easy"}
    if official:
        row["_id"] = qid
        row["context"] = [[t, s] for t, s in zip(titles, sentences)]
        row["supporting_facts"] = [[t, i] for t, i in fact_pairs]
    else:
        row["id"] = qid
        row["context"] = {"title": titles, "sentences": sentences}
        row["supporting_facts"] = {"title": [t for t, _ in fact_pairs], "sent_id": [i for _, i in fact_pairs]}
    return row


@st.composite
def verl_row(draw, qid: str) -> dict:
    truth = draw(st.one_of(_name, st.lists(_name, min_size=1, max_size=3)))
    content = "Answer the question below.\n\n" + draw(_name) + "?"
    return {"id": qid, "prompt": [{"role": "user", "content": content}], "reward_model": {"ground_truth": truth}}


def _paths(value, path=()):
    """Every place inside a JSON value (as a key/index path), the value itself first."""
    yield path
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from _paths(child, (*path, key))


def _at(value, path):
    for key in path:
        value = value[key]
    return value


@st.composite
def mutated(draw, row: dict):
    """``(row, clean)``: the row unchanged, or broken by one to three edits: a value anywhere replaced by any JSON
    value (usually a leaf), a key dropped or added; or the whole row not an object."""
    row = json.loads(json.dumps(row))
    edits = draw(st.sampled_from([0, 0, 1, 1, 2, 3, -1]))
    if edits == 0:
        return row, True
    if edits < 0:
        return draw(_scalar | st.lists(_json, max_size=3)), False
    for _ in range(edits):
        if not isinstance(row, dict):
            break
        how = draw(st.sampled_from(["leaf", "leaf", "replace", "drop", "add"]))
        if how == "add":
            row[draw(st.sampled_from(["split", "_id", "extra_info", "type", "level", "reward_model"]))] = draw(_json)
            continue
        places = [p for p in _paths(row) if p and (how == "replace" or isinstance(p[-1], str))]
        if how == "leaf":
            places = [p for p in places if not isinstance(_at(row, p), (dict, list))]
        if not places:
            break
        *parent_path, key = draw(st.sampled_from(places))
        parent = _at(row, parent_path)
        if how == "drop":
            del parent[key]
        else:
            parent[key] = draw(_scalar | _json)
    return row, False


@st.composite
def source_file(draw, tmp_dir, name: str):
    """A generated input file: ``(spec, [(row, clean)], expected)`` where ``expected`` lists, in file order, each
    record a loader must yield: ``(source_row, raw row or junk line, clean)``."""
    layout = draw(st.sampled_from(["hotpotqa_json", "hf", "verl"]))
    n = draw(st.integers(0, 8))
    rows = []
    for i in range(n):
        qid = draw(st.sampled_from([f"{name}-{i}", "shared-id"]))  # ids sometimes collide across rows and files
        base = verl_row(qid) if layout == "verl" else hotpot_row(layout == "hotpotqa_json", qid)
        rows.append(draw(mutated(draw(base))))
    if layout == "hotpotqa_json":
        path = tmp_dir / f"{name}.json"
        path.write_text(json.dumps([r for r, _ in rows]))
        return SourceSpec(str(path)), rows, [(i, r, c) for i, (r, c) in enumerate(rows)]
    path = tmp_dir / f"{name}.jsonl"
    lines, expected, lineno = [], [], 0
    for r, clean in rows:
        for junk in draw(
            st.lists(st.sampled_from([b"\n", b"  \n", b"{not json\n", b"\xff\xfe\n", b"[1, 2\n"]), max_size=1)
        ):
            lineno += 1
            lines.append(junk)
            if junk.strip():
                expected.append((lineno, junk, False))
        lineno += 1
        lines.append(json.dumps(r).encode() + b"\n")
        expected.append((lineno, r, clean))
    path.write_bytes(b"".join(lines))
    return SourceSpec(str(path), layout="verl" if layout == "verl" else "auto"), rows, expected


def _check_items(items, expected, spec):
    assert len(items) == len(expected) == count_records(spec)
    for item, (row_no, raw, clean) in zip(items, expected):
        assert (item.source_row if isinstance(item, Rejected) else item["source_row"]) == row_no
        if isinstance(item, Rejected):
            assert not clean, f"a well-formed row was rejected: {item.reason}"
            assert item.reason.strip() and isinstance(item.raw, str)
        else:
            assert item["id"] == str(raw.get("_id", raw.get("id"))).strip()
            assert item["answer"] in item["answers"]
            assert all(f["sent_id"] >= 0 for f in item["supporting_facts"])  # a sentence index


@given(st.data())
@scaled(0.4, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_loaders_quarantine_every_bad_row_and_reconcile(tmp_path_factory, data):
    """Every row of a generated file (clean or broken, any layout, with junk lines) is loaded or quarantined with
    a reason, in file order; clean rows are always loaded; loaded rows fit the question schema; over several
    files with colliding ids, rows in = loaded + rejected and loaded ids are unique."""
    tmp = tmp_path_factory.mktemp("src")
    files = [data.draw(source_file(tmp, f"f{k}")) for k in range(data.draw(st.integers(1, 3)))]
    for spec, _, expected in files:
        _check_items(list(load_source(spec)), expected, spec)
    rows, rejected = load_sources([spec for spec, _, _ in files])
    assert len(rows) + len(rejected) == sum(len(expected) for _, _, expected in files)
    assert len({r["id"] for r in rows}) == len(rows)
    questions_table(rows)  # the normalised schema holds for every loaded row
    rejected_table(rejected)


# -- the rollout's spans and masks ------------------------------------------------------------------------------

# policy text: short and mostly ASCII (a unicode character costs several tokens), so that turns fit their budget
_policy_text = st.text(st.sampled_from(list(string.ascii_letters * 8 + " .,?'-" * 8 + _chars)), max_size=16).filter(
    lambda s: _no_tags(s) and "\\boxed" not in s
)
_action = _policy_text.map(lambda q: f" <begin_search> x{q} {ACTION_CLOSE} junk")
_turn_piece = st.sampled_from(
    [
        _policy_text.map(lambda s: s + " "),
        _action,
        _action,
        _action,
        _policy_text.map(lambda a: f" {THINK_CLOSE} \\boxed{{{a}}}"),
        st.sampled_from([ACTION_CLOSE, OBS_CLOSE, "}", "{", " <begin_", "search> ", THINK_CLOSE, "\\boxed{"]),
    ]
).flatmap(lambda piece: piece)
# one engine call: (text, whether EOS follows it)
_turns = st.lists(st.tuples(st.lists(_turn_piece, min_size=1, max_size=4).map("".join), st.booleans()), max_size=14)


class DrawnPolicy:
    """A fake engine replaying drawn texts, one per call, for each task (found by its prompt); an exhausted
    script ends with EOS. Records every call's prompt ids and the ids it returned."""

    name = "drawn"

    def __init__(self, tok, prompts: dict[str, list[int]], scripts: dict[str, list]):
        self.tokenizer, self.prompts, self.scripts = tok, prompts, {k: list(v) for k, v in scripts.items()}
        self.eos_ids = {tok.eos_token_id}
        self.calls: dict[str, list[tuple[list[int], list[int]]]] = {k: [] for k in prompts}

    def generate(self, requests):
        out = []
        for r in requests:
            (task,) = [k for k, p in self.prompts.items() if r.prompt_ids[: len(p)] == p]
            text, eos = self.scripts[task].pop(0) if self.scripts[task] else ("", True)
            ids = self.tokenizer.encode(text, add_special_tokens=False) + ([self.tokenizer.eos_token_id] if eos else [])
            res = cut_at_stop(ids, self.tokenizer.decode, r.stop, self.eos_ids, r.max_new_tokens)
            self.calls[task].append((list(r.prompt_ids), list(res.token_ids)))
            out.append(res)
        return out


@pytest.fixture(scope="module")
def tok(request):
    """SmolLM2's tokenizer, read from the embedded GGUF (the ``embedded_tokenizer`` fixture converts the whole model
    first: 20-60 s on a busy machine) and kept in pytest's cache, since parsing the GGUF's vocabulary alone takes
    8-25 s; a cached copy loads in about a second."""
    from transformers import AutoTokenizer

    from agent.models import embedded_gguf_path
    from qadata.io import atomic_directory

    gguf = embedded_gguf_path()
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    if cache is None:
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    saved = cache.mkdir("autocoa") / f"tokenizer-{gguf.stem}-{gguf.stat().st_size}"
    if not (saved / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        with atomic_directory(saved) as tmp:
            tokenizer.save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(str(saved))


@given(
    data=st.data(),
    n_tasks=st.integers(1, 2),
    max_actions=st.integers(0, 4),
    extra_context=st.integers(0, 600),
    max_turn_tokens=st.sampled_from([1, 4, 16, 32, 64, 200]),
    answer_tokens=st.integers(1, 12),
    mode=st.sampled_from(["real", "real", "real", "simulated", "no_tools", "cut_actions"]),
    after_last_action=st.sampled_from(["force", "refuse"]),
    force_answer=st.booleans(),
    bodies=st.lists(
        st.integers(0, 150).map(lambda n: "lorem ipsum " * n) | st.text(_chars, max_size=60), min_size=1, max_size=3
    ),
)
@scaled(0.4, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_rollout_spans_and_masks(
    tok,
    data,
    n_tasks,
    max_actions,
    extra_context,
    max_turn_tokens,
    answer_tokens,
    mode,
    after_last_action,
    force_answer,
    bodies,
):
    """A rollout over a fake policy whose every turn is drawn (reasoning, actions, answers, stray tags, EOS or not)
    and a fake search: the mask is 1 exactly on the ids the engine returned, in place; observations are masked and
    token-exact; spans are ordered and disjoint; the T, context and forced-answer budgets hold."""
    prompts = {
        f"q{i}": tok.encode(
            f"<|im_start|>user\nQuestion {i}?<|im_end|>\n<|im_start|>assistant\n<think>", add_special_tokens=False
        )
        for i in range(n_tasks)
    }
    scripts = {k: data.draw(_turns, label=f"script {k}") for k in prompts}
    reserve = len(tok.encode(FORCE_ANSWER, add_special_tokens=False)) + answer_tokens
    cfg = RolloutConfig(
        max_actions=max_actions,
        max_context=max(len(p) for p in prompts.values()) + reserve + extra_context,
        max_turn_tokens=max_turn_tokens,
        answer_tokens=answer_tokens,
        simulated=mode == "simulated",
        tools=mode in ("real", "simulated"),
        cut_actions=mode == "cut_actions",
        after_last_action=after_last_action,
        force_answer=force_answer,
    )
    searched: list[tuple[str, str]] = []

    def search(queries):
        out = []
        for q in queries:
            rendered = f'result 1: "Doc"\n{q} {bodies[len(searched) % len(bodies)]}'
            searched.append((q, rendered))
            out.append((rendered, [f"p{len(searched)}"]))
        return out

    policy = DrawnPolicy(tok, prompts, scripts)
    trajs = Rollout(policy, search if mode == "real" else None, cfg).run(list(prompts.items()))

    enc = lambda text: tok.encode(text, add_special_tokens=False)
    special = set(tok.all_special_ids) | {tok.eos_token_id}
    rendered_by_query: dict[str, list[str]] = {}
    for q, rendered in searched:
        rendered_by_query.setdefault(q, []).append(rendered)
    executed_queries = []
    for t in trajs:
        event(f"{mode}, finish_reason {t.finish_reason}")  # --hypothesis-show-statistics: which paths were driven
        for s in t.spans:
            flags = (
                ["refused"] * s.refused + ["truncated"] * s.truncated + [f"closed by {s.closed_by}"] * bool(s.closed_by)
            )
            event(" ".join([s.kind, *flags]))
        ids, mask = t.token_ids, t.policy_mask
        assert t.error == "" and t.finish_reason != "error"
        assert len(mask) == len(ids) <= cfg.max_context
        assert ids[: t.prompt_len] == prompts[t.task_id] and set(mask[: t.prompt_len]) <= {0}

        # the policy's tokens: exactly the ids the engine returned, in place (only trailing EOS dropped, or a
        # cut action's tail), and the mask is 1 on them and nowhere else
        want = [0] * len(ids)
        for prompt_ids, out_ids in policy.calls[t.task_id]:
            n = len(prompt_ids)
            assert ids[:n] == prompt_ids  # each call continued the trajectory's exact ids
            k = 0
            while k < len(out_ids) and n + k < len(ids) and ids[n + k] == out_ids[k]:
                want[n + k] = 1
                k += 1
            dropped = out_ids[k:]
            assert set(dropped) <= special or (t.finish_reason == "action_cut" and ACTION_OPEN in tok.decode(dropped))
        assert mask == want
        assert sum(mask) == t.generated_tokens

        # spans: ordered, disjoint, inside the completion; the T budget holds
        assert all(t.prompt_len <= s.start <= s.end <= len(ids) for s in t.spans)
        assert all(a.end <= b.start for a, b in zip(t.spans, t.spans[1:]))
        assert t.n_actions <= cfg.max_actions
        if not cfg.tools:
            assert not [s for s in t.spans if s.kind in ("action", "observation")]
        env = [0] * len(ids)  # positions some span attributes to the environment
        for i, s in enumerate(t.spans):
            got = ids[s.start : s.end]
            if s.kind == "action":
                assert set(mask[s.start : s.end]) == {1} and ACTION_CLOSE in tok.decode(got)
                if not s.refused and not cfg.simulated:
                    executed_queries.append(s.text)
            elif s.kind == "observation" and not s.simulated:
                assert set(mask[s.start : s.end]) == {0}
                assert t.spans[i - 1].kind == "action"
                if s.text == SEARCH_LIMIT:
                    assert t.spans[i - 1].refused
                else:
                    assert s.text in rendered_by_query[t.spans[i - 1].text]
                full = enc(render_observation(s.text))  # token-exact: the environment's encoding, never re-encoded
                if s.truncated:
                    tail = enc(TRUNCATED) + enc(OBS_CLOSE_TEXT)
                    assert got[-len(tail) :] == tail and got[: -len(tail)] == full[: len(got) - len(tail)]
                    assert len(got) - len(tail) < len(full)
                else:
                    assert got == full
                env[s.start : s.end] = [1] * len(got)
            elif s.kind == "observation":  # simulated: the environment opens (and may close), the policy writes
                opener = enc(OBS_OPEN_TEXT)
                assert got[: len(opener)] == opener and set(mask[s.start : s.start + len(opener)]) == {0}
                env[s.start : s.start + len(opener)] = [1] * len(opener)
                body_end = s.end
                if s.closed_by in ("eos", "length"):
                    closer = enc(OBS_CLOSE_TEXT)
                    assert got[-len(closer) :] == closer and set(mask[s.end - len(closer) : s.end]) == {0}
                    env[s.end - len(closer) : s.end] = [1] * len(closer)
                    body_end = s.end - len(closer)
                else:
                    assert s.closed_by == "policy"
                assert set(mask[s.start + len(opener) : body_end]) <= {1}
            else:
                assert s.kind == "forced" and i == len(t.spans) - 1
                assert t.finish_reason in ("forced", "action_cut")
                cue = next(c for c in (enc(FORCE_ANSWER), enc(FORCE_BOX)) if got[: len(c)] == c)
                assert set(mask[s.start : s.start + len(cue)]) == {0} and set(mask[s.start + len(cue) : s.end]) <= {1}
                assert s.end - s.start - len(cue) <= cfg.answer_tokens
                env[s.start : s.start + len(cue)] = [1] * len(cue)
        if t.finish_reason in ("forced", "action_cut"):
            assert t.spans and t.spans[-1].kind == "forced"
        # the forced answer's room (its cue and answer_tokens) was never used by reasoning or observations
        forced_at = t.spans[-1].start if t.spans and t.spans[-1].kind == "forced" else len(ids)
        assert forced_at <= cfg.max_context - reserve
        # every token after the prompt is the policy's or an environment block's
        assert all(m or e for m, e in zip(mask[t.prompt_len :], env[t.prompt_len :]))
        assert t.completion == tok.decode(ids[t.prompt_len :]) and t.answer == extract_boxed(t.completion)
        assert t.search_calls == sum(1 for s in t.spans if s.kind == "observation" and not s.simulated) - sum(
            1 for s in t.spans if s.kind == "observation" and s.text == SEARCH_LIMIT
        )
    assert sorted(executed_queries) == sorted(q for q, _ in searched)
