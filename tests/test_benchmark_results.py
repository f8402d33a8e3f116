"""benchmarks/RESULTS.md holds one section per benchmark; writing one must leave the others intact
(an SFT run once overwrote the rollout section because the writer used the rollout markers)."""

import pytest

from benchmarks.rollout import write_section


def test_write_section_replaces_only_its_own_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(
        "# Benchmarks\n\n<!-- rollout:begin -->\nrollout numbers\n<!-- rollout:end -->\n\n"
        "<!-- sft:begin -->\nold sft\n<!-- sft:end -->\n"
    )
    write_section(path, "<!-- sft:begin -->\nnew sft\n<!-- sft:end -->")
    write_section(path, "<!-- evaluation:begin -->\neval numbers\n<!-- evaluation:end -->")
    write_section(path, "<!-- sft:begin -->\nnewer sft\n<!-- sft:end -->")
    text = path.read_text()
    assert "rollout numbers" in text and "eval numbers" in text and "newer sft" in text
    assert "old sft" not in text and "new sft\n" not in text and text.count("<!-- sft:begin -->") == 1
    assert text.index("rollout numbers") < text.index("newer sft") < text.index("eval numbers")  # stays in place
    with pytest.raises(ValueError, match="must start with"):
        write_section(path, "## no markers")


def test_model_flops_per_token_matches_the_parameter_count():
    from types import SimpleNamespace

    from benchmarks.roofline import fraction_of_limit, model_flops_per_token

    # SmolLM2-135M's shape: 30 layers, hidden 576, MLP 1536, 9 heads / 3 KV heads, vocabulary 49,152
    cfg = SimpleNamespace(
        hidden_size=576,
        num_hidden_layers=30,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
    )
    non_embedding = 30 * (576 * 576 * 2 + 2 * 576 * 3 * 64 + 3 * 576 * 1536)
    assert 105e6 < non_embedding < 107e6  # the model card's 135M minus the 28M tied embedding
    fwd = model_flops_per_token(cfg, training=False, context=0)
    assert fwd == 2 * non_embedding + 2 * 576 * 49152  # 2 x parameters (head included), no attention at context 0
    assert model_flops_per_token(cfg, training=True, context=0) == 3 * fwd  # ~6 x parameters
    assert model_flops_per_token(cfg, training=True, context=0, trainable_fraction=1 / 3) == pytest.approx(fwd * 5 / 3)
    assert model_flops_per_token(cfg, training=False, context=512) > fwd  # attention grows with the context
    assert fraction_of_limit(100.0, 1e9, 200.0) == 0.5
