"""SFT-1: our Trainer computes the paper's loss −logσ(P̄c − P̄r) + α·(−P̄c), P̄ over exactly the policy tokens."""

import math

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny(embedded_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(embedded_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


def _side(tok, segments):
    """A continuation from (kind, text) segments: ids, the 0/1 loss mask the rollout would give, the kinds."""
    ids, mask, kinds = [], [], []
    for kind, text in segments:
        part = tok.encode(text, add_special_tokens=False)
        ids += part
        mask += [1 if kind == "policy" else 0] * len(part)
        kinds += [kind] * len(part)
    return ids, mask, kinds


def _pairs(tok):
    """Two pairs of different lengths: pair 0's chosen has a real search result and the forced answer prompt in
    the middle; pair 1's rejected (a CoA cut at the context budget) ends with its search result."""
    out = []
    for i, (chosen, rejected) in enumerate(
        [
            (
                [
                    ("policy", " <begin_search> Valdren country </end_search>"),
                    (
                        "observation",
                        '\n<search_result>\nresult 1: "Valdren"\nValdren is a town in Norsland.\n</search_result>\n',
                    ),
                    ("policy", " So it is Norsland."),
                    ("forced", "\n</think>\n\nThe final answer is \\boxed{"),
                    ("policy", "Norsland}"),
                ],
                [("policy", " It is in Brivia.</think>\n\n\\boxed{Brivia}")],
            ),
            (
                [("policy", " Valdren is in Norsland.</think>\n\n\\boxed{Norsland}")],
                [
                    ("policy", " <begin_search> Valdren </end_search>"),
                    ("observation", '\n<search_result>\nresult 1: "Brivia"\nBrivia is a country.\n</search_result>\n'),
                ],
            ),
        ]
    ):
        context = tok.encode(
            f"<|im_start|>user\nQ{i}: in which country is Valdren?<|im_end|>\n<|im_start|>assistant\n"
            "<think> I recall the town.",
            add_special_tokens=False,
        )
        c_ids, c_mask, c_kinds = _side(tok, chosen)
        r_ids, r_mask, r_kinds = _side(tok, rejected)
        out.append(
            {
                "pair_id": f"p{i}",
                "context_ids": context,
                "chosen_ids": c_ids,
                "chosen_mask": c_mask,
                "rejected_ids": r_ids,
                "rejected_mask": r_mask,
                "chosen_kinds": c_kinds,
                "rejected_kinds": r_kinds,
            }
        )
    return out


def _by_hand(model, context, ids, kinds):
    """P̄ by hand: one unpadded forward, the mean log-prob of the tokens whose segment kind is "policy"."""
    seq = list(context) + list(ids)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), dim=-1)
    picked = [
        float(logp[len(context) + i - 1, tok]) for i, (tok, kind) in enumerate(zip(ids, kinds)) if kind == "policy"
    ]
    return sum(picked) / len(picked)


def _trainer(model, tok, pairs, tmp_path, alpha):
    from training.sft import TrainSettings, stage1_trainer

    return stage1_trainer(
        model, tok, pairs, TrainSettings(batch_size=len(pairs), max_length=256, alpha=alpha), tmp_path
    )


def _loss(trainer, model, pairs):
    batch = trainer.data_collator(pairs)
    with torch.no_grad():
        loss, out = trainer.compute_loss(model, batch, return_outputs=True)
    return loss, out["logps_chosen"], out["logps_rejected"]


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_trainer_loss_is_the_paper_formula_over_the_policy_tokens(tiny, embedded_tokenizer, tmp_path, alpha):
    pairs = _pairs(embedded_tokenizer)
    assert len(pairs[0]["chosen_ids"]) != len(pairs[1]["chosen_ids"])  # padding is exercised
    assert {"observation", "forced"} <= set(pairs[0]["chosen_kinds"]) and "observation" in pairs[1]["rejected_kinds"]
    trainer = _trainer(tiny, embedded_tokenizer, pairs, tmp_path, alpha)
    loss, pc, pr = _loss(trainer, tiny, pairs)
    want_c = [_by_hand(tiny, p["context_ids"], p["chosen_ids"], p["chosen_kinds"]) for p in pairs]
    want_r = [_by_hand(tiny, p["context_ids"], p["rejected_ids"], p["rejected_kinds"]) for p in pairs]
    assert pc.tolist() == pytest.approx(want_c, abs=1e-5) and pr.tolist() == pytest.approx(want_r, abs=1e-5)
    # the paper's loss per pair, then the mean over pairs (the NLL term too: a per-pair mean, not token-weighted)
    want = sum(-math.log(1 / (1 + math.exp(-(c - r)))) + alpha * -c for c, r in zip(want_c, want_r)) / len(pairs)
    assert float(loss) == pytest.approx(want, abs=1e-5)


def test_observation_ids_are_not_in_the_loss_but_policy_ids_are(tiny, embedded_tokenizer, tmp_path):
    pairs = _pairs(embedded_tokenizer)
    trainer = _trainer(tiny, embedded_tokenizer, pairs, tmp_path, 1.0)
    base, _, _ = _loss(trainer, tiny, pairs)
    vocab = len(embedded_tokenizer)

    def changed(kind):
        p1 = dict(pairs[1])
        p1["rejected_ids"] = [
            (t + 7) % vocab if k == kind else t for t, k in zip(p1["rejected_ids"], p1["rejected_kinds"])
        ]
        return _loss(trainer, tiny, [pairs[0], p1])[0]

    # pair 1's rejected side ends with its search result: other result tokens leave the loss exactly as it was
    assert float(changed("observation")) == pytest.approx(float(base), abs=1e-6)
    assert abs(float(changed("policy")) - float(base)) > 1e-4  # while the policy's own tokens do count
    # the batch's labels hold exactly the policy tokens
    labels = trainer.data_collator(pairs)["labels"]
    policy = sum(k == "policy" for p in pairs for side in ("chosen", "rejected") for k in p[f"{side}_kinds"])
    assert int((labels != -100).sum()) == policy


def test_logged_metrics_are_the_batch_means(tiny, embedded_tokenizer, tmp_path):
    pairs = _pairs(embedded_tokenizer)
    trainer = _trainer(tiny, embedded_tokenizer, pairs, tmp_path, 1.0)
    tiny.train()
    try:
        loss, pc, pr = _loss(trainer, tiny, pairs)
    finally:
        tiny.eval()
    trainer.log({"loss": float(loss)})
    logged = trainer.state.log_history[-1]
    assert logged["logps/chosen"] == pytest.approx(float(pc.mean()), abs=1e-6)  # logged: the collapse signal
    assert logged["logps/rejected"] == pytest.approx(float(pr.mean()), abs=1e-6)
    assert logged["logps/margin"] == pytest.approx(float((pc - pr).mean()), abs=1e-6)
    assert logged["logps/accuracy"] == float((pc > pr).float().mean())


def test_rows_without_ids_or_policy_tokens_are_refused():
    from training.sft import check_stage1_rows

    with pytest.raises(ValueError, match="token ids"):
        check_stage1_rows([{"prompt": "P", "chosen": "c", "rejected": "r"}], 64)
    row = {
        "pair_id": "p",
        "context_ids": [1, 2],
        "chosen_ids": [3, 4],
        "chosen_mask": [1, 0],
        "rejected_ids": [5, 6],
        "rejected_mask": [0, 0],
    }
    with pytest.raises(ValueError, match="p:rejected"):
        check_stage1_rows([row], 64)
    assert check_stage1_rows([{**row, "rejected_mask": [1, 0]}], 64) == {"policy_tokens": 2, "env_tokens_excluded": 2}
