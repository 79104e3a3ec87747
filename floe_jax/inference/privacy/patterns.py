"""Private data found by its shape: phones, emails, cards, IBANs, SSNs, IP addresses and street
addresses, on normalised text (see `normalize`).

Phones are found by `phonenumbers` (the Python port of Google's libphonenumber), whose
`PhoneNumberMatcher` knows every country's numbering plan and formatting, with a default region
(`US` unless set) and `POSSIBLE` leniency: the guard errs toward withholding, so a number that is
possible but not assigned (`555-0142`) counts. A seven-digit local number written with only a
space (`100 2000`) is read as two numbers, not as a phone.

The other types are regular expressions with a check where one exists (Luhn for cards, mod-97
for IBANs, `ipaddress` for IPs; a street address's words must be capitalised, since `3 proposals
after lunch` has the same shape), because no well-kept library finds them in free text: email
libraries (`email-validator`) validate one address, they do not find addresses in prose, nor
their obfuscated forms (`mira dot okafor at example dot com`, `mira.okafor [at] example.com`,
spaced `mira.okafor @ example . com`), which the email pattern here accepts.

Streaming: `pending(text)` is the length of the trailing text that could still grow into a span:
a trailing run of digits and phone separators (phones, cards, SSNs, IPv4), an IBAN after its
two-letter country code, hex groups after a colon (IPv6), a house number and the capitalised
words after it, an email whose domain is not finished, or a local
part that contains a character ordinary words do not (`.`, `_`, `+`, `@`) or is followed by a
spelt `at`. A bare word that later turns out to be an address's local part (`bob` before
`@example.com`) cannot be told from a word: only a registered address covers that case.
"""

from __future__ import annotations

import functools
import ipaddress
import re

import phonenumbers
import regex

from floe_jax.inference.privacy.normalize import normalize
from floe_jax.inference.privacy.span import PENDING_WINDOW, Span, memoised, merge_spans

PATTERN_TYPES = ("email", "card", "iban", "ssn", "ipv6", "ipv4", "phone", "address")

# obfuscated separators of emails: "@", "(at)", "[at]", " at "; ".", "(dot)", " dot "
_DOT = r"(?:\s?\.\s?|\s?[\[({<]\s?dot\s?[\])}>]\s?|\s(?:dot)\s)"
_LOCAL = r"[a-z0-9!#$%&'*+/=?^_`{|}~.-]+"
_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
# Spelt out ("at", "dot") in ordinary prose they would also match "look at the dot in": there a
# word after "at" must not be one that ordinary phrases put there, and the last label after a
# spelt "dot" must be a common top-level domain.
_NOT_DOMAIN = (
    "the|a|an|this|that|these|those|my|your|his|her|our|their|its|one|some|any|each|every|"
    "least|most|first|last|home|work|noon|night|all|once|school|least|times|which|what"
)
_TLD = "com|org|net|edu|gov|mil|int|io|co|uk|us|ca|au|de|fr|nl|eu|ch|es|it|jp|info|biz|me|ai|dev"
_AT = rf"(?:\s?@\s?|\s?[\[({{<]\s?at\s?[\])}}>]\s?|\sat\s(?!(?:{_NOT_DOMAIN})\b))"
# A "." with space around it ("example . com") ends an address only before a common top-level
# domain: "Call Bob at 555-0142. The capital" is a sentence, not `bob@555-0142.the`.
_END = (
    rf"(?:\.[a-z]{{2,}}|\s?\.\s?(?:{_TLD})\b"
    rf"|(?:\s?[\[({{<]\s?dot\s?[\])}}>]\s?|\sdot\s)(?:{_TLD})\b)"
)
_EMAIL = rf"(?<![\w.@]){_LOCAL}(?:{_DOT}{_LOCAL})*{_AT}{_LABEL}(?:{_DOT}{_LABEL})*{_END}"
_STREET = (
    r"street|st|avenue|ave|road|rd|lane|ln|drive|dr|boulevard|blvd|court|ct|place|pl|way|"
    r"terrace|close|crescent|square|sq|highway|hwy|parkway|pkwy|alley|row|strasse|straße"
)

