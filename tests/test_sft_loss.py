"""SFT-1: TRL's CPOTrainer (simpo, beta 1, gamma 0, cpo_alpha α) computes the paper's contrastive loss."""

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny(embedded_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(embedded_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg)


def _trainer(model, tokenizer, tmp_path, pairs, alpha):
    from datasets import Dataset
    from trl.experimental.cpo import CPOTrainer

    from training.losses import sft1_trl_config

    args = sft1_trl_config(str(tmp_path), alpha=alpha, per_device_train_batch_size=len(pairs), report_to=[],
                           max_length=128, use_cpu=True)
    return CPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer)


PAIR = {"prompt": "Question: where was Edda Thorne born?\n<think>I need her birthplace.",
        "chosen": " <begin_search> Edda Thorne birthplace </end_search>",
        "rejected": " She was born in Paris.</think> \\boxed{Paris}"}


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_cpo_simpo_equals_the_paper_formula(tiny, embedded_tokenizer, tmp_path, alpha):
    from training.losses import mean_logprob, sft1_loss

    trainer = _trainer(tiny, embedded_tokenizer, tmp_path, [PAIR], alpha)
    batch = next(iter(trainer.get_train_dataloader()))
    tiny.eval()
    with torch.no_grad():
        loss, metrics = trainer.get_batch_loss_metrics(tiny, batch)
        # by hand: an independent forward per side, P̄ = mean log-prob of the continuation tokens
        pc = mean_logprob(tiny(batch["chosen_input_ids"]).logits, batch["chosen_input_ids"], batch["chosen_labels"])
        pr = mean_logprob(tiny(batch["rejected_input_ids"]).logits, batch["rejected_input_ids"], batch["rejected_labels"])
    want = sft1_loss(pc, pr, alpha).mean()
    assert torch.allclose(loss, want, atol=1e-5), (loss.item(), want.item())
    assert metrics["logps/chosen"] == pytest.approx(pc.item(), abs=1e-5)  # logged: the collapse signal
    assert metrics["logps/rejected"] == pytest.approx(pr.item(), abs=1e-5)


def test_settings_that_define_the_loss_cannot_be_overridden(tmp_path):
    from training.losses import sft1_trl_config

    with pytest.raises(ValueError, match="loss_type"):
        sft1_trl_config(str(tmp_path), loss_type="sigmoid")
    cfg = sft1_trl_config(str(tmp_path), alpha=0.3, learning_rate=1e-5)
    assert (cfg.loss_type, cfg.beta, cfg.simpo_gamma, cfg.cpo_alpha) == ("simpo", 1.0, 0.0, 0.3)
