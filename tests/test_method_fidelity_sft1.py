"""Method fidelity, issue 12 items 2 and 10: SFT-1 is token-exact over the policy's own tokens, and the pair
set is capped at a budget with a kind balance."""

import math
import random
from pathlib import Path

import pytest
import yaml

from agent.engines import cut_at_stop
from agent.rollout import FORCE_ANSWER, RolloutConfig
from training.pairs import Pair, budget_pairs, mine_pairs
from training.sft_data import stage1_rows

torch = pytest.importorskip("torch")

SFT1_PROMPT = "<|im_start|>user\nIn which country is Valdren?<|im_end|>\n<|im_start|>assistant\n<think>"


class _Sft1Scripted:
    """A scripted policy: searches when an action was opened, answers Norsland after a result or when told to
    reason alone, and opens an action anyway (cut, then the answer is forced) when ``searches_anyway``."""

    name = "scripted"

    def __init__(self, tokenizer, searches_anyway=False):
        self.tokenizer, self.searches_anyway = tokenizer, searches_anyway

    def generate(self, requests):
        out = []
        for r in requests:
            so_far = self.tokenizer.decode(r.prompt_ids)
            if so_far.rstrip().endswith("<begin_search>"):
                text = " Valdren country </end_search>"
            elif so_far.endswith("\\boxed{"):
                text = "Norsland}"
            elif self.searches_anyway and "<search_result>" not in so_far:
                text = " Let me check. <begin_search> Valdren </end_search>"
            else:
                text = " So it is Norsland.</think>\n\n\\boxed{Norsland}"
            ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]
            out.append(cut_at_stop(ids, self.tokenizer.decode, r.stop, {self.tokenizer.eos_token_id}, r.max_new_tokens))
        return out


def _sft1_row(tok, kind, completion):
    """A wrong trajectory as the synthesis tables store it: ids, policy_mask (0 on the search result), spans."""
    prompt = tok.encode(SFT1_PROMPT, add_special_tokens=False)
    comp = tok.encode(completion, add_special_tokens=False)

    def token_at(char):
        return next(n for n in range(len(comp)) if len(tok.decode(comp[: n + 1])) > char)

    spans, mask = [], [0] * len(prompt) + [1] * len(comp)
    if "<begin_search>" in completion:
        a = token_at(completion.index("<begin_search>"))
        spans.append({"kind": "action", "start": len(prompt) + a, "end": len(prompt) + a + 5})
    if "<search_result>" in completion:
        a = token_at(completion.index("<search_result>"))
        b = token_at(completion.index("</search_result>") + len("</search_result>") - 1) + 1
        spans.append({"kind": "observation", "start": len(prompt) + a, "end": len(prompt) + b})
        mask[len(prompt) + a: len(prompt) + b] = [0] * (b - a)
    return {"trajectory_id": f"r/{kind}/q1/0", "question_id": "q1", "question": "In which country is Valdren?",
            "gold_answers": ["Norsland"], "token_ids": prompt + comp, "policy_mask": mask, "prompt_tokens": len(prompt),
            "em": 0.0, "spans": spans}


def _sft1_search(queries):
    return [('result 1: "Valdren"\nValdren is a town in Norsland.', ["p2"]) for _ in queries]


@pytest.fixture(scope="module")
def sft1_mined(embedded_tokenizer):
    """One (a) pair whose chosen side holds a real search result and one (b) pair whose chosen side holds the
    forced answer prompt and whose rejected side (the CoA's own continuation) holds a real search result."""
    tok = embedded_tokenizer
    cot = _sft1_row(tok, "cot", " Valdren is a town. It is in Brivia.</think>\n\n\\boxed{Brivia}")
    coa = _sft1_row(tok, "coa", " I need it. <begin_search> Valdren </end_search>\n<search_result>\nValdren is in "
                                "Brivia.\n</search_result>\n It is Brivia.</think>\n\n\\boxed{Brivia}")
    cfg = RolloutConfig(max_actions=2, max_context=400, max_turn_tokens=40, answer_tokens=8)
    prompt_ids = lambda q: tok.encode(SFT1_PROMPT, add_special_tokens=False)  # noqa: E731
    (a,), _ = mine_pairs([cot], [], engine=_Sft1Scripted(tok), search=_sft1_search, coa_prompt_ids=prompt_ids,
                         config=cfg, attempts=1)
    (b,), _ = mine_pairs([], [coa], engine=_Sft1Scripted(tok, searches_anyway=True), search=_sft1_search,
                         coa_prompt_ids=prompt_ids, config=cfg, attempts=1)
    return a, b, coa