PATTERNS = {
    "email": regex.compile(_EMAIL),
    "card": re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])"),
    "iban": re.compile(
        r"\b[a-z]{2}\d{2}(?:[a-z0-9]{11,30}|(?: [a-z0-9]{4}){2,7}(?: [a-z0-9]{1,4})?)\b"
    ),
    "ssn": re.compile(r"(?<!\d)\d{3}-\d{2}-\d{4}(?!\d)"),
    "ipv6": re.compile(r"(?<![0-9a-f:])(?:[0-9a-f]{0,4}:){2,7}[0-9a-f]{0,4}(?![0-9a-f:])"),
    "ipv4": re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.]*\d)"),
    # house number, one to three words, a street type: "12 harbour lane", "221b baker street"
    "address": re.compile(
        rf"(?<![\w-])\d{{1,5}}[a-z]?,? (?:[a-z][a-z'-]* ){{1,3}}(?:{_STREET})\b\.?"
    ),
}
# a phone still being written: digits and phone separators at the end, not inside a word
_PHONE_TAIL = re.compile(r"(?<![^\W_])[+(]?\d[\d \-./()]*$")
# an IBAN after its country code, an IPv6 address after its first colon
_IBAN_TAIL = re.compile(r"(?<![^\W_])[a-z]{2}\d{2}[a-z0-9]*(?: [a-z0-9]+)*$")
_IPV6_TAIL = re.compile(r"(?<![0-9a-f:])(?:[0-9a-f]{1,4}:{1,2}){1,7}[0-9a-f]{0,4}$")
_DIGIT = re.compile(r"\d")
_EMAIL_TAIL_CHARS = re.compile(r"[._%+@\-\[(]| at| dot")


