"""The evasion corpus: private values written to slip past the guard, whole and token by token.

What counts as a leak (checked for every text the guard lets through): an alphanumeric character
of the private span, in the original text, sent verbatim. Separators (`+`, `(`, `-`, spaces) and
invisible characters carry no private value and may pass. Each decision is checked two ways:
its claimed redactions are honest (the sent text is exactly the original with those ranges
replaced by placeholders) and cover every letter and digit of the span that has arrived; and an
independent recorder (`count_private_spans`, no variants, no hold-back logic) finds no private
value, complete or as a trailing prefix, in the sent text.

Streaming: each text is fed to the guard as successive prefixes, one chunk of up to three
characters at a time (its leading whitespace attached, like BPE tokens), and the hand-written
cases also one character at a time; every prefix is checked as above. The exception is an
unregistered email, whose local part cannot be told from a word until `@` arrives (see
`floe_jax/inference/privacy/detector.py`): there the `@` and the domain must never be sent.

False positives: on the ordinary sentences of `privacy_corpus.ORDINARY_*` (300, with numbers,
dates, times, prices, versions and code), no complete span is reported: the rate is 0/300 and the
test bounds it at 1% (3 sentences), a rate at which a redaction in ordinary text is rare enough
not to change the cloud's answers measurably while the bound still fails on a detector that
flags whole classes of ordinary text (all numbers, all "at ... dot" phrases). Holding back the
undecided tail while streaming is more frequent (a trailing number, a word followed by "at", the
first letters of a registered name): 606 of the 5,343 three-character-chunk prefixes of those
sentences (11%; 16% of word-by-word prefixes). The test bounds it at 20%: a held tail costs the
cloud's help for that one step (it sees a placeholder, or nothing under `edge_only`), so the bound
keeps at least four steps in five fused on ordinary text, while a guard that held every trailing
word or number would fail it.
"""

import re

import pytest
from privacy_corpus import REGISTERED, TEMPLATES, Case, cases, ordinary

from floe_jax.config import ConfigError
from floe_jax.inference.cloud import CloudDistribution, Prefix
from floe_jax.inference.privacy import (
    GuardedCloud,
    PrivacyDetector,
    PrivacyPolicy,
    Span,
    count_private_spans,
    normalize,
)

CASES = cases()
_PLACEHOLDER = re.compile(r"\[[A-Z0-9_]+\]")


def _detector(**kw) -> PrivacyDetector:
    return PrivacyDetector(PrivacyPolicy(**kw), terms=REGISTERED)


def _place(template: str, form: str) -> tuple[str, int, int]:
    a = template.index("{}")
    return template.replace("{}", form), a, a + len(form)


def _chunks(text: str, size: int = 3) -> list[int]:
    """Prefix lengths when `text` arrives in chunks of <= size non-space characters, each with
    its leading whitespace (like BPE tokens)."""
    return [m.end() for m in re.finditer(rf"\s*\S{{1,{size}}}|\s+$", text)]


def _check(det, text: str, s0: int, s1: int, case: Case, k: int) -> tuple[str | None, bool]:
    """Screens text[:k]; asserts no leak (module docstring). Returns (sent text, held?)."""
    prefix = text[:k]
    d = det.screen(prefix)
    ctx = f"{case.kind} {case.form!r} in {text!r}, prefix {prefix!r}, sent {d.text!r}"
    if d.action == "edge_only":
        assert d.text is None
        return None, d.held is not None
    ranges = [(s.start, s.end) for s in d.spans] + ([(d.held.start, d.held.end)] if d.held else [])
    inside = lambda i: any(a <= i < b for a, b in ranges)
    kept = "".join(c for i, c in enumerate(prefix) if not inside(i))
    assert _PLACEHOLDER.sub("", d.text) == kept, "redactions not as claimed: " + ctx
    arrived = [i for i in range(s0, min(s1, k)) if normalize(prefix[i]).text.isalnum()]
    if case.registered or case.kind != "email":
        assert all(inside(i) for i in arrived), "leak: " + ctx
        got = count_private_spans(d.text, case.values)
        assert got.total == 0, f"recorder saw {got}: " + ctx
    else:  # an unregistered email: never its "@" or domain (the local part is a bare word)
        at = normalize(text[s0:s1]).text.replace(" ", "")
        domain = re.split(r"@|\(at\)|\[at\]|\{at\}|(?<=\w)at(?=\w)", at)[-1]
        sent = normalize(_PLACEHOLDER.sub("", d.text)).text
        assert "@" not in sent and re.split(r"\W", domain)[0] not in sent, "leak: " + ctx
    return d.text, d.held is not None


