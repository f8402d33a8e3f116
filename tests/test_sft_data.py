"""SFT data helpers: mix selection, stage-1 rows, the sharegpt export (pure functions)."""

import pytest

from training.sft_data import llamafactory_dataset_info, select_mix, sharegpt_record, stage1_rows


def _traj(i, pool, em):
    return {"trajectory_id": f"r/{pool}/q{i}/0", "em": em, "pool": pool}


def test_mix_takes_only_correct_and_reports_shortfall():
    cot = [_traj(i, "cot", float(i % 2)) for i in range(10)]
    coa = [_traj(i, "coa", 1.0) for i in range(3)]
    picked, stats = select_mix(cot, coa, coa=5, cot=2, seed=0)
    assert all(r["em"] == 1.0 for r in picked)
    assert stats == {
        "correct_coa_available": 3,
        "correct_cot_available": 5,
        "coa_requested": 5,
        "cot_requested": 2,
        "coa_selected": 3,
        "cot_selected": 2,
    }
    assert select_mix(cot, coa, coa=5, cot=2, seed=0)[0] == picked  # seeded


def test_stage1_rows_concatenate_context_and_flag_truncation():
    pair = {
        "pair_id": "p",
        "question_id": "q",
        "kind": "a",
        "prompt_ids": [1, 2],
        "prefix_ids": [3],
        "chosen_ids": [4, 5, 6],
        "chosen_mask": [1, 0, 1],
        "rejected_ids": [7],
        "rejected_mask": [1],
        "prompt_text": "P",
        "prefix_text": "x",
        "chosen_text": "c",
        "rejected_text": "r",
    }
    (row,) = stage1_rows([pair], max_length=5)
    assert row["context_ids"] == [1, 2, 3] and row["chosen_ids"] == [4, 5] and row["truncated"]
    assert row["chosen_mask"] == [1, 0] and row["rejected_mask"] == [1]  # masks cut with their ids
    assert row["prompt"] == "Px" and not stage1_rows([pair], max_length=10)[0]["truncated"]
    with pytest.raises(ValueError, match="chosen_mask"):
        stage1_rows([{k: v for k, v in pair.items() if k != "chosen_mask"}], max_length=10)


def test_sharegpt_splits_observations_into_their_own_turns():
    text = (
        'I need X. <begin_search> X </end_search>\n<search_result>\nresult 1: "X"\nX is Y.\n</search_result>\n'
        "So Y.</think>\n\n\\boxed{Y}"
    )
    rec = sharegpt_record({"prompt": "Q?", "text": text})
    roles = [t["from"] for t in rec["conversations"]]
    assert roles == ["human", "gpt", "observation", "gpt"]
    assert "".join(t["value"] for t in rec["conversations"][1:]) == text  # nothing lost
    info = llamafactory_dataset_info("d", "d.json")["d"]
    assert info["formatting"] == "sharegpt" and info["tags"]["observation_tag"] == "observation"
