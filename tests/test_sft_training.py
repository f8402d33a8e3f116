"""SFT training smoke tests on a tiny random Llama (SmolLM2's tokenizer): parameters change, the loss is
finite, checkpoints reload, and training resumes from a mid-training checkpoint."""

import json

import pytest

torch = pytest.importorskip("torch")


def _rows(tok, n=6):
    rows = []
    for i in range(n):
        prompt = tok.encode(f"Question {i}: where is Valdren?\n<think>", add_special_tokens=False)
        policy = tok.encode(" I search. <begin_search> Valdren </end_search>", add_special_tokens=False)
        obs = tok.encode(
            "\n<search_result>\n" + "Valdren is in Norsland. " * (1 + i % 3) + "\n</search_result>\n",
            add_special_tokens=False,
        )  # rows of three lengths: the length buckets have work to do
        answer = tok.encode(" So Norsland.</think>\n\n\\boxed{Norsland}", add_special_tokens=False)
        ids = prompt + policy + obs + answer
        l2 = [-100] * len(prompt) + policy + [-100] * len(obs) + answer
        l3 = [-100] * len(prompt) + policy + obs + answer
        rows.append({"input_ids": ids, "labels_stage2": l2, "labels_stage3": l3})
    return rows


def _params(path):
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def test_stage2_trains_reloads_and_changes_parameters(tiny_model, embedded_tokenizer, tmp_path):
    from training.sft import TrainSettings, train_trajectory_sft

    out = tmp_path / "ckpt"
    res = train_trajectory_sft(
        tiny_model,
        _rows(embedded_tokenizer),
        "labels_stage2",
        out,
        TrainSettings(max_steps=4, learning_rate=1e-2, batch_size=2, max_length=256),
        stage=2,
    )
    assert res.steps == 4 and len(res.loss_curve) == 4 and all(torch.isfinite(torch.tensor(res.loss_curve)))
    assert res.loss_curve[-1] < res.loss_curve[0]
    # the fixed probe set: the same examples scored before and after training
    assert res.metrics["probe_loss_end"] < res.metrics["probe_loss_start"]
    before, after = _params(tiny_model), _params(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["stage"] == 2 and meta["labels"] == "labels_stage2" and meta["steps"] == 4
    assert meta["probe_loss_end"] == res.metrics["probe_loss_end"]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()


def test_resume_from_a_mid_training_checkpoint(tiny_model, embedded_tokenizer, tmp_path):
    from training.sft import TrainSettings, train_trajectory_sft

    settings = TrainSettings(max_steps=4, learning_rate=1e-2, batch_size=2, max_length=256, save_steps=2)
    first = train_trajectory_sft(
        tiny_model, _rows(embedded_tokenizer), "labels_stage3", tmp_path / "a", settings, stage=3
    )
    mid = tmp_path / "a.work" / "checkpoint-2"
    assert mid.is_dir()
    resumed = train_trajectory_sft(
        tiny_model, _rows(embedded_tokenizer), "labels_stage3", tmp_path / "b", settings, stage=3, resume_from=str(mid)
    )
    assert resumed.steps == 4
    # the curve carries the restored history; steps 3-4 re-run from the checkpoint land where the uninterrupted run did
    assert resumed.loss_curve == pytest.approx(first.loss_curve, rel=1e-4)


def _pairs(tok, n=4):
    """sft_stage1_data rows: the chosen side searches (its result masked out), the rejected side answers wrong."""
    rows = []
    for i in range(n):
        context = tok.encode(f"Q{i}: where is Valdren?\n<think>I need it.", add_special_tokens=False)
        action = tok.encode(" <begin_search> Valdren </end_search>", add_special_tokens=False)
        obs = tok.encode(
            "\n<search_result>\n" + "Valdren is in Norsland. " * (1 + i % 3) + "\n</search_result>\n",
            add_special_tokens=False,
        )  # rows of three lengths: the length buckets have work to do
        answer = tok.encode(" So Norsland.</think> \\boxed{Norsland}", add_special_tokens=False)
        rejected = tok.encode(" It is in Brivia.</think> \\boxed{Brivia}", add_special_tokens=False)
        rows.append(
            {
                "pair_id": f"p{i}",
                "context_ids": context,
                "chosen_ids": action + obs + answer,
                "chosen_mask": [1] * len(action) + [0] * len(obs) + [1] * len(answer),
                "rejected_ids": rejected,
                "rejected_mask": [1] * len(rejected),
            }
        )
    return rows


def test_stage1_trains_on_pairs_and_logs_logps(tiny_model, embedded_tokenizer, tmp_path):
    from training.sft import TrainSettings, train_stage1

    pairs = _pairs(embedded_tokenizer)
    res = train_stage1(
        tiny_model,
        pairs,
        tmp_path / "s1",
        TrainSettings(max_steps=3, learning_rate=1e-2, batch_size=2, max_length=128, alpha=0.5),
    )
    assert res.steps == 3 and len(res.logps_chosen) == 3 and len(res.logps_rejected) == 3
    assert all(torch.isfinite(torch.tensor(res.loss_curve)))
    assert res.metrics["probe_loss_end"] < res.metrics["probe_loss_start"]
    obs = sum(len(p["chosen_mask"]) - sum(p["chosen_mask"]) for p in pairs)
    assert res.metrics["env_tokens_excluded"] == obs > 0
    before, after = _params(tiny_model), _params(tmp_path / "s1")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    meta = json.loads((tmp_path / "s1" / "meta.json").read_text())
    assert meta["settings"]["alpha"] == 0.5 and meta["logps_chosen"] == res.logps_chosen
    assert len(meta["logps_accuracy"]) == 3


def test_stage1_resumes_from_a_mid_training_checkpoint(tiny_model, embedded_tokenizer, tmp_path):
    from training.sft import TrainSettings, train_stage1

    settings = TrainSettings(max_steps=4, learning_rate=1e-2, batch_size=2, max_length=128, save_steps=2)
    first = train_stage1(tiny_model, _pairs(embedded_tokenizer), tmp_path / "a", settings)
    mid = tmp_path / "a.work" / "checkpoint-2"
    assert mid.is_dir()
    resumed = train_stage1(tiny_model, _pairs(embedded_tokenizer), tmp_path / "b", settings, resume_from=str(mid))
    assert resumed.steps == 4 and resumed.loss_curve == pytest.approx(first.loss_curve, rel=1e-4)


class _ForwardOnly:
    """Stands in for DDP: exposes only forward (no .model / .lm_head), so the wrapper's hooks would run."""

    def __init__(self, module):
        self.module = module

    def __call__(self, **kwargs):
        return self.module(**kwargs)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_length_bucket_sampler_is_a_shuffled_permutation_of_similar_length_batches(seed):
    import random

    from training.sft import LengthBucketSampler, padding_share

    rng = random.Random(seed)
    lengths = [rng.choice([120, 300]) + rng.randrange(0, 600) for _ in range(101)]  # CoT-like and CoA-like rows
    s = LengthBucketSampler(lengths, batch_size=8, seed=seed)
    order = list(s)
    assert sorted(order) == list(range(101)) and len(s) == 101  # every row exactly once
    assert order == list(LengthBucketSampler(lengths, 8, seed))  # deterministic for (seed, epoch): resume-safe
    s.set_epoch(1)
    assert list(s) != order and sorted(s) == list(range(101))  # a new order per epoch
    batches = [order[i : i + 8] for i in range(0, 101, 8)]  # how the DataLoader cuts the order
    assert batches == LengthBucketSampler(lengths, 8, seed).batches()
    shuffled = list(range(101))
    rng.shuffle(shuffled)
    uniform = [shuffled[i : i + 8] for i in range(0, 101, 8)]
    assert padding_share(lengths, batches) < 0.5 * padding_share(lengths, uniform)
    firsts = [lengths[b[0]] for b in batches]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)  # batch order is not by length