def _environment_positions(tok, ids, observation_spans):
    """Where the environment wrote (found independently of the masks): observation spans and the forced prompt."""
    env = {i for s, e in observation_spans for i in range(s, e)}
    for text in (FORCE_ANSWER, FORCE_ANSWER.split("\n", 2)[-1]):  # with or without the closing </think>
        forced = tok.encode(text, add_special_tokens=False)
        env |= {i + k for i in range(len(ids)) if ids[i: i + len(forced)] == forced for k in range(len(forced))}
    return env


def test_item2_sft1_pair_masks_exclude_search_results_and_forced_text(sft1_mined, embedded_tokenizer):
    tok = embedded_tokenizer
    a, b, coa = sft1_mined
    assert a.chosen_observation_spans and b.rejected_observation_spans
    assert "\\boxed{" in tok.decode(b.chosen_ids) and b.chosen_has_action is False
    for p in (a, b):
        for side in ("chosen", "rejected"):
            ids, mask = getattr(p, f"{side}_ids"), getattr(p, f"{side}_mask")
            env = _environment_positions(tok, ids, getattr(p, f"{side}_observation_spans"))
            assert len(mask) == len(ids)
            assert [i for i, m in enumerate(mask) if not m] == sorted(env), (p.kind, side, tok.decode(ids))
    assert any(not m for m in b.chosen_mask)  # the forced prompt is there, and masked
    # the inserted <begin_search> is the chosen decision itself: in the loss
    action = tok.encode(" <begin_search>", add_special_tokens=False)
    assert a.chosen_ids[: len(action)] == action and a.chosen_mask[: len(action)] == [1] * len(action)
    # rejected (b): the source CoA's own policy_mask, sliced at the juncture
    assert b.rejected_mask == coa["policy_mask"][coa["prompt_tokens"] + len(b.prefix_ids):]


def _as_table_row(p: Pair, tok) -> dict:
    return {"pair_id": p.pair_id, "question_id": p.question_id, "kind": p.kind, "prompt_ids": p.prompt_ids,
            "prefix_ids": p.prefix_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids,
            "chosen_mask": p.chosen_mask, "rejected_mask": p.rejected_mask, "prompt_text": tok.decode(p.prompt_ids),
            "prefix_text": tok.decode(p.prefix_ids), "chosen_text": tok.decode(p.chosen_ids),
            "rejected_text": tok.decode(p.rejected_ids)}


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_item2_sft1_trainer_loss_is_the_paper_formula_over_exactly_the_policy_tokens(sft1_mined, embedded_tokenizer,
                                                                                     tiny_model, tmp_path, alpha):
    from transformers import AutoModelForCausalLM

    from training.sft import TrainSettings, stage1_trainer

    tok = embedded_tokenizer
    mined = sft1_mined[:2]
    rows = stage1_rows([_as_table_row(p, tok) for p in mined], max_length=512)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    trainer = stage1_trainer(model, tok, rows, TrainSettings(batch_size=2, max_length=512, alpha=alpha), tmp_path)
    with torch.no_grad():
        loss, out = trainer.compute_loss(model, trainer.data_collator(rows), return_outputs=True)

    def by_hand(context, ids, env):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([context + ids])).logits[0].double(), dim=-1)
        picked = [float(logp[len(context) + i - 1, t]) for i, t in enumerate(ids) if i not in env]
        return sum(picked) / len(picked)

    want = {}
    for side in ("chosen", "rejected"):
        want[side] = [by_hand(r["context_ids"], r[f"{side}_ids"],
                              _environment_positions(tok, r[f"{side}_ids"], getattr(p, f"{side}_observation_spans")))
                      for r, p in zip(rows, mined)]
    assert out["logps_chosen"].tolist() == pytest.approx(want["chosen"], abs=1e-5)
    assert out["logps_rejected"].tolist() == pytest.approx(want["rejected"], abs=1e-5)
    formula = [-math.log(1 / (1 + math.exp(r - c))) - alpha * c for c, r in zip(want["chosen"], want["rejected"])]
    assert float(loss) == pytest.approx(sum(formula) / len(formula), abs=1e-5)


