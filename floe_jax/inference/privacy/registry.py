"""Client-registered private values: contacts' names (which no pattern can know), and their
phones, emails and street addresses, matched however they are written.

A registered value is classified by its shape and matched on normalised text (see `normalize`):

- a name (`Mira Okafor`) matches as `first last` with any run of spaces, dots, dashes or
  underscores between the parts, or none (`MiraOkafor`), as `Last, First` / `Last First`, as any
  part alone (the surname always, a given name of three letters or more), in any case, with the
  possessive (`Okafor's`: the name is redacted, the `'s` stays), and with one separator allowed
  between any two letters (`O.k.a.f.o.r`, `Oka-for`);
- a phone (`555-0142`, `+1 555 014 2000`) matches by the digits of its national number (read by
  `phonenumbers`) in order with any separators (`5550142`, `5 5 5 0 1 4 2`, `555–0142`,
  `555/0142`), after an optional country code or trunk prefix;
- an email matches with `@`/`.` written as `at`/`dot` (bare or in brackets) or spaced;
- a street address (`12 Harbour Lane`) matches with its street type abbreviated or spelt out.

Streaming: `pending(text)` is the length of the trailing text that is a prefix of a registered
value in any of these forms (one letter of a name is enough), so it can be held back until it is
decided.
"""

from __future__ import annotations

import functools
import hashlib
import re
import threading
from collections.abc import Iterable

import phonenumbers
import regex

from floe_jax.inference.privacy.normalize import normalize
from floe_jax.inference.privacy.patterns import grow_number
from floe_jax.inference.privacy.span import PENDING_WINDOW, Span, memoised, merge_spans

_STREET_ABBR = {
    "street": "st",
    "avenue": "ave",
    "road": "rd",
    "lane": "ln",
    "drive": "dr",
    "boulevard": "blvd",
    "court": "ct",
    "place": "pl",
    "square": "sq",
    "apartment": "apt",
    "highway": "hwy",
    "parkway": "pkwy",
}
_ABBR_STREET = {v: k for k, v in _STREET_ABBR.items()}
_EMAIL_SHAPE = re.compile(r"^[^@\s]+@[^@\s]+\.[a-z]{2,}$")
_AT = r"(?:\s?@\s?|\s?[\[({<]\s?at\s?[\])}>]\s?|\s(?:at)\s|\s)"
_DOT = r"(?:\s?\.\s?|\s?[\[({<]\s?dot\s?[\])}>]\s?|\s(?:dot)\s|\s)"
_LETTER_SEP = r"[\s\-._'*·]?"
_NAME_SEP = r"[\s\-._]{0,3}"
_MAX_DIGIT_SEP = 3  # separator characters between two digits of a registered phone
_DIGIT_SEP = rf"[\s\-./()]{{0,{_MAX_DIGIT_SEP}}}"
_B = r"(?<![^\W_])"  # at the start of a word
_E = r"(?![^\W_])"  # at the end of a word


def classify(value: str) -> str:
    """`email`, `phone`, `address` or `term` (a name or any other string), by shape."""
    norm = normalize(value).text.strip()
    digits = sum(c.isdigit() for c in norm)
    if _EMAIL_SHAPE.match(norm):
        return "email"
    if digits >= 7 and not re.search(r"[a-z]", norm):
        return "phone"
    if re.match(r"^\d{1,5}[a-z]?,? [a-z]", norm):
        return "address"
    return "term"


def _word(w: str) -> str:
    """A word with one optional separator between any two letters (`o.k.a.f.o.r`)."""
    return _LETTER_SEP.join(regex.escape(c) for c in w if c.isalnum())


def name_pattern(name: str) -> str:
    parts = [p for p in re.split(r"[\s,]+", normalize(name).text) if any(c.isalnum() for c in p)]
    words = [_word(p) for p in parts]
    if len(words) == 1:
        return f"{_B}(?:{words[0]}){_E}"
    alts = [_NAME_SEP.join(words), rf"{words[-1]}\s?,?\s?{_NAME_SEP.join(words[:-1])}"]
    alts += [w for p, w in zip(parts, words, strict=True) if len(p) >= 3 or w is words[-1]]
    return f"{_B}(?:{'|'.join(alts)}){_E}"


# What may precede a phone's national number: a country code or trunk prefix, a bracket.
_PHONE_PREFIX = r"(?<!\d)(?:\+?\s?\d{1,4}\s?[\-./ ]?\s?)?\(?(?:0\s?)?"


def phone_body(phone: str, region: str = "US") -> str:
    """The national number's digits (read by `phonenumbers`; all the digits when it cannot read
    them) in order with any separators: the part of `phone_pattern` after `_PHONE_PREFIX`."""
    digits = re.sub(r"\D", "", normalize(phone).text)
    try:
        number = phonenumbers.parse(normalize(phone).text, region)
        if number.national_number:
            digits = str(number.national_number)
    except phonenumbers.NumberParseException:
        pass  # not a number phonenumbers can read: all its digits, in order
    return _DIGIT_SEP.join(digits)


def phone_pattern(phone: str, region: str = "US") -> str:
    """The national number's digits in order with any separators, after an optional country
    code or trunk prefix (`+44 20 7946 0958` also matches `020 7946 0958`, `20 7946 0958`)."""
    return _PHONE_PREFIX + phone_body(phone, region)