def test_corpus_size_and_mix():
    by_kind = {k: sum(c.kind == k for c in CASES) for k in ("name", "email", "phone", "address")}
    assert len(CASES) >= 200 and min(by_kind.values()) >= 30, by_kind
    assert sum(not c.registered for c in CASES) >= 20


@pytest.mark.parametrize("kind", ["name", "email", "phone", "address"])
def test_whole_texts_leak_nothing(kind):
    det = _detector()
    for case in (c for c in CASES if c.kind == kind):
        for t in TEMPLATES:
            text, s0, s1 = _place(t, case.form)
            sent, _ = _check(det, text, s0, s1, case, len(text))
            assert sent is not None and _PLACEHOLDER.search(sent), (case, text)


def test_whole_span_redaction_never_partial():
    """`1-[PHONE]`, `555/[PHONE]`: the issue's partial redactions; the span is the whole number."""
    det = _detector()
    for form in ("1-555-014-2000", "555/014-2000", "555/0142000", "+1 555 014 2000 ext 7"):
        sent = det.screen(f"ring {form} now").text
        assert sent.startswith("ring [PHONE]") and not re.search(r"\d", sent), sent


@pytest.mark.parametrize("kind", ["name", "email", "phone", "address"])
def test_streamed_token_by_token_leaks_nothing(kind):
    det = _detector()
    for case in (c for c in CASES if c.kind == kind):
        for t in TEMPLATES[:2]:
            text, s0, s1 = _place(t, case.form)
            for k in _chunks(text):
                _check(det, text, s0, s1, case, k)


def test_hand_written_cases_streamed_char_by_char():
    det = _detector()
    for case in CASES[:90]:
        text, s0, s1 = _place(TEMPLATES[1], case.form)
        for k in range(1, len(text) + 1):
            _check(det, text, s0, s1, case, k)


def test_edge_only_policy_streamed():
    det = _detector(action="edge_only")
    for case in CASES[::5]:
        text, s0, s1 = _place(TEMPLATES[0], case.form)
        for k in _chunks(text):
            _check(det, text, s0, s1, case, k)


def test_hold_mode_sends_the_text_without_its_tail():
    det = _detector(pending="hold")
    d = det.screen("Contact: Mira Okaf")
    assert d.action == "redact" and d.text == "Contact: " and d.held.start == 9
    assert det.screen("Mira Ok").action == "edge_only"  # nothing decided is left to send
    for case in CASES[::7]:
        text, s0, s1 = _place(TEMPLATES[1], case.form)
        for k in _chunks(text):
            _check(det, text, s0, s1, case, k)


def test_edge_mode_keeps_an_undecided_tail_on_the_edge():
    det = _detector(pending="edge")
    d = det.screen("Contact: Mira Okaf")  # a registered name may be under way: the edge decides
    assert d.action == "edge_only" and d.text is None and d.held.start == 9
    done = det.screen("Contact: Mira Okafor, see you")  # decided: redacted and sent
    assert done.action == "redact" and done.held is None and "Mira" not in done.text
    for case in CASES[::7]:
        text, s0, s1 = _place(TEMPLATES[1], case.form)
        for k in _chunks(text):
            _check(det, text, s0, s1, case, k)


class _Recording:
    kind = "sparse"

    def __init__(self):
        self.texts: list[str] = []

    def next_token(self, prefixes):
        self.texts += [p.text for p in prefixes]
        return CloudDistribution.missing(len(prefixes), "recorded")


def test_the_issue_streams_through_the_guard():
    """The issue's three streams (`Contact: Mira Okaf`, `... mira.okafor@example`,
    `... +1 (555) 014-`): what the back end behind the guard receives, step by step."""
    rec = _Recording()
    guard = GuardedCloud(rec, _detector())
    text = f"Contact: {REGISTERED[0]} | phone {REGISTERED[1]} | email {REGISTERED[2]} | thanks"
    for k in _chunks(text, size=2):
        guard.next_token([Prefix(text=text[:k])])
    assert len(rec.texts) == len(_chunks(text, size=2))
    for sent in rec.texts:
        got = count_private_spans(sent, REGISTERED + ("Mira", "Okafor"))
        assert got.total == 0, (sent, got)
    assert rec.texts[-1] == "Contact: [TERM] | phone [PHONE] | email [EMAIL] | thanks"


