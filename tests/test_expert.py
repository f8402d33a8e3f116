"""The expert demonstrator (agent/expert.py): it answers from the index, never from gold data, through the
real rollout (Algorithm 1), the real BM25 index and the real SmolLM2 tokenizer."""

import collections
import copy
import random

import pytest

from agent import validate
from agent.engine_api import EngineSpec, GenRequest
from agent.engines import load_engine
from agent.expert import EXPERT_MODEL, ExpertEngine, parse_question, split_context
from agent.prompts import TEMPLATES, template_for
from agent.protocol import ACTION_CLOSE, ACTION_OPEN, THINK_CLOSE, parse
from agent.rollout import Rollout, RolloutConfig, search_tool
from agent.synthesis import RunInfo, synthesize
from qadata.answers import score
from qadata.corpus import corpus_from_questions
from qadata.world import (
    BRIDGE,
    COMPARISON,
    HOP3,
    HOP4,
    SINGLE,
    WorldSpec,
    all_paragraphs,
    build_world,
    generate_questions,
)
from retrieval.bm25 import BM25Index
from retrieval.engine import LocalSearchEngine
from training.pairs import mine_pairs

EXPERT_WORLD = WorldSpec(seed=5, countries=8, places=60, people=200, orgs=40, works=200, questions=120)
COA = TEMPLATES["coa-smollm2-fewshot-v1"]
COT = TEMPLATES["cot-smollm2-fewshot-v1"]


@pytest.fixture(scope="module")
def world_index():
    """The world, its questions and a BM25 index over the questions' paragraphs (the pipeline's corpus)."""
    world = build_world(EXPERT_WORLD)
    rows = generate_questions(world)
    contexts = [
        {"context": [{"title": t, "sentences": s} for t, s in zip(r["context"]["title"], r["context"]["sentences"])]}
        for r in rows
    ]
    index = BM25Index.build(corpus_from_questions(contexts)[0], show_progress=False)
    return world, rows, index


def run_expert(tok, index, questions, *, temperature=0.0, tools=True, seed=1, template=None, **engine_kw):
    engine = ExpertEngine(tok, **engine_kw)
    template = template or (COA if tools else COT)
    cfg = RolloutConfig(temperature=temperature, tools=tools, seed=seed, max_context=4096, force_answer=True)
    search = search_tool(LocalSearchEngine(index=index), cfg.search_k) if tools else None
    return Rollout(engine, search, cfg).run([(f"q{i}", template.prompt_ids(tok, q)) for i, q in enumerate(questions)])


def test_expert_never_reads_gold_data(embedded_tokenizer, world_index):
    """Gold answers changed after indexing (in the rows and in the world's tables) do not move the expert:
    it answers what the index says; an index whose text says otherwise moves it."""
    world, rows, index = world_index
    picked = [r for hops in (1, 2, 3, 4) for r in [x for x in rows if x["hops"] == hops][:6]]
    truth = {r["question"]: r["answer"] for r in picked}
    # after indexing: every gold answer and every fact of the world's tables is falsified
    tampered_rows = copy.deepcopy(picked)
    for r in tampered_rows:
        r["answer"] = "Tampered"
        r["supporting_facts"] = {"title": [], "sent_id": []}
    for e in world.entities.values():
        for key in (
            "birth_city",
            "country",
            "capital",
            "headquarters",
            "creator",
            "founder",
            "employer",
            "publisher",
            "occupation",
            "nationality",
        ):
            if key in e.attrs:
                e.attrs[key] = "Tampered"
    trajs = run_expert(embedded_tokenizer, index, [r["question"] for r in tampered_rows])
    for r, t in zip(tampered_rows, trajs):
        assert t.answer == truth[r["question"]], (r["question"], t.answer, t.queries)
        assert t.answer != "Tampered"

    # the other direction: a paragraph rewritten before indexing is what the expert reports
    world2 = build_world(EXPERT_WORLD)
    person = world2.by_kind["person"][0]
    paragraphs = all_paragraphs(world2)
    corpus = []
    for i, p in enumerate(paragraphs):
        text = " ".join(s.strip() for s in p["sentences"])
        if p["title"] == person.name:
            text = text.replace(f"city of {person.attrs['birth_city']}.", "city of Zorvanel.")
        corpus.append({"id": str(i), "contents": f"{p['title']}\n{text}"})
    doctored = BM25Index.build(corpus, show_progress=False)
    [t] = run_expert(embedded_tokenizer, doctored, [f"In which city was {person.name} born?"])
    assert t.answer == "Zorvanel" and t.queries == [person.name]


