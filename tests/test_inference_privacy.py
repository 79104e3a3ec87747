"""Privacy detector and the guard at the single exit to the cloud: a recording HTTP server on
127.0.0.1 must receive no private span over >= 1,000 generated prompts containing PII."""

import json
import random

import pytest
from _inference_util import RECORDED_VOCAB, RecordingServer

from floe_jax.inference.cloud import CloudDistribution, Prefix
from floe_jax.inference.http_cloud import HTTPCloud
from floe_jax.inference.privacy import (
    GuardedCloud,
    PrivacyDetector,
    PrivacyPolicy,
    iban_ok,
    luhn_ok,
)
from floe_jax.inference.privacy.span import MEMO
from floe_jax.memo import LRUMemo

NAMES = ["Alice Moreau", "Bogdan", "Chen Wei", "Dolores O'Neil", "Émile"]


def _luhn_card(rng: random.Random, n: int = 16) -> str:
    digits = [rng.randrange(10) for _ in range(n - 1)]
    for check in range(10):
        s = "".join(map(str, digits + [check]))
        if luhn_ok(s):
            return s
    raise AssertionError


def _iban(rng: random.Random) -> str:
    bban = "".join(str(rng.randrange(10)) for _ in range(18))
    rearranged = bban + "DE00"
    num = int("".join(str(int(c, 36)) for c in rearranged))
    return f"DE{98 - num % 97:02d}{bban}"