def test_an_incomplete_last_character_is_undecided():
    """A byte-level tokenizer decodes `55` + the first byte of a fullwidth `５` as `55\ufffd`:
    the digits before it are held back, and the recorder calls it a partial span."""
    det = _detector()
    d = det.screen("A: 555-01\ufffd")
    assert d.text == "A: [PENDING]" and d.held is not None
    assert det.screen("A: 555-01\ufffd\ufffd").text == "A: [PENDING]"
    assert count_private_spans("A: 555-01\ufffd", ["555-0199"]).partial == 1


def test_recorder_counts_partial_spans():
    values = ("Mira Okafor", "+1 (555) 014-2000", "mira.okafor@example.com")
    assert count_private_spans("Contact: Mira Okaf", values).partial == 1
    assert count_private_spans("call +1 (555) 014-", values).partial == 1
    assert count_private_spans("mail mira.okafor@example", values).partial == 1
    got = count_private_spans("MIRA  OKAFOR and mira.okafor at example dot com", values)
    # both name occurrences count; the spelt-out email is not decoded (the recorder is simpler
    # than the detectors by design), though its name part is one of the two
    assert (got.complete, got.partial, got.values) == (2, 0, ("Mira Okafor",))
    assert count_private_spans("Mira Okafor, +1 555 014 2000", values).complete == 2
    assert count_private_spans("Contact: [TERM] | phone [PHONE]", values).total == 0
    assert count_private_spans("Mirror the example", values).total == 0
    assert count_private_spans("call +1 (555!", values).total == 0  # "!" closes the number
    assert count_private_spans("Contact: Mira ", values).partial == 1  # the space is in the name
    # every occurrence that starts a word, none inside one ("Samira"), overlapping ones each
    got = count_private_spans("Mira met mira; Samira MIRA", ("Mira",))
    assert (got.complete, got.partial) == (3, 0)
    assert count_private_spans("55 55 555", ("55 55",)).complete == 2  # "55 55" and "55 555"
    assert count_private_spans("a tail after a complete one: Mira Okafor Mira Ok",
                               ("Mira Okafor",)).partial == 1  # fmt: skip
    assert count_private_spans("Contact: Mira Okafo", ("Mira Okafor",)).partial == 1  # one short


def test_a_plugged_in_detector_is_consulted():
    class Projects:
        """A stand-in for an NER model: finds a project code name, and its prefix at the end."""

        def find(self, text):
            return [
                Span(m.start(), m.end(), "term", m.group()) for m in re.finditer("Zephyr", text)
            ]

        def pending(self, text):
            m = re.search(r"Z(?:e(?:p(?:h(?:y)?)?)?)?$", text)
            return len(m.group()) if m else 0

    det = PrivacyDetector(detectors=[Projects()])
    assert det.screen("Status of Zephyr?").text == "Status of [TERM]?"
    assert det.screen("Status of Zep").text == "Status of [PENDING]"
    with pytest.raises(TypeError):
        PrivacyDetector(detectors=[object()])


def test_a_prompt_waiting_for_its_answer_is_not_held():
    det = _detector()
    for text in ("Q: What is the capital of Nolraia?\nA:", "Q: Which currency?\nA: The", "Note:"):
        assert det.pending(text) == 0, text


def test_a_sentence_after_at_and_a_number_is_not_an_email():
    """`Call Bob at 555-0142. The capital` once redacted `Bob at 555-0142. The` as one email:
    a spaced "." ends an address only before a top-level domain."""
    det = _detector()
    text = "Call Germol at 555-4909. The capital there is"
    assert [(s.kind, text[s.start : s.end]) for s in det.find(text)] == [("phone", "555-4909")]
    assert det.find("Meet Bob at 5. Then go") == []
    for spaced in ("mira at example . com", "mira at example. org", "mira at example dot com"):
        assert [s.kind for s in det.find(f"write {spaced} today")] == ["email"], spaced


def test_false_positive_rate_on_ordinary_text():
    det = _detector()
    texts = ordinary(300)
    assert len(texts) == 300
    flagged = [(t, det.find(t)) for t in texts if det.find(t)]
    assert len(flagged) <= 3, flagged  # documented rate: 0 / 300 (module docstring)
    held = total = 0
    for t in texts:
        for k in _chunks(t):
            total += 1
            held += det.pending(t[:k]) > 0
    assert held / total < 0.20, held / total  # documented: 606 / 5343
    print(f"false positives {len(flagged)}/{len(texts)}; tail held on {held}/{total} prefixes")


