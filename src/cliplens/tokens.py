"""Finding a word or phrase among a prompt's decoded tokens (for word maps and per-phrase
evaluation): a word may span several sub-word tokens, and case and spacing are ignored."""

from __future__ import annotations

from .errors import InputError


def _norm(text: str) -> str:
    return "".join(text.lower().split())


def find_phrase(tokens: list[str], phrase: str, start: int = 0) -> list[int]:
    """Indices of the tokens that spell ``phrase`` (its characters, spaces ignored), the first
    occurrence at or after token ``start``. Raises InputError when the phrase is not there."""
    target = _norm(phrase)
    if not target:
        raise InputError("an empty word or phrase has no tokens")
    pieces = [_norm(t) for t in tokens]
    for i in range(start, len(pieces)):
        if not pieces[i] or not target.startswith(pieces[i]):
            continue
        spelled, j = "", i
        while j < len(pieces) and len(spelled) < len(target):
            spelled += pieces[j]
            j += 1
            if not target.startswith(spelled):
                break
        if spelled == target:
            return list(range(i, j))
    raise InputError(f"{phrase!r} is not among the prompt's tokens ({' '.join(tokens)})")
