"""The evasion corpus and the ordinary text of `test_privacy_evasion.py`.

Cases are `Case(kind, form, values, registered)`: a way of writing a private value (`form`), the
values whose letters and digits must not reach the cloud (`values`, for the independent recorder
check), and whether the value is registered with the detector (a contact's name, phone, email,
address) or must be found by its shape alone. Hand-written cases list the evasions the issue
reports and more; generated ones compose case changes, whitespace, invisible characters,
look-alike letters and fullwidth forms at random (seeded).
"""

from __future__ import annotations

import dataclasses
import random

NAME, FIRST, LAST = "Mira Okafor", "Mira", "Okafor"
PHONE = "+1 (555) 014-2000"
EMAIL = "mira.okafor@example.com"
ADDRESS = "12 Harbour Lane"
NAME2, PHONE2, EMAIL2, ADDRESS2 = "Dolores O'Neil", "555-0199", "d.oneil@corp-x.org", "9 Elm Road"
REGISTERED = (NAME, PHONE, EMAIL, ADDRESS, NAME2, PHONE2, EMAIL2, ADDRESS2)

NAME_VALUES = (NAME, FIRST, LAST)
NAME2_VALUES = (NAME2, "Dolores", "O'Neil")
PHONE_VALUES = (PHONE, "555 014 2000")
EMAIL_VALUES = (EMAIL,)
ADDRESS_VALUES = (ADDRESS,)

ZW = ("\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad")  # invisible, soft hyphen
SPACES = (" ", "  ", "\t", "\u00a0", "\u2009", "\u202f", "\u3000", " \n ")
CYRILLIC = {"a": "а", "e": "е", "o": "о", "p": "р", "c": "с", "x": "х", "y": "у", "i": "і",
            "M": "М", "O": "О", "K": "К", "A": "А", "E": "Е", "H": "Н", "T": "Т"}  # fmt: skip
GREEK = {"o": "ο", "O": "Ο", "M": "Μ", "K": "Κ", "A": "Α", "E": "Ε", "i": "ι", "N": "Ν"}
DASHES = ("-", "\u2013", "\u2014", "\u2011", "\u2212")  # hyphen, en, em, non-breaking, minus


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str  # name, email, phone, address
    form: str
    values: tuple[str, ...]
    registered: bool = True


def fullwidth(s: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in s)