def test_trajectory_sft_trains_in_length_buckets(tiny_model, embedded_tokenizer, tmp_path):
    from training.sft import TrainSettings, train_trajectory_sft

    rows = _rows(embedded_tokenizer, n=8)
    seen = []
    import training.sft as sft

    real = sft.labelled_positions_loss

    def spy(model, inputs):
        seen.append(inputs["attention_mask"].sum(dim=1).tolist())
        return real(model, inputs)

    sft.labelled_positions_loss = spy
    try:
        train_trajectory_sft(
            tiny_model,
            rows,
            "labels_stage2",
            tmp_path / "c",
            TrainSettings(max_steps=4, learning_rate=1e-3, batch_size=2, max_length=256),
            stage=2,
        )
    finally:
        sft.labelled_positions_loss = real
    lengths = sorted(len(r["input_ids"]) for r in rows)
    pairs = sorted(sorted(b) for b in seen)
    assert pairs == [lengths[i : i + 2] for i in range(0, 8, 2)]  # the batches are the length-sorted pairs


def test_labelled_positions_loss_equals_the_models_loss(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    from training.sft import freeze_below, labelled_positions_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(0)
    ids = torch.randint(0, 500, (2, 24))
    labels = ids.clone()
    labels[:, :8] = -100
    labels[0, 12:18] = -100  # an observation in the middle
    labels[1, 20:] = -100  # padding
    want = model(input_ids=ids, labels=labels).loss
    got = labelled_positions_loss(model, {"input_ids": ids, "labels": labels})
    assert torch.allclose(got, want, atol=1e-5)
    # through a wrapper's own forward (DDP, DeepSpeed, PEFT): logits_to_keep, same loss and same gradient
    wrapped = _ForwardOnly(model)
    assert torch.allclose(labelled_positions_loss(wrapped, {"input_ids": ids, "labels": labels}), want, atol=1e-5)
    from training.losses import mean_logprob, pair_mean_logprobs

    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    full = mean_logprob(model(input_ids=ids).logits, ids, labels)
    for m in (model, wrapped):
        c, r = pair_mean_logprobs(m, batch)
        assert torch.allclose(torch.cat([c, r]), full, atol=1e-5)
    n = freeze_below(model, 1)
    assert n == sum(p.numel() for p in model.model.layers[-1].parameters()) + sum(
        p.numel() for p in model.model.norm.parameters()
    )
    assert not model.get_input_embeddings().weight.requires_grad
