"""Text normalisation shared by sampling (leakage) and corpus building."""

from __future__ import annotations

import re
import string
import unicodedata

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_SPACE = re.compile(r"\s+")


def normalise_question(text: str) -> str:
    """Case-, accent-, punctuation- and whitespace-insensitive key used to detect leakage."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def join_sentences(sentences: list[str]) -> str:
    """Join HotpotQA sentences (later ones usually carry their own leading space)."""
    out = ""
    for s in sentences:
        if out and not out[-1].isspace() and not s[:1].isspace():
            out += " "
        out += s
    return out.strip()
