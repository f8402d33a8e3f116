import pytest

from agent.prompts import TEMPLATES, template_for
from agent.protocol import parse


@pytest.mark.parametrize("template_id", sorted(TEMPLATES))
def test_templates_render_and_prefill_think(embedded_tokenizer, template_id):
    t = TEMPLATES[template_id]
    text = t.render(embedded_tokenizer, "Who wrote The Glass Orchard?")
    assert text.endswith(t.prefill) and "Who wrote The Glass Orchard?" in text
    assert t.prompt_ids(embedded_tokenizer, "Q?")  # tokenises


@pytest.mark.parametrize("template_id", sorted(TEMPLATES))
def test_worked_examples_follow_the_protocol(template_id):
    t = TEMPLATES[template_id]
    for _, answer in t.shots:
        p = parse(answer)
        assert p.balanced and p.answer and not p.issues
        assert (len(p.queries) > 0) == (t.mode == "coa")


def test_template_choice_by_model_family():
    assert template_for("coa", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B").id == "coa-r1-v1"
    assert template_for("cot", "SmolLM2-135M-Instruct").id == "cot-smollm2-fewshot-v1"
    assert TEMPLATES["coa-r1-v1"].prefill == "<think>\n"