HAND_NAMES = [
    "Mira Okafor", "Okafor, Mira", "Okafor Mira", "Okafor", "Mira", "MIRA OKAFOR",
    "mira okafor", "mIrA oKaFoR", "Mira  Okafor", "Mira\tOkafor", "Mira\u00a0Okafor",
    "Mira\nOkafor", "Mi\u200bra Oka\u200bfor", "Oka\u00adfor", "Мira Оkafor", "Mirа Okаfor",
    "Μira Οkafor", fullwidth("Mira Okafor"), "Mira.Okafor", "Mira-Okafor", "Mira_Okafor",
    "MiraOkafor", "O.k.a.f.o.r", "Oka-for", "O k a f o r", "Okáfor", "Mïra Ökafor",
    "Okafor,Mira", "OKAFOR, mira", "M i r a  O k a f o r", "Mira \u200d Okafor",
    "Dolores O'Neil", "Dolores O’Neil", "O'Neil, Dolores", "ONeil", "O-Neil", "dolores oneil",
]  # fmt: skip
HAND_EMAILS = [
    "mira.okafor@example.com", "MIRA.OKAFOR@EXAMPLE.COM", "mira.okafor at example dot com",
    "mira dot okafor at example dot com", "mira.okafor [at] example [dot] com",
    "mira.okafor(at)example(dot)com", "mira.okafor {at} example {dot} com",
    "mira.okafor @ example . com", "mira . okafor @ example . com", "mira.okafor＠example.com",
    "mira.okafor@exаmple.com", "mira.oka\u200bfor@example.com", "<mira.okafor@example.com>",
    "(mira.okafor@example.com)", "mira.okafor@example.com.", fullwidth(EMAIL),
    "mira.okafor AT example DOT com", "mira okafor at example com", "d.oneil@corp-x.org",
    "d.oneil at corp-x dot org", "D.ONeil@Corp-X.org",
]  # fmt: skip
HAND_PHONES = [
    "555-014-2000", "(555) 014-2000", "+1 (555) 014-2000", "1-555-014-2000", "5550142000",
    "+15550142000", "555.014.2000", "555 014 2000", "555\u2013014\u20132000", "555—014—2000",
    "555/014-2000", "555/0142000", "5 5 5 0 1 4 2 0 0 0", "５５５-０１４-２０００",
    "555-0\u200b14-2000", "+1 555 014 2000", "001 555 014 2000", "(555)014-2000",
    "555\u2011014\u20112000", "555 - 014 - 2000", "555 014-2000", "+1.555.014.2000",
    "555-0199", "5550199", "555.0199", "555 0199", "555–0199", "5 5 5 0 1 9 9",
]  # fmt: skip
HAND_ADDRESSES = [
    "12 Harbour Lane", "12 Harbour Ln", "12 Harbour Ln.", "12, Harbour Lane", "12  harbour  lane",
    "12 HARBOUR LANE", "12 Hаrbour Lane", "12 Har\u200bbour Lane", fullwidth("12 Harbour Lane"),
    "9 Elm Road", "9 Elm Rd", "9 elm rd.",
]  # fmt: skip
# found by their shape alone (not registered)
UNREGISTERED = [
    Case("phone", "+44 20 7946 0958", ("+44 20 7946 0958",), False),
    Case("phone", "415-555-2671", ("415 555 2671",), False),
    Case("phone", "(415) 555-2671", ("415 555 2671",), False),
    Case("phone", "+1 415 555 2671", ("415 555 2671",), False),
    Case("phone", "4155552671", ("4155552671",), False),
    Case("phone", "+14155552671", ("14155552671",), False),
    Case("phone", "415.555.2671", ("415 555 2671",), False),
    Case("phone", "1-415-555-2671", ("1 415 555 2671",), False),
    Case("phone", "415\u2013555\u20132671", ("415 555 2671",), False),
    Case("phone", "+49 30 901820", ("49 30 901820",), False),
    Case("phone", "+33 1 42 68 53 00", ("33 1 42 68 53 00",), False),
    Case("phone", "1-800-555-0199", ("1 800 555 0199",), False),
    Case("phone", "555-2368", ("555 2368",), False),
    Case("email", "j.smith42@mail.org", ("j.smith42@mail.org",), False),
    Case("email", "j.smith42 at mail dot org", ("j.smith42@mail.org",), False),
    Case("email", "support@corp-x.co.uk", ("support@corp-x.co.uk",), False),
    Case("email", "first.last+tag@sub.example.net", ("first.last+tag@sub.example.net",), False),
    Case("email", "a_b-c@uni.edu", ("a_b-c@uni.edu",), False),
    Case("email", "kim.lee (at) lab (dot) io", ("kim.lee@lab.io",), False),
    Case("address", "221B Baker Street", ("221B Baker Street",), False),
    Case("address", "742 Evergreen Terrace", ("742 Evergreen Terrace",), False),
    Case("address", "1600 Pennsylvania Avenue", ("1600 Pennsylvania Avenue",), False),
    Case("address", "31 Spooner St", ("31 Spooner St",), False),
]


def _values(form_kind: str, form: str) -> tuple[str, ...]:
    if form_kind == "name":
        low = form.lower()
        return NAME2_VALUES if ("neil" in low or "dolores" in low) else NAME_VALUES
    if form_kind == "email":
        return (EMAIL2,) if "neil" in form.lower() else EMAIL_VALUES
    if form_kind == "phone":
        return (PHONE2,) if "199" in form or "1 9 9" in form else PHONE_VALUES
    return (ADDRESS2,) if "elm" in form.lower() else ADDRESS_VALUES


def disguise(s: str, rng: random.Random) -> str:
    """One random composition of the evasions: case, spacing, invisible characters, look-alike
    letters, fullwidth forms, dashes."""
    case = rng.choice(["keep", "upper", "lower", "title", "swap"])
    s = {"keep": s, "upper": s.upper(), "lower": s.lower(), "title": s.title(),
         "swap": s.swapcase()}[case]  # fmt: skip
    space = rng.choice(SPACES)
    s = s.replace(" ", space)
    if rng.random() < 0.5:
        s = s.replace("-", rng.choice(DASHES))
    if rng.random() < 0.5:
        table = rng.choice([CYRILLIC, GREEK])
        s = "".join(table.get(c, c) if rng.random() < 0.5 else c for c in s)
    if rng.random() < 0.5:
        zw = rng.choice(ZW)
        chars = list(s)
        for _ in range(rng.randint(1, 3)):
            chars.insert(rng.randrange(1, len(chars)), zw)
        s = "".join(chars)
    if rng.random() < 0.2:
        s = fullwidth(s)
    return s


