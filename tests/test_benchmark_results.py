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
