"""A private span, and the merging of overlapping ones (so a redaction covers their union)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

from floe_jax.memo import LRUMemo

# How far back from the end of a text (in normalised characters) a detector looks for a span that
# is still being written: longer than any phone, address or (even spelt-out) email address.
PENDING_WINDOW = 256


@dataclasses.dataclass(frozen=True)
class Span:
    """Characters `[start, end)` of the original text, of type `kind` (`text` is that slice)."""

    start: int
    end: int
    kind: str
    text: str


def merge_spans(spans: Iterable[Span], text: str | None = None) -> list[Span]:
    """Sorted spans with overlapping ones merged into their union (the kind of the earliest,
    longest one), so that no part of either is left unredacted."""
    out: list[Span] = []
    for s in sorted(spans, key=lambda s: (s.start, -(s.end - s.start))):
        if out and s.start < out[-1].end:
            last = out[-1]
            if s.end > last.end:
                joined = last.text + s.text[last.end - s.start :]
                if text is not None:
                    joined = text[last.start : s.end]
                out[-1] = Span(last.start, s.end, last.kind, joined)
            continue
        out.append(s)
    return out


# The built-in detectors' answers of a `PrivacyDetector(memo=True)`, by (detector configuration,
# text), up to 16 M (characters of a text + `MEMO_ENTRY` per answer); keys hold no compiled
# pattern (`RegisteredDetector` keys by a fingerprint of its patterns).
MEMO = LRUMemo(max_size=1 << 24)
MEMO_ENTRY = 256  # an answer's own bookkeeping (key, value, memo node), beside its text


def memoised(memo: LRUMemo | None, key, compute: Callable[[], object], text: str):
    """`compute()`, through `memo` under `key` (which holds `text`) when there is one."""
    if memo is None:
        return compute()
    return memo.get_or(key, compute, len(text) + MEMO_ENTRY)