def cases(n_generated: int = 160, seed: int = 0) -> list[Case]:
    out = [Case("name", f, _values("name", f)) for f in HAND_NAMES]
    out += [Case("email", f, _values("email", f)) for f in HAND_EMAILS]
    out += [Case("phone", f, _values("phone", f)) for f in HAND_PHONES]
    out += [Case("address", f, _values("address", f)) for f in HAND_ADDRESSES]
    out += UNREGISTERED
    rng = random.Random(seed)
    bases = {
        "name": ["Mira Okafor", "Okafor, Mira", "Okafor", "Mira", "Dolores O'Neil"],
        "email": [EMAIL, "mira.okafor at example dot com", "mira.okafor [at] example [dot] com"],
        "phone": ["555-014-2000", "+1 (555) 014-2000", "5550142000", "555 014 2000", "555-0199"],
        "address": ["12 Harbour Lane", "12 Harbour Ln", "9 Elm Road"],
    }
    kinds = sorted(bases)
    for i in range(n_generated):
        kind = kinds[i % len(kinds)]
        base = rng.choice(bases[kind])
        out.append(Case(kind, disguise(base, rng), _values(kind, base)))
    return out


# Contexts around a span: no digits, no brackets, no word that starts a private value.
TEMPLATES = [
    "Please call {} tomorrow about the invoice.",
    "Contact: {} | notes follow",
    "{}",
    "I wrote to {}; can you summarise the reply?",
    "Was it {}'s idea to reschedule the review?",
    "Send the draft to {}, then translate the summary into French.",
]

# Ordinary text: sentences with no private data (numbers, dates, times, prices, versions, code,
# the words "at" and "dot", capitalised words, addresses of public places written without a
# house number). Hand-written first, then generated from templates.
ORDINARY_HAND = [
    "The meeting is at 10:30 on 2024-05-17 in room 101.",
    "Version 1.2.3 fixed the crash in std::map at line 4096.",
    "We sold 12 000 units at $4.99 each, up 3.5% from 2023.",
    "Look at the dot in the middle of the screen.",
    "She looked at the dot com bubble of the late nineties.",
    "Add 2 cups of flour, then bake at 180 degrees for 35 minutes.",
    "Flight BA 117 leaves at 9:45 from gate 23.",
    "The ratio was 16:9 and the resolution 1920 by 1080.",
    "Chapter 11 starts on page 254.",
    "Use git commit -m 'fix' and then git push origin main.",
    "The answer is 42, not 24.",
    "In 1969 the first crew walked on the moon.",
    "Pi is roughly 3.14159 and e is about 2.71828.",
    "Call the function with x=5, y=10 and z=-3.",
    "The score ended 3-1 after extra time.",
    "Meet me at the station at noon.",
    "The file is at /usr/local/bin/python3.11.",
    "He lives near the harbour and walks to work.",
    "The URL example.com/docs/index.html explains it.",
    "Temperatures range from -5 to 12 degrees.",
    "The invoice total is 1,250.00 euros, due in 30 days.",
    "Order #4521 shipped on March 3.",
    "Take the A1 north, then exit 14 toward the lake.",
    "The recipe serves 4 to 6 people.",
    "The model has 7 billion parameters and 32 layers.",
    "Train for 3 epochs with a learning rate of 0.0003.",
    "The lecture covers sections 2.1 to 2.4.",
    "Her office is on the 5th floor of the library.",
    "The train from Paris arrives at 18:05.",
    "ISO 8601 dates look like 2025-01-31.",
    "The bridge is 1.7 kilometres long.",
    "Mix 1 part vinegar with 3 parts water.",
    "Payment is due by 31/12/2025.",
    "The IP of the test box changes every day.",
    "Our team at the lab released the dataset.",
    "The museum on Main Street opens at 9.",
    "Go down Baker Street and turn left.",
    "The dot product of the two vectors is zero.",
    "Thanks a lot, see you at the conference!",
    "Room 12 and room 14 are free after lunch.",
]
_SUBJECTS = ["The committee", "My neighbour", "Our teacher", "The new intern", "The author",
             "A reviewer", "The pilot", "Every student", "The chef", "Nobody"]  # fmt: skip
_VERBS = ["finished", "reviewed", "postponed", "discussed", "printed", "translated", "shared",
          "approved", "rewrote", "cancelled"]  # fmt: skip
_OBJECTS = ["the report", "chapter 7", "the budget for 2025", "3 proposals", "the slides",
            "the 10 o'clock meeting", "version 2.0 of the plan", "the map of the old town",
            "the menu", "the article on solar power"]  # fmt: skip
_TAILS = ["yesterday.", "at 4 pm.", "before the deadline.", "on Friday.", "in 20 minutes.",
          "at home.", "after lunch at 1:15.", "by the end of the week.", "for the 2nd time.",
          "last night at the dot of midnight."]  # fmt: skip


def ordinary(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    gen = {
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
        for _ in range(4 * n)
    }
    return ORDINARY_HAND + sorted(gen)[: n - len(ORDINARY_HAND)]
