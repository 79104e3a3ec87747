"""A private span, and the merging of overlapping ones (so a redaction covers their union)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

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


# Detector results memoised by (configuration, text), up to this many characters of texts (see
# `floe_jax.memo`); keys hold no compiled pattern: a configuration is a short fingerprint.
MEMO = LRUMemo(max_size=1 << 24)