def email_pattern(email: str) -> str:
    local, domain = normalize(email).text.strip().split("@", 1)

    def dotted(s: str) -> str:
        return _DOT.join(_word(p) for p in s.split("."))

    return rf"(?<![\w.]){dotted(local)}{_AT}{dotted(domain)}{_E}"


def address_pattern(address: str) -> str:
    words = [w for w in re.split(r"[\s,]+", normalize(address).text) if w]
    out = []
    for w in words:
        w = w.rstrip(".")
        full = _ABBR_STREET.get(w, w)
        abbr = _STREET_ABBR.get(full)
        out.append(rf"(?:{full}|{abbr}\.?)" if abbr else _word(w))
    return _B + r"[\s,]{0,3}".join(out) + _E


_BUILDERS = {"term": name_pattern, "email": email_pattern, "address": address_pattern}


@functools.lru_cache(maxsize=4096)
def _value_pattern(kind: str, value: str, region: str) -> str:
    """The pattern of one registered value; a phone's without the shared `_PHONE_PREFIX`
    (cached: building one parses the value, and a client's detector is rebuilt per evaluation)."""
    return phone_body(value, region) if kind == "phone" else _BUILDERS[kind](value)


@functools.lru_cache(maxsize=32)  # a compiled name list is ~45 KB per name: a few clients' lists
def _compiled(kind: str, alternatives: tuple[str, ...]) -> regex.Pattern:
    """One regex for all values of a kind. Phones share their prefix, written once in front of
    the alternation of their bodies: the engine tries the optional prefix once per position
    instead of once per registered number (several times faster on a contact list). The same
    strings match as with one `phone_pattern` per number, but where two registered numbers
    overlap the match can end elsewhere; `find` then grows it over the adjacent digit groups
    (`grow_number`, as many separators as `_DIGIT_SEP` allows), so a number is redacted whole
    either way."""
    alt = "|".join(f"(?:{p})" for p in alternatives)
    return regex.compile(_PHONE_PREFIX + f"(?:{alt})" if kind == "phone" else alt)


class RegisteredDetector:
    """Matches client-registered values in their common variants; implements `Detector`.
    `memo`: where to memoise answers (`PrivacyDetector(memo=True)`); None: nowhere."""

    def __init__(self, values: Iterable[str] = (), *, region: str = "US", memo=None):
        self.region, self.memo = region, memo
        self._lock = threading.Lock()
        self._values: dict[str, str] = {}
        # (fingerprint, compiled patterns), replaced whole by `register`: the fingerprint is
        # the patterns' memo key (`span.memoised`)
        self._patterns: tuple[bytes, tuple[tuple[str, regex.Pattern], ...]] = (b"", ())
        self.register(values)

    @property
    def values(self) -> tuple[str, ...]:
        return tuple(self._values)

    def register(self, values: Iterable[str]) -> None:
        """Adds values (names, phones, emails, addresses); each is classified by its shape."""
        with self._lock:
            for v in values:
                v = (v or "").strip()
                if v and v not in self._values and any(c.isalnum() for c in v):
                    self._values[v] = classify(v)
            by_kind: dict[str, list[str]] = {}
            for v, kind in self._values.items():
                by_kind.setdefault(kind, []).append(_value_pattern(kind, v, self.region))
            patterns = tuple((kind, _compiled(kind, tuple(pats))) for kind, pats in by_kind.items())
            sources = repr(tuple((kind, pat.pattern) for kind, pat in patterns)).encode()
            self._patterns = (hashlib.blake2b(sources, digest_size=16).digest(), patterns)

    def find(self, text: str) -> list[Span]:
        config, patterns = self._patterns
        key = ("registered.find", config, text)
        return list(memoised(self.memo, key, lambda: _find(patterns, text), text))

    def pending(self, text: str) -> int:
        config, patterns = self._patterns
        key = ("registered.pending", config, text)
        return memoised(self.memo, key, lambda: _pending(patterns, text), text)


def _find(patterns: tuple[tuple[str, regex.Pattern], ...], text: str) -> tuple[Span, ...]:
    n = normalize(text)
    spans = []
    for kind, pat in patterns:
        for m in pat.finditer(n.text, overlapped=False):
            g = m.group()
            if g.strip():  # a span starts and ends with a visible character
                start, end = m.start() + len(g) - len(g.lstrip()), m.start() + len(g.rstrip())
                if kind == "phone":  # the whole number, not `0044 [PHONE]`
                    start, end = grow_number(n.text, start, end, _MAX_DIGIT_SEP)
                a, b = n.span(start, end)
                spans.append(Span(a, b, kind, text[a:b]))
    return tuple(merge_spans(spans, text))


def _pending(patterns: tuple[tuple[str, regex.Pattern], ...], text: str) -> int:
    n = normalize(text)
    start = len(n.text)
    for _, pat in patterns:
        for m in pat.finditer(n.text, pos=max(len(n.text) - PENDING_WINDOW, 0), partial=True):
            if m.partial and m.group().strip():
                start = min(start, m.start() + len(m.group()) - len(m.group().lstrip()))
    return 0 if start >= len(n.text) else len(text) - n.at(start)