@pytest.mark.parametrize(
    "field, value", [("pending", "drop"), ("region", "usa"), ("action", "hide"), ("types", ("x",))]
)
def test_policy_fields_are_validated(field, value):
    with pytest.raises(ConfigError, match=field if field != "types" else "span type"):
        PrivacyPolicy(**{field: value})


@pytest.mark.parametrize(
    "kind, value",
    [
        ("card", "4111 1111 1111 1111"),
        ("card", "4111-1111-1111-1111"),
        ("iban", "DE89 3704 0044 0532 0130 00"),
        ("iban", "GB82WEST12345698765432"),
        ("ssn", "123-45-6789"),
        ("ipv4", "192.168.1.20"),
        ("ipv6", "2001:db8::8a2e:370:7334"),
    ],
)
def test_other_types_streamed(kind, value):
    """Cards, IBANs, SSNs and IP addresses found by their shape, arriving token by token (an
    IBAN's two-letter country code may pass before its digits arrive: it names a country)."""
    det = _detector()
    text, s0, s1 = _place(TEMPLATES[0], value)
    case = Case(kind, value, (value.replace(" ", "")[2 if kind == "iban" else 0 :],), False)
    if kind == "iban":
        s0 += 2
    for k in _chunks(text, size=2):
        _check(det, text, s0, s1, case, k)


def test_a_registered_foreign_number_in_its_national_forms():
    """`phonenumbers` reads the registered number's national part, so the number written
    without its country code, with the trunk 0, or with `(0)` is the same number."""
    det = PrivacyDetector(terms=["+44 20 7946 0958"])
    for form in ("020 7946 0958", "20 7946 0958", "+44 (0) 20 7946 0958", "0044 20 7946 0958"):
        sent = det.screen(f"ring {form} now").text
        assert sent == "ring [PHONE] now", (form, sent)


@pytest.mark.parametrize(
    ("terms", "text", "digits"),
    [  # registered numbers that overlap: the match can stop inside the longer one
        (["1234567890", "2345678"], "call:12345678 - 90 now", "1234567890"),
        (["2345678", "5678901"], "call:1234 5678 - 901 now", "12345678901"),
    ],
)
def test_overlapping_registered_numbers_are_redacted_whole(terms, text, digits):
    """Registered phones share one regex prefix (`registry._compiled`); where two numbers
    overlap, the match may end inside a number, and growing it over the adjacent digit groups
    (up to the three separators a registered number may have between digits) must still take
    every digit of the number out: the registry alone (the phone pattern would also catch these),
    and the whole guard."""
    from floe_jax.inference.privacy.registry import RegisteredDetector

    assert "".join(c for c in text if c.isdigit()) == digits
    (span,) = RegisteredDetector(terms).find(text)
    assert "".join(c for c in span.text if c.isdigit()) == digits, span
    sent = PrivacyDetector(terms=terms).screen(text).text
    assert not any(c.isdigit() for c in sent), sent


def test_shared_phone_prefix_covers_what_one_pattern_per_number_covers():
    """The shared-prefix pattern against one `phone_pattern` per registered number (the
    definition): over texts built from numbers contained in one another, written with varied
    separators and country prefixes, every digit the per-number patterns find is in a span of
    the detector's."""
    import random

    import regex

    from floe_jax.inference.privacy.normalize import normalize
    from floe_jax.inference.privacy.registry import phone_pattern

    rng = random.Random(0)
    seps = ["", " ", "-", ".", " - ", "/", "()"]
    for _ in range(300):
        base = "".join(rng.choice("0123456789") for _ in range(12))
        terms = sorted({base[i : i + rng.randint(7, 10)] for i in range(rng.randint(1, 4))})
        digits = base[rng.randint(0, 3) :][: rng.randint(7, 12)]
        cut = sorted(rng.sample(range(1, len(digits)), 2))
        written = rng.choice(seps).join([digits[: cut[0]], digits[cut[0] : cut[1]]])
        written += rng.choice(seps) + digits[cut[1] :]
        text = f"{rng.choice(['call ', 'ring +1 ', 'n:'])}{written} now"
        spans = PrivacyDetector(terms=terms).find(text)
        norm = normalize(text).text
        for t in terms:
            for m in regex.finditer(phone_pattern(t), norm):
                for i in range(m.start(), m.end()):
                    if norm[i].isdigit():
                        assert any(s.start <= i < s.end for s in spans), (terms, text, spans)