@pytest.mark.parametrize("template", SINGLE + BRIDGE + COMPARISON + HOP3 + HOP4, ids=lambda f: f.__name__)
def test_expert_solves_every_template_by_entity_name_search(embedded_tokenizer, template):
    """At T = 0 every question template is answered from the index, one entity-name search per hop."""
    world = build_world(EXPERT_WORLD)
    paragraphs = all_paragraphs(world)
    index = BM25Index.build(
        [{"id": str(i), "contents": f"{p['title']}\n{''.join(p['sentences'])}"} for i, p in enumerate(paragraphs)],
        show_progress=False,
    )
    rng, made = random.Random(3), []
    while len(made) < 4:
        m = template(world, rng)
        if m is not None:
            made.append(m)
    trajs = run_expert(embedded_tokenizer, index, [q for q, *_ in made])
    for (question, answer, facts, _), t in zip(made, trajs):
        assert parse_question(question) is not None
        assert t.answer == answer, (question, t.completion)
        hops = len(dict.fromkeys(title for title, _ in facts))
        assert t.n_actions == hops and t.finish_reason == "eos"
        assert t.queries[0] in question  # the first query is an entity the question names


def test_expert_trajectories_are_token_exact_short_and_explicit(embedded_tokenizer, world_index):
    """Rows from the expert pass the trajectory invariants; the last sentence before </think> names the answer."""
    _, rows, index = world_index
    tok = embedded_tokenizer
    questions = [r for r in rows if r["split"] == "train"][::3]  # every hop count
    engine = ExpertEngine(tok)
    cfg = RolloutConfig(temperature=0.0, seed=0, max_turn_tokens=256, force_answer=True)
    info = RunInfo("coa", "r000", "s00", "embedded", engine.name, engine.model_name, COA, 0, 1)
    table, _ = synthesize(
        [r | {"answers": [r["answer"]]} for r in questions],
        engine=engine,
        search=search_tool(LocalSearchEngine(index=index), 3),
        info=info,
        config=cfg,
    )
    out = table.to_pylist()
    for check in (validate.tags_unbalanced, validate.actions_without_observation, validate.mask_misaligned):
        n, problems = check(out)
        assert n and not problems, problems[:3]
    assert {r["engine"] for r in out} == {"expert"} and {r["model"] for r in out} == {EXPERT_MODEL}
    assert all(r["em"] == 1.0 for r in out)
    for r in out:
        assert r["token_ids"][-1] == tok.eos_token_id
        body = r["text"].split(THINK_CLOSE)[0]
        assert body.rstrip().endswith(f"So the answer is {r['predicted_answer']}.")
        assert r["n_actions"] == len(r["queries"]) >= 1
    two_hop = [r["total_tokens"] - r["prompt_tokens"] for r, q in zip(out, questions) if q["hops"] == 2]
    assert two_hop and max(two_hop) < 700  # short: ~120 written + ~330 observation tokens for 2 hops


def test_expert_temperature_errs_sometimes_and_is_seeded(embedded_tokenizer, world_index):
    """T = 0 is exact and seed-independent; at T > 0 some trajectories are wrong, phrasings vary, and a
    seed reproduces them."""
    _, rows, index = world_index
    qs = [r["question"] for r in rows[::2]]
    gold = [r["answer"] for r in rows[::2]]
    cold = [t.completion for t in run_expert(embedded_tokenizer, index, qs, seed=1)]
    assert cold == [t.completion for t in run_expert(embedded_tokenizer, index, qs, seed=2)]
    hot = run_expert(embedded_tokenizer, index, qs, temperature=1.0, seed=1)
    assert [t.completion for t in hot] == [
        t.completion for t in run_expert(embedded_tokenizer, index, qs, temperature=1.0, seed=1)
    ]
    correct = sum(score(t.answer, [g]).em for t, g in zip(hot, gold))
    assert 0.4 * len(qs) < correct < 0.98 * len(qs)
    firsts = collections.Counter(t.completion.split(".")[0].split()[0] for t in hot)
    assert len(firsts) >= 3  # several phrasings of the first step


def test_expert_without_tool_guesses(embedded_tokenizer, world_index):
    """CoT: no action, a committed guess; right only by chance (yes/no and two-way comparisons)."""
    _, rows, _ = world_index
    trajs = run_expert(embedded_tokenizer, None, [r["question"] for r in rows], tools=False, temperature=0.6)
    by_kind = collections.defaultdict(list)
    for r, t in zip(rows, trajs):
        assert ACTION_OPEN not in t.completion and t.n_actions == 0 and t.answer
        by_kind[r["type"] == "comparison"].append(score(t.answer, [r["answer"]]).em)
    assert sum(by_kind[False]) <= 0.05 * len(by_kind[False])  # invented facts cannot be recalled
    assert 0.2 < sum(by_kind[True]) / len(by_kind[True]) < 0.8  # a coin flip on two-way questions