def test_item2_sft1_trains_on_ids_and_refuses_text_rows(tiny_model, tmp_path):
    from training.sft import TrainSettings, train_stage1

    text_rows = [{"prompt": "Q: where is Valdren?\n<think>", "chosen": " <begin_search> Valdren </end_search>",
                  "rejected": " Brivia.</think> \\boxed{Brivia}"}] * 2
    with pytest.raises(ValueError, match="token ids"):
        train_stage1(tiny_model, text_rows, tmp_path / "s1", TrainSettings(max_steps=1, max_length=64))


def _budget_pairs(n_a, n_b):
    return [Pair(pair_id=f"t{k}{i}#{k}", question_id=f"q{k}{i}", kind=k, juncture_rule="", prompt_ids=[], prefix_ids=[],
                 chosen_ids=[1], rejected_ids=[2], chosen_correct=True, rejected_correct=False)
            for k, n in (("a", n_a), ("b", n_b)) for i in range(n)]


@pytest.mark.parametrize("n_a, n_b, max_pairs, share, kept_a, kept_b", [
    (10, 5, 6, 0.5, 3, 3),
    (10, 5, 6, 0.8, 5, 1),  # round(4.8) = 5 action-chosen
    (2, 10, 6, 0.8, 2, 4),  # too few action-chosen: the think-chosen fill the budget
    (10, 0, 6, 0.5, 6, 0),
    (3, 2, None, 0.8, 3, 2),  # no budget: everything kept
    (3, 2, 100, 0.8, 3, 2),
])
def test_item10_pair_budget_caps_with_the_kind_balance(n_a, n_b, max_pairs, share, kept_a, kept_b):
    pairs = _budget_pairs(n_a, n_b)
    kept, dropped, stats = budget_pairs(pairs, max_pairs, share, seed=0)
    assert [p.kind for p in kept].count("a") == kept_a and [p.kind for p in kept].count("b") == kept_b
    assert stats["kept"] == {"a": kept_a, "b": kept_b} and stats["available"] == {"a": n_a, "b": n_b}
    if max_pairs is not None:
        assert stats["requested"] == {"a": round(max_pairs * share), "b": max_pairs - round(max_pairs * share)}
    # counts reconcile: every mined pair is kept or discarded with the reason
    assert len(kept) + len(dropped) == len(pairs)
    assert {p.question_id for p in kept} | {d.question_id for d in dropped} == {p.question_id for p in pairs}
    assert all(d.reason.startswith("over max_pairs budget (kind balance") for d in dropped)


def test_item10_pair_budget_is_deterministic_and_seeded():
    pairs = _budget_pairs(20, 20)
    kept = {p.pair_id for p in budget_pairs(pairs, 10, 0.8, seed=0)[0]}
    shuffled = list(pairs)
    random.Random(1).shuffle(shuffled)
    assert {p.pair_id for p in budget_pairs(shuffled, 10, 0.8, seed=0)[0]} == kept  # independent of input order
    assert {p.pair_id for p in budget_pairs(pairs, 10, 0.8, seed=1)[0]} != kept  # the seed chooses
    with pytest.raises(ValueError, match="action_chosen_share"):
        budget_pairs(pairs, 10, 1.5)


def test_item10_pair_budget_paper_profile_and_default():
    from assets.pairs import PairsConfig

    default = PairsConfig()
    assert default.max_pairs == 400 and default.action_chosen_share == 0.8
    paper = yaml.safe_load((Path(__file__).parents[1] / "configs" / "paper.yaml").read_text())
    cfg = PairsConfig(**paper["ops"]["contrastive_pairs"]["config"])
    assert cfg.max_pairs == 1500 and 0.5 < cfg.action_chosen_share < 1.0  # the paper: 1,500 pairs, mostly action-chosen
