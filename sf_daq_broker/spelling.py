""" "Did you mean …?": which known word a misspelt one was meant to be.

A request key with a typo (``channel_list`` for ``channels_list``) would otherwise be kept as
harmless extra metadata while the data it asked for is silently not retrieved. The measure is
the edit distance (insertions, deletions, substitutions and swaps of two neighbours), after
case and ``-``/``_`` are made alike, with a budget that grows with the word: short words are
too easily one edit away from each other.
"""

from __future__ import annotations

from collections.abc import Iterable


def edit_distance(a: str, b: str) -> int:
    """Optimal string alignment distance: the Levenshtein edits plus adjacent swaps."""
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i] + [0] * len(b)
        for j, char_b in enumerate(b, 1):
            cost = char_a != char_b
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and char_a == b[j - 2] and a[i - 2] == char_b:
                current[j] = min(current[j], previous2[j - 2] + 1)
        previous2, previous = previous, current
    return previous[-1]


def _normalised(word: str) -> str:
    return word.lower().replace("-", "_").replace(" ", "_")


def allowed_edits(word: str) -> int:
    """How far a typo of ``word`` may be from it: 1 edit below 8 characters, else 2."""
    return 1 if len(word) < 8 else 2


def meant(word: str, known: Iterable[str]) -> str | None:
    """The known word ``word`` is most likely a misspelling of, or None.

    None also when ``word`` is itself known: only a word that is not known can be a typo.
    """
    candidates = list(known)
    if word in candidates:
        return None
    typed = _normalised(word)
    best: tuple[int, str] | None = None
    for candidate in candidates:
        distance = edit_distance(typed, _normalised(candidate))
        if distance <= allowed_edits(candidate) and (best is None or distance < best[0]):
            best = (distance, candidate)
    return best[1] if best else None