def test_expert_continues_any_context(embedded_tokenizer):
    """Forced answers, contexts that opened an action, simulated results and max_new_tokens, as engines do."""
    tok = embedded_tokenizer
    engine = ExpertEngine(tok)
    q = "In which city was Dora Velk born?"
    base = COA.render(tok, q)
    assert split_context(base) == (q, "<think>")
    ask = lambda text, stop, n=64: engine.generate(
        [GenRequest(tok.encode(text, add_special_tokens=False), n, stop, temperature=0.0)]
    )[0]
    res = ask(base, (ACTION_CLOSE,))
    assert res.finish_reason == "stop" and res.text.endswith(f"{ACTION_OPEN} Dora Velk {ACTION_CLOSE}")
    res = ask(base + "Some reasoning. " + ACTION_OPEN, (ACTION_CLOSE,))
    assert res.text == f" Dora Velk {ACTION_CLOSE}"
    res = ask(base + f"{THINK_CLOSE}\n\nThe final answer is \\boxed{{", ("}",))
    assert res.finish_reason == "stop" and res.text.endswith("}") and len(res.text) > 1
    res = ask(base + f" {ACTION_OPEN} Dora Velk {ACTION_CLOSE}\n<search_result>\n", ("</search_result>",))
    assert res.finish_reason == "stop" and res.text.endswith("</search_result>")
    res = ask(base, (ACTION_CLOSE,), n=3)
    assert res.finish_reason == "length" and len(res.token_ids) == 3
    res = ask(base, ())  # tools off: reasoning and a guess, closed with EOS
    assert res.finish_reason == "eos" and parse(res.text, think_open=True).answer is not None
    # a zero-shot template and the R1 layout ("Question: ..." inside the user turn) parse the same way
    assert split_context(TEMPLATES["coa-r1-v1"].render(tok, q))[0] == q


def test_expert_engine_kind_loads_with_the_model_tokenizer(embedded_checkpoint, tmp_path):
    engine = load_engine(EngineSpec(kind="expert", model=str(embedded_checkpoint)), tmp_path)
    assert isinstance(engine, ExpertEngine) and engine.name == "expert" and engine.model_name == EXPERT_MODEL
    assert template_for("coa", engine.model_name).family == "smollm2"  # the student's prompts


def test_expert_yields_contrastive_pairs_of_both_kinds(embedded_tokenizer, world_index):
    """Wrong CoT rows give (a) pairs (an action inserted), wrong CoA comparisons (b) pairs (the action removed)."""
    _, rows, index = world_index
    tok = embedded_tokenizer
    engine = ExpertEngine(tok)
    search = search_tool(LocalSearchEngine(index=index), 3)
    train = [r | {"answers": [r["answer"]]} for r in rows if r["split"] == "train"]
    tables = {}
    for pool, qs, tools in (("cot", train[:20], False), ("coa", [r for r in train if r["type"] == "comparison"], True)):
        cfg = RolloutConfig(temperature=1.0, tools=tools, seed=3, force_answer=True)
        info = RunInfo(pool, "r000", "s00", "embedded", engine.name, engine.model_name, COA if tools else COT, 3, 1)
        tables[pool] = synthesize(qs, engine=engine, search=search if tools else None, info=info, config=cfg)[0]
    cfg = RolloutConfig(max_actions=5, temperature=0.6, seed=0)
    pairs, discarded = mine_pairs(
        tables["cot"].to_pylist(),
        tables["coa"].to_pylist(),
        engine=engine,
        search=search,
        coa_prompt_ids=lambda q: COA.prompt_ids(tok, q),
        config=cfg,
        attempts=4,
    )
    kinds = collections.Counter(p.kind for p in pairs)
    assert kinds["a"] >= 10 and kinds["b"] >= 1, (kinds, collections.Counter(d.reason for d in discarded))
    for p in pairs:
        assert p.chosen_correct and p.chosen_has_action == (p.kind == "a")


def test_expert_rates_are_configurable(embedded_tokenizer, world_index):
    _, rows, index = world_index
    picked = rows[::4]
    exact = run_expert(
        embedded_tokenizer, index, [r["question"] for r in picked], temperature=1.0, misread_rate=0.0, skip_rate=0.0
    )
    assert all(t.answer == r["answer"] for t, r in zip(exact, picked))
