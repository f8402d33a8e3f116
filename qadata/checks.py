"""Record-level data-quality predicates shared by asset checks and tests."""

from __future__ import annotations


def answer_in_gold(rec: dict, *, sentences_only: bool = False) -> bool | None:
    """Is the answer found in the record's gold evidence? ``None`` when it has no gold context.

    Yes/no answers always count as supported. With ``sentences_only`` the evidence is the exact
    supporting sentences (plus the gold titles, for comparison answers that name an entity);
    otherwise the whole gold paragraphs, compared case-insensitively (real HotpotQA answers are
    sometimes capitalised differently from the paragraph).
    """
    if not rec.get("context") or not rec.get("supporting_facts"):
        return None
    answer = rec["answer"]
    if answer.lower() in ("yes", "no"):
        return True
    paras = {p["title"]: list(p["sentences"]) for p in rec["context"]}
    gold_titles = {f["title"] for f in rec["supporting_facts"]}
    if sentences_only:
        sents = [
            paras[f["title"]][f["sent_id"]]
            for f in rec["supporting_facts"]
            if f["title"] in paras and 0 <= f["sent_id"] < len(paras[f["title"]])
        ]
        return answer in " ".join(sents) or answer in gold_titles
    text = " ".join(" ".join(paras[t]) + " " + t for t in gold_titles if t in paras)
    return answer.lower() in text.lower()