def luhn_ok(digits: str) -> bool:
    """Luhn checksum of a digit string."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """ISO 13616 mod-97 check."""
    s = iban.replace(" ", "").upper()
    if not 15 <= len(s) <= 34:
        return False
    s = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in s)) % 97 == 1


def _valid(kind: str, text: str) -> bool:
    if kind == "card":
        d = re.sub(r"\D", "", text)
        return 13 <= len(d) <= 19 and luhn_ok(d)
    if kind == "iban":
        return iban_ok(text)
    if kind == "ipv4":
        try:
            ipaddress.IPv4Address(text)
            return True
        except ValueError:
            return False
    if kind == "ipv6":
        try:
            ipaddress.IPv6Address(text)
            return sum(1 for g in text.split(":") if g) >= 3  # not "std::map", "d::"
        except ValueError:
            return False
    if kind == "ssn":
        a, g, s = text.split("-")
        return a not in ("000", "666") and a[0] != "9" and g != "00" and s != "0000"
    return True


def capitalised_street(original: str) -> bool:
    """Whether the words after an address's house number are capitalised in the original text
    (`12 Harbour Lane`, not `3 proposals after lunch`): an address found by its shape alone."""
    rest = re.sub(r"^\W*\d+[^\W\d_]?[,\s]*", "", original)
    return all(w[0].isupper() for w in re.findall(r"[^\W\d_][\w'-]*", rest))


def grow_number(norm: str, start: int, end: int, max_sep: int = 2) -> tuple[int, int]:
    """Extends a number's span over adjacent digit groups (`1-` before, `-99` after) across at
    most `max_sep` separator characters, so a redaction never leaves part of a number behind
    (`1-[PHONE]`)."""
    sep = " -./()+"
    while True:
        j = start
        while j > 0 and norm[j - 1] in sep and start - j < max_sep:
            j -= 1
        if j > 0 and norm[j - 1].isdigit():
            start = j - 1
            while start > 0 and norm[start - 1].isdigit():
                start -= 1
            continue
        if j > 0 and norm[j - 1] == "+":
            start = j - 1
        break
    while True:
        j = end
        while j < len(norm) and norm[j] in sep and j - end < max_sep:
            j += 1
        if j < len(norm) and norm[j].isdigit():
            end = j + 1
            while end < len(norm) and norm[end].isdigit():
                end += 1
            continue
        if end < len(norm) and norm[end] == ")":
            end += 1
        break
    return start, end


# cheap tests that a type can occur at all, before its pattern runs: (normalised text, digits?)
_NEED = {
    "email": lambda t, d: "@" in t or " at " in t or "at)" in t or "at]" in t or "at}" in t,
    "card": lambda t, d: d,
    "iban": lambda t, d: d,
    "ssn": lambda t, d: d,
    "ipv4": lambda t, d: d,
    "ipv6": lambda t, d: ":" in t,
    "address": lambda t, d: d,
    "phone": lambda t, d: d,
}
_NUMBER_RUN = re.compile(r"[+(]?\d(?:[\d \-./()]*\d)?\)?")
_CONTEXT = 8  # characters each side of a run that the matcher sees ("ext", a letter, a date)


@functools.lru_cache(maxsize=4096)
def phones_in(window: str, region: str) -> tuple[tuple[int, int], ...]:
    """`(start, end)` of the phone numbers `phonenumbers` finds in `window` (POSSIBLE leniency)."""
    out = []
    leniency = phonenumbers.Leniency.POSSIBLE
    for m in phonenumbers.PhoneNumberMatcher(window, region, leniency=leniency):
        raw = m.raw_string
        digits = re.sub(r"\D", "", raw)
        if len(digits) < 7:
            continue
        if len(digits) == 7 and not raw.startswith("+") and not re.search(r"\d[-.]\d", raw):
            if re.search(r"\d\s+\d", raw):
                continue  # "100 2000": two numbers, not a local phone number
        out.append((m.start, m.end))
    return tuple(out)


def _window(norm: str) -> int:
    return max(len(norm) - PENDING_WINDOW, 0)


class PatternDetector:
    """Finds private data by its shape (see the module docstring); implements `Detector`.

    Args:
      types: which of `PATTERN_TYPES` to look for.
      region: default region for numbers written without a country code (ISO 3166 alpha-2).
      memo: where to memoise answers (`PrivacyDetector(memo=True)`); None: nowhere.
    """

    def __init__(self, types=PATTERN_TYPES, *, region: str = "US", memo=None):
        unknown = set(types) - set(PATTERN_TYPES)
        if unknown:
            raise ValueError(f"PatternDetector: unknown types {sorted(unknown)}")
        self.types = tuple(types)
        self.region, self.memo = region, memo

    def find(self, text: str) -> list[Span]:
        types, region = self.types, self.region
        key = ("patterns.find", types, region, text)
        return list(memoised(self.memo, key, lambda: _find(types, region, text), text))

    def pending(self, text: str) -> int:
        types = self.types
        key = ("patterns.pending", types, text)
        return memoised(self.memo, key, lambda: _pending(types, text), text)


def _phones(norm: str, region: str) -> list[tuple[int, int]]:
    """Phone spans of the normalised text: `phonenumbers` on each run of digits and phone
    separators with seven digits or more (with a little context), cached by run, so a text
    that grows token by token re-parses only its newest number."""
    out = []
    for m in _NUMBER_RUN.finditer(norm):
        if sum(c.isdigit() for c in m.group()) < 7:
            continue
        a, b = max(m.start() - _CONTEXT, 0), min(m.end() + _CONTEXT, len(norm))
        for s, e in phones_in(norm[a:b], region):
            out.append(grow_number(norm, a + s, a + e))
    return out


# `find` and `pending` are pure functions of the configuration and the text (so they can be
# memoised: `span.memoised`).
def _find(types: tuple[str, ...], region: str, text: str) -> tuple[Span, ...]:
    n = normalize(text)
    norm = n.text
    found: list[tuple[int, int, str]] = []
    has_digit = any(c.isdigit() for c in norm)
    for kind in types:
        if not _NEED[kind](norm, has_digit):
            continue
        if kind == "phone":
            found += [(s, e, "phone") for s, e in _phones(norm, region)]
            continue
        for m in PATTERNS[kind].finditer(norm):
            span = m.group()
            while not _valid(kind, span) and kind in ("iban", "card") and " " in span:
                span = span.rsplit(" ", 1)[0]  # a greedy match may run into the next word
            if _valid(kind, span):
                s, e = m.start(), m.start() + len(span)
                if kind == "address" and not capitalised_street(
                    text[n.span(s, e)[0] : n.span(s, e)[1]]
                ):
                    continue
                if kind in ("card", "ssn"):
                    s, e = grow_number(norm, s, e)
                found.append((s, e, kind))
    spans = []
    for s, e, kind in found:
        a, b = n.span(s, e)
        spans.append(Span(a, b, kind, text[a:b]))
    return tuple(merge_spans(spans))


def _pending(types: tuple[str, ...], text: str) -> int:
    n = normalize(text)
    norm = n.text
    start = len(norm)
    if "phone" in types or "card" in types or "ssn" in types:
        m = _PHONE_TAIL.search(norm)
        if m:
            start = min(start, m.start())
    for kind, tail_re in (("iban", _IBAN_TAIL), ("ipv6", _IPV6_TAIL)):
        m = tail_re.search(norm, _window(norm)) if kind in types else None
        # hex groups need a digit or a second colon: not the "A:" of a prompt
        if m and (kind == "iban" or m.group().count(":") > 1 or _DIGIT.search(m.group())):
            start = min(start, m.start())
    if "email" in types:
        for m in PATTERNS["email"].finditer(norm, pos=_window(norm), partial=True):
            # a sentence's full stop alone does not make a word an address
            tail = m.group().removesuffix(".")
            if m.partial and m.end() > m.start() and _EMAIL_TAIL_CHARS.search(tail):
                start = min(start, m.start())
                break
    if "address" in types:
        for m in PATTERNS_PARTIAL_ADDRESS.finditer(norm, pos=_window(norm), partial=True):
            a = n.at(m.start())
            if m.partial and m.group().strip() and capitalised_street(text[a:]):
                start = min(start, m.start())
                break
    return 0 if start >= len(norm) else len(text) - n.at(start)


PATTERNS_PARTIAL_ADDRESS = regex.compile(PATTERNS["address"].pattern)
