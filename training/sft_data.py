"""SFT data from trajectories and pairs, token-level: the labels come from the masks, never from re-tokenised text.

- Stage 1 (contrastive): context c = prompt + shared prefix; chosen / rejected continuations as ids,
  each with its loss mask (policy tokens only: observations and forced text are 0).
- Stages 2 and 3 (trajectory SFT): correct CoA and CoT trajectories mixed by a configured ratio;
  ``labels_stage2`` = the ids where the policy wrote them, -100 on the prompt and on observations
  (search results stay out of the loss); ``labels_stage3`` = every completion id, observations
  included, so the policy learns to predict search results (the internal world model).
Sequences over ``max_length`` are truncated and flagged, never dropped silently.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

IGNORE = -100


def stage1_rows(pairs: Sequence[dict], max_length: int) -> list[dict]:
    """One SFT-1 example per pair: ``context_ids`` = prompt + shared prefix; each continuation's ids with its
    loss mask (``chosen_mask`` / ``rejected_mask``: 1 on policy tokens, 0 on observations and forced text),
    cut to fit ``max_length`` (and flagged). The text columns are for reading only; training uses the ids."""
    rows = []
    for p in pairs:
        if p.get("chosen_mask") is None or p.get("rejected_mask") is None:
            raise ValueError(
                f"pair {p['pair_id']} has no chosen_mask/rejected_mask: re-mine contrastive_pairs "
                "(SFT-1 keeps observations out of the loss through these masks)"
            )
        context = list(p["prompt_ids"]) + list(p["prefix_ids"])
        room = max(0, max_length - len(context))
        rows.append(
            {
                "pair_id": p["pair_id"],
                "question_id": p["question_id"],
                "kind": p["kind"],
                "context_ids": context,
                "chosen_ids": list(p["chosen_ids"])[:room],
                "chosen_mask": list(p["chosen_mask"])[:room],
                "rejected_ids": list(p["rejected_ids"])[:room],
                "rejected_mask": list(p["rejected_mask"])[:room],
                "prompt": p["prompt_text"] + p["prefix_text"],
                "chosen": p["chosen_text"],
                "rejected": p["rejected_text"],
                "truncated": len(context) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) > max_length,
            }
        )
    return rows


def labels_for(row: dict, *, include_observations: bool) -> list[int]:
    ids, mask, start = row["token_ids"], row["policy_mask"], row["prompt_tokens"]
    if include_observations:
        return [IGNORE] * start + list(ids[start:])
    return [t if m else IGNORE for t, m in zip(ids, mask)]


def select_mix(
    cot_rows: Sequence[dict], coa_rows: Sequence[dict], *, coa: int, cot: int, seed: int
) -> tuple[list[dict], dict]:
    """Up to ``coa`` correct CoA and ``cot`` correct CoT trajectories (seeded choice); stats say what was available."""
    good_coa = sorted((r for r in coa_rows if r["em"] >= 1.0), key=lambda r: r["trajectory_id"])
    good_cot = sorted((r for r in cot_rows if r["em"] >= 1.0), key=lambda r: r["trajectory_id"])
    rng = random.Random(seed)
    pick_coa = rng.sample(good_coa, min(coa, len(good_coa)))
    pick_cot = rng.sample(good_cot, min(cot, len(good_cot)))
    stats = {
        "correct_coa_available": len(good_coa),
        "correct_cot_available": len(good_cot),
        "coa_requested": coa,
        "cot_requested": cot,
        "coa_selected": len(pick_coa),
        "cot_selected": len(pick_cot),
    }
    return pick_coa + pick_cot, stats


def stage23_rows(selected: Sequence[dict], max_length: int) -> list[dict]:
    rows = []
    for r in selected:
        ids = list(r["token_ids"])
        l2 = labels_for(r, include_observations=False)
        l3 = labels_for(r, include_observations=True)
        rows.append(
            {
                "trajectory_id": r["trajectory_id"],
                "question_id": r["question_id"],
                "pool": r["pool"],
                "input_ids": ids[:max_length],
                "labels_stage2": l2[:max_length],
                "labels_stage3": l3[:max_length],
                "env_tokens": sum(1 for a, b in zip(l2[:max_length], l3[:max_length]) if a == IGNORE and b != IGNORE),
                "length": min(len(ids), max_length),
                "truncated": len(ids) > max_length,
                "prompt": r["prompt"],
                "text": r["text"],
                "spans": r["spans"],
            }
        )
    return rows


def sharegpt_record(row: dict, system: str | None = None) -> dict:
    """LLaMA-Factory's sharegpt layout: the trajectory split into gpt turns and observation turns."""
    text, turns = row["text"], []
    cursor = 0
    while True:
        start = text.find("<search_result>", cursor)
        if start < 0:
            break
        end = text.find("</search_result>", start)
        end = len(text) if end < 0 else end + len("</search_result>")
        turns.append({"from": "gpt", "value": text[cursor:start]})
        turns.append({"from": "observation", "value": text[start:end]})
        cursor = end
    turns.append({"from": "gpt", "value": text[cursor:]})
    record = {"conversations": [{"from": "human", "value": row["prompt"]}] + [t for t in turns if t["value"]]}
    if system:
        record["system"] = system
    return record


def write_sharegpt(rows: Sequence[dict], path) -> int:
    records = [sharegpt_record(r) for r in rows]
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(records, fh, ensure_ascii=False, indent=1)
    return len(records)


def llamafactory_dataset_info(name: str, file_name: str) -> dict:
    """The ``dataset_info.json`` entry LLaMA-Factory needs for the sharegpt export."""
    return {
        name: {
            "file_name": file_name,
            "formatting": "sharegpt",
            "columns": {"messages": "conversations", "system": "system"},
            "tags": {
                "role_tag": "from",
                "content_tag": "value",
                "user_tag": "human",
                "assistant_tag": "gpt",
                "observation_tag": "observation",
            },
        }
    }