def _pii(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(["email", "phone", "card", "iban", "ipv4", "ipv6", "ssn", "term"])
    if kind == "email":
        user = "".join(rng.choice("abcdefghij.") for _ in range(6)).strip(".") or "x"
        return kind, f"{user}{rng.randrange(99)}@{rng.choice(['mail', 'corp-x', 'uni'])}.org"
    if kind == "phone":
        a, b, c = rng.randrange(200, 999), rng.randrange(100, 999), rng.randrange(1000, 9999)
        return kind, rng.choice([f"+1 {a}-{b}-{c}", f"({a}) {b}-{c}", f"{a}.{b}.{c}"])
    if kind == "card":
        s = _luhn_card(rng)
        return kind, rng.choice([s, " ".join(s[i : i + 4] for i in range(0, 16, 4))])
    if kind == "iban":
        s = _iban(rng)
        return kind, rng.choice([s, " ".join(s[i : i + 4] for i in range(0, len(s), 4))])
    if kind == "ipv4":
        return kind, ".".join(str(rng.randrange(256)) for _ in range(4))
    if kind == "ipv6":
        return kind, ":".join(f"{rng.randrange(65536):x}" for _ in range(8))
    if kind == "ssn":
        return (
            kind,
            f"{rng.randrange(100, 665)}-{rng.randrange(10, 99)}-{rng.randrange(1000, 9999)}",
        )
    name = rng.choice(NAMES)
    return kind, rng.choice([name, name.upper(), name.lower()])


def corpus(n: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    templates = [
        "Please write to {} about the invoice.",
        "My details: {}. Summarise the meeting notes.",
        "Can you check {}, then {} for me?",
        "Remind {} tomorrow; also translate this sentence into French.",
    ]
    for _ in range(n):
        t = rng.choice(templates)
        spans = [_pii(rng) for _ in range(t.count("{}"))]
        out.append((t.format(*(s for _, s in spans)), spans))
    return out


def test_checksums():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and not iban_ok("GB82 WEST 1234 5698 7654 33")


def test_detector_types_and_validation():
    d = PrivacyDetector(terms=["Alice Moreau"])
    text = (
        "mail bob@example.com, call +44 20 7946 0958, card 4111 1111 1111 1111, "
        "iban GB82WEST12345698765432, host 192.168.1.20 or 2001:db8::8a2e:370:7334, "
        "ssn 123-45-6789, and ALICE MOREAU says hi"
    )
    kinds = [s.kind for s in d.find(text)]
    assert kinds == ["email", "phone", "card", "iban", "ipv4", "ipv6", "ssn", "term"]
    # look-alikes that fail the checks are not flagged as such
    bad = "card 4111 1111 1111 1112, iban GB82WEST12345698765433, ip 999.1.1.1, Alicem"
    assert [s.kind for s in d.find(bad) if s.kind in ("card", "iban", "ipv4", "term")] == []
    assert d.find("use std::map at 10:30:45 on 2024-05-17") == []
    red = d.screen("write to bob@example.com now")
    assert red.action == "redact" and red.text == "write to [EMAIL] now"
    assert d.stats()["spans_by_type"] == {"email": 1}


def test_policies():
    local = PrivacyDetector().find("ring 555-0142 or 555.0143; ssn 123-45-6789, 100 2000")
    assert [(x.kind, x.text) for x in local] == [
        ("phone", "555-0142"),
        ("phone", "555.0143"),
        ("ssn", "123-45-6789"),
    ]  # 7-digit local numbers; not the SSN's tail, not two numbers with a space between
    text = "call 415-555-2671 about the cat"
    assert PrivacyDetector(PrivacyPolicy(action="allow")).screen(text).text == text
    assert PrivacyDetector(PrivacyPolicy(action="edge_only")).screen(text).action == "edge_only"
    p = PrivacyPolicy(action="redact", edge_only_types=("phone",))
    assert PrivacyDetector(p).screen(text).action == "edge_only"
    assert PrivacyDetector().screen("the cat sat").action == "allow"
    # ids without a decoder cannot be checked: kept on the edge
    assert PrivacyDetector().screen(None).action == "edge_only"


def test_memoised_results_follow_the_detector_and_its_terms():
    """`PrivacyDetector(memo=True)`: answers are memoised per (configuration, text), so a text
    screened before is judged again by whatever detector screens it now, with the terms it holds
    now; a detector without `memo` leaves the memo alone."""
    text = "Tell Mira Okafor to call 555-0142 and write mo@corp-x.org; Oka"
    MEMO.clear()
    PrivacyDetector(terms=["Mira Okafor"]).find(text)
    assert len(MEMO) == 0
    bare, client = PrivacyDetector(memo=True), PrivacyDetector(terms=["Mira Okafor"], memo=True)
    phones = PrivacyDetector(PrivacyPolicy(types=("phone",)), memo=True)
    for round_ in range(2):  # the second round is served from the memo: the same answers
        assert [s.kind for s in bare.find(text)] == ["phone", "email"]
        assert [s.kind for s in client.find(text)] == ["term", "phone", "email"]
        assert [s.kind for s in phones.find(text)] == ["phone"]
        assert bare.pending(text) == 0 and client.pending(text) == len("Oka")
        if round_ == 0:
            stored = len(MEMO)
    assert len(MEMO) == stored > 0
    client.patterns.find(text).clear()  # a caller's list is its own, not the memo's
    client.registered.find(text).clear()
    assert [s.kind for s in client.find(text)] == ["term", "phone", "email"]
    bare.register_terms(["Mira Okafor"])  # new terms: judged afresh, not from the memo
    assert [s.kind for s in bare.find(text)] == ["term", "phone", "email"]
    assert bare.pending(text) == len("Oka")


def test_lru_memo_is_bounded_by_size():
    calls = []
    memo = LRUMemo(max_size=10)
    length = lambda t: memo.get_or(t, lambda: calls.append(t) or len(t), len(t))  # noqa: E731
    assert [length(t) for t in ("abcd", "efgh", "abcd")] == [4, 4, 4]
    assert calls == ["abcd", "efgh"]  # the repeat was memoised
    length("ijkl")  # past 10: the least recently used ("efgh") goes first
    assert memo.size == 8 and len(memo) == 2
    length("efgh")
    assert calls[-1] == "efgh"  # dropped, computed again
    memo.put("big", 0, size=11)  # larger than the whole memo: not stored, nothing dropped
    assert memo.get("big") is None and len(memo) == 2
    memo.clear()
    assert memo.size == 0 and memo.get("ijkl") is None


class _Echo:
    kind = "sparse"

    def __init__(self):
        self.seen = []

    def next_token(self, prefixes):
        self.seen += list(prefixes)
        n = len(prefixes)
        return CloudDistribution.missing(n, "echo")


def test_guard_withholds_rows_and_uses_decoder():
    backend = _Echo()
    g = GuardedCloud(backend, PrivacyDetector(PrivacyPolicy(action="edge_only")),
                     decode=lambda ids: " ".join(f"w{i}" for i in ids))  # fmt: skip
    # (decoded as words: a text ending in a bare number, "1 2", is now held back under
    # edge_only, since more digits could still make it a phone number)
    out = g.next_token([Prefix(text="mail a@b.org"), Prefix(ids=(1, 2)), Prefix(text="hi")])
    assert [p.text for p in backend.seen] == ["w1 w2", "hi"]
    assert out.errors[0] == "privacy" and out.batch == 3
    assert g.detector.stats()["requests"]["edge_only"] == 1
    with pytest.raises(TypeError):
        GuardedCloud(g)


@pytest.mark.parametrize("action", ["redact", "edge_only"])
def test_recording_server_receives_no_private_span(action):
    data = corpus(1000, seed=1 if action == "redact" else 2)
    server = RecordingServer("ok")
    det = PrivacyDetector(PrivacyPolicy(action=action), terms=NAMES)
    client = HTTPCloud(
        server.url, top_k=3, timeout_s=5, max_workers=8, edge_tokenizer=RECORDED_VOCAB
    )
    guard = GuardedCloud(client, det)
    try:
        for i in range(0, len(data), 100):
            chunk = data[i : i + 100]
            out = guard.next_token([Prefix(text=t, stream=j) for j, (t, _) in enumerate(chunk)])
            assert out.batch == len(chunk)
    finally:
        guard.close()
        server.close()
    prompts = [json.loads(b)["prompt"] for b in server.bodies]
    secrets = {s for _, spans in data for _, s in spans}
    leaks = [(p, s) for p in prompts for s in secrets if s.lower() in p.lower()]
    assert leaks == []
    stats = det.stats()
    if action == "redact":
        assert len(prompts) == len(data)
        assert sum(stats["spans_by_type"].values()) >= sum(len(s) for _, s in data)
        assert "[EMAIL]" in " ".join(prompts)
    else:
        assert len(prompts) == 0  # every prompt carries PII
        assert stats["requests"]["edge_only"] == len(data)
