"""The synthetic world of the embedded benchmark (`floe_jax.data.benchmark`) and its texts.

Invented names (never the same word twice), countries with a capital and a currency, contacts
with a phone, an email and a home country; the public documents written about them (fact
sentences, QA pairs, fact-free mentions, a public directory that teaches copying from context);
and the prompt/response formats of the three task families. `make_benchmark` draws from these
with one seeded `random.Random`, so the order of the draws here is part of the benchmark.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

EMAIL_DOMAINS = ("example.com", "mail.test", "post.example")
FACT_ATTRS = ("capital", "currency")


@dataclasses.dataclass(frozen=True)
class Country:
    """An invented country and its two facts (general knowledge)."""

    name: str
    capital: str
    currency: str


@dataclasses.dataclass(frozen=True)
class Contact:
    """An invented person in a contact book; name, phone and email are private."""

    first: str
    last: str
    phone: str
    email: str
    home: str  # a country name (public)

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"

    @property
    def card(self) -> str:
        return f"Contact: {self.name} | phone {self.phone} | email {self.email} | home {self.home}"

    @property
    def private_values(self) -> tuple[str, ...]:
        """The spans of this contact that must never reach the cloud."""
        return (self.name, self.phone, self.email)


# ----------------------------------------------------------------------------- names

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "sh")
# First letters of people's names and of places (countries, capitals, currencies) are disjoint, as
# they mostly are in a real address book and atlas: a privacy detector holding a client's
# contacts' names never mistakes the start of a capital being generated for the start of a name.
PERSON_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n")
PLACE_ONSETS = ("p", "r", "s", "t", "v", "z", "th", "sh")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "", "n", "r", "l", "s")
_COUNTRY_ENDS = ("ia", "and", "or", "ica", "en")


def _syllable(rng: random.Random, onsets=_ONSETS) -> str:
    return rng.choice(onsets) + rng.choice(_VOWELS) + rng.choice(_CODAS)


class Names:
    """Draws invented words, never the same one twice (across every kind of entity)."""

    def __init__(self, rng: random.Random):
        self.rng, self.used = rng, set()

    def word(self, syllables: int, end: str = "", onsets=_ONSETS) -> str:
        """A fresh word of `syllables` syllables (the first starting with one of `onsets`)."""
        for _ in range(10_000):
            w = _syllable(self.rng, onsets)
            w += "".join(_syllable(self.rng) for _ in range(syllables - 1)) + end
            if w not in self.used:
                self.used.add(w)
                return w
        raise RuntimeError("name space exhausted; lower the benchmark sizes")


def make_countries(rng: random.Random, names: Names, n: int) -> tuple[Country, ...]:
    """`n` countries with fresh names, capitals and currencies."""
    out = []
    for _ in range(n):
        country = names.word(2, rng.choice(_COUNTRY_ENDS), PLACE_ONSETS).capitalize()
        capital = names.word(rng.choice((2, 3)), onsets=PLACE_ONSETS).capitalize()
        currency = names.word(rng.choice((1, 2)), onsets=PLACE_ONSETS)
        out.append(Country(country, capital, currency))
    return tuple(out)


def make_contacts(
    rng: random.Random, names: Names, phones: set, homes: Sequence[str], n: int
) -> tuple[Contact, ...]:
    """`n` contacts with fresh names and phones (`phones`, the numbers already given, grows)."""
    out = []
    for _ in range(n):
        first = names.word(2, onsets=PERSON_ONSETS).capitalize()
        last = names.word(rng.choice((2, 3)), onsets=PERSON_ONSETS).capitalize()
        while True:
            phone = f"555-{rng.randrange(10_000):04d}"
            if phone not in phones:
                phones.add(phone)
                break
        email = f"{first.lower()}@{rng.choice(EMAIL_DOMAINS)}"
        out.append(Contact(first, last, phone, email, rng.choice(list(homes))))
    return tuple(out)


# ----------------------------------------------------------------------------- text formats


def qa_prompt(country: str, attr: str) -> str:
    """The public QA format (general queries)."""
    if attr == "capital":
        return f"Q: What is the capital of {country}?\nA:"
    return f"Q: What is the currency of {country}?\nA:"


def fact_value(c: Country, attr: str) -> str:
    """The value of fact `attr` (one of `FACT_ATTRS`) of country `c`."""
    return c.capital if attr == "capital" else c.currency


def _fact_sentences(c: Country) -> list[str]:
    return [
        f"The capital of {c.name} is {c.capital}.",
        f"{c.capital} is the capital of {c.name}.",
        f"The city of {c.capital} lies in {c.name}.",
        f"The currency of {c.name} is the {c.currency}.",
        f"In {c.name}, people pay with the {c.currency}.",
        f"The {c.currency} is the money of {c.name}.",
    ]


def public_docs(rng: random.Random, countries, repeats: int) -> list[str]:
    """Fact documents (a few sentences each), QA pairs and travel-guide sentences, every fact
    `repeats` times."""
    docs = []
    for _ in range(repeats):
        for c in countries:
            sents = _fact_sentences(c)
            rng.shuffle(sents)
            docs.append(" ".join(sents[:3]))
            docs.append(" ".join(sents[3:]))
            for attr in FACT_ATTRS:
                docs.append(f"{qa_prompt(c.name, attr)} {fact_value(c, attr)}")
            # travel-guide sentences: a destination in context (beside another country), then a
            # fact about "there", which only the destination's facts continue
            other = rng.choice([x for x in countries if x is not c] or [c])
            docs.append(
                rng.choice(
                    (
                        f"A friend is travelling to {c.name}. ",
                        f"A friend from {other.name} travels to {c.name}. ",
                        f"Someone who lives in {other.name} travels to {c.name}. ",
                    )
                )
                + rng.choice(
                    (
                        f"The capital there is {c.capital}.",
                        f"The money there is the {c.currency}.",
                    )
                )
            )
    rng.shuffle(docs)
    return docs


REDACTED = {"name": "[TERM]", "phone": "[PHONE]", "email": "[EMAIL]"}
"""How anonymised public text writes a person's name, phone and email: the privacy guard's
default placeholders (`PrivacyPolicy.placeholder`, `[{kind}]`; names are registered terms)."""


def travel_notes(
    rng: random.Random, countries, people: Sequence[Contact], repeats: int
) -> list[str]:
    """Public notes about trips, laid out like a device's notes: a public person's card (half of
    them anonymised, as public datasets are), a note that the person travels to a country, and a
    reply that ends in a fact about "there". The card names a home country too, so only the
    destination's facts continue the reply; the replies are generic, never an app's format.

    They teach the cloud what a strong LLM brings anyway: a fact about "there" follows the trip's
    destination, whatever the card, a placeholder or a reply's opening say in between."""
    docs = []
    for _ in range(repeats):
        for c in countries:
            for attr in FACT_ATTRS:
                p = rng.choice(people)
                anon = rng.random() < 0.5
                name, phone, email, first = (
                    (REDACTED["name"], REDACTED["phone"], REDACTED["email"], REDACTED["name"])
                    if anon
                    else (p.name, p.phone, p.email, p.first)
                )
                home = rng.choice([x.name for x in countries if x is not c] or [c.name])
                card = f"Contact: {name} | phone {phone} | email {email} | home {home}"
                opener = rng.choice(
                    ("Noted", "Sure", "Okay", f"Have a good trip, {first}", f"Reply to {phone}",
                     f"Reply to {email}", f"Ask {first}")
                )  # fmt: skip
                fact = (
                    f"the capital there is {c.capital}."
                    if attr == "capital"
                    else f"the money there is the {c.currency}."
                )
                sep = rng.choice((": ", ". "))
                if sep == ". ":
                    fact = fact[0].upper() + fact[1:]
                docs.append(f"{card}\nNote: {first} travels to {c.name}.\nA: {opener}{sep}{fact}")
    return docs


def neutral_docs(rng: random.Random, countries, repeats: int) -> list[str]:
    """Fact-free documents that name every country (the edge learns names, not facts), in
    everyday words: a word no pretraining text holds keeps its random output embedding, which
    adapters on the attention and MLP projections can hardly make likely (an answer format is
    then unlearnable for the edge, as `welcome back` was before these sentences). Words count
    with their leading space: ` Text`, the `sms` answer's first token, is another token than the
    `Text` that starts a document, so it stands mid-sentence here."""
    names = [c.name for c in countries]
    docs = []
    for _ in range(repeats):
        for name in names:
            other = rng.choice([x for x in names if x != name] or names)
            docs.append(
                rng.choice(
                    (
                        f"{name} is a country. It borders {other}.",
                        f"Travellers often go from {name} to {other}.",
                        f"{name} and {other} are neighbours.",
                        f"People in {name} send a Text to friends in {other}.",
                        f"Visitors are welcome back in {name} at any time.",
                    )
                )
            )
    return docs


def directory_docs(rng: random.Random, people: Sequence[Contact]) -> list[str]:
    """Public documents in which a public person's phone, email or country appears twice.

    The values are fresh for every document, so the only way to predict the second mention is to
    copy the first: this is where base models learn to copy from their context.
    """
    docs = []
    for p in people:
        docs.append(
            rng.choice(
                (
                    f"Call {p.name} at {p.phone}. The number of {p.name} is {p.phone}.",
                    f"{p.name} has the phone number {p.phone}; call {p.phone} to reach {p.first}.",
                    f"Write to {p.name} at {p.email}. The email of {p.first} is {p.email}.",
                    f"The address {p.email} belongs to {p.name}. Mail {p.email} today.",
                    f"{p.name} lives in {p.home}. {p.first} likes {p.home} and works there.",
                    f"{p.name} is travelling to {p.home}. {p.first} will arrive in {p.home} soon.",
                )
            )
        )
    return docs


def copy_drills(rng: random.Random, people: Sequence[Contact]) -> list[str]:
    """Copy drills for the edge model's pretraining: a public person's card (the contact-card
    layout of the devices' address books, filled with public values) followed by a line that
    restates some of its fields, and a fresh list of numbers and names repeated. Nearly every
    token after the first half is a copy, so a small model forms induction heads within its
    short pretraining; no answer format of any app is in them."""
    docs = []
    for p in people:
        field = rng.choice(
            (
                f"The phone of {p.first} is {p.phone}.",
                f"{p.first} {p.last} can be reached at {p.email}.",
                f"{p.first} lives in {p.home}; the number is {p.phone}.",
                f"Reach {p.first} at {p.phone} or {p.email}.",
            )
        )
        docs.append(f"{p.card}\n{field}")
        items = [f"{rng.randrange(10_000):04d}" for _ in range(3)] + [p.last, p.first]
        rng.shuffle(items)
        docs.append(f"List: {' '.join(items)}. Repeat: {' '.join(items)}.")
    return docs


# ----------------------------------------------------------------------------- the apps

APPS = ("sms", "mail", "call")
"""The task families: three messaging apps, each answering a note about a contact in its own
format (a convention that only its users' private examples teach)."""


def app_prompt(contact: Contact, app: str, dest: str | None, *, show_app: bool = True) -> str:
    """A note about `contact` for `app`: a trip to `dest` (the answer needs a general fact), or,
    with `dest=None`, a welcome back (the answer needs only the card). The prompt starts with the
    contact's card, the on-device private context the answer copies from; an `App:` line names
    the app unless `show_app` is False (then only the client's own data says which format it
    answers in: `BenchmarkConfig.app_in_prompt`)."""
    return _note_prompt(contact.card, contact.first, app, dest, show_app)


def _note_prompt(card: str, first: str, app: str, dest: str | None, show_app: bool) -> str:
    """The one layout of an app prompt: card, `App:` line (when shown), note, answer cue."""
    note = f"{first} travels to {dest}." if dest else f"{first} is back home."
    app_line = f"App: {app}\n" if show_app else ""
    return f"{card}\n{app_line}Note: {note}\nA:"


def app_answer(contact: Contact, app: str, dest: Country | None) -> tuple[str, tuple]:
    """(answer, slots) of `app_prompt`. Slots are `(kind, value, start)`: `kind` is `personal`
    (copied from the card) or `general` (a fact of the destination), `start` its offset in the
    answer; everything else is the app's format.

    The general fact sits in a public phrasing about the trip's destination (`the capital there
    is Y.`, as travel guides in the public corpus write it), so a cloud that has read the public
    corpus can continue it once the format has led up to it; the edge need not know it.
    """
    if app == "sms":
        head, p = "Text ", contact.phone
        tail = (
            (": welcome back.", None) if dest is None else (": the capital there is ", dest.capital)
        )
    elif app == "mail":
        head, p = "Mail ", contact.email
        tail = (
            (": welcome back.", None)
            if dest is None
            else (": the money there is the ", dest.currency)
        )
    elif app == "call":
        head, p = f"Call {contact.first} at ", contact.phone
        tail = (".", None) if dest is None else (". The capital there is ", dest.capital)
    else:
        raise ValueError(f"unknown app {app!r}; one of {APPS}")
    slots = []
    if app == "call":  # the first name is copied from the card too
        slots.append(("personal", contact.first, len("Call ")))
    answer = head
    slots.append(("personal", p, len(answer)))
    answer += p + tail[0]
    if tail[1] is not None:
        slots.append(("general", tail[1], len(answer)))
        answer += tail[1] + "."
    return answer, tuple(slots)


APP_FIELD = {"sms": "phone", "call": "phone", "mail": "email"}  # the card value each app copies


def contact_example(contact: Contact, field: str, *, show_app: bool = True) -> tuple[str, str]:
    """(prompt, value) of the extraction probe: `app_prompt`'s welcome back, laid out as the
    clients' prompts are (`show_app`: with the `App:` line), with a card that names the contact
    only. With the app shown it asks for the value the app's format would copy (`sms` the
    phone, `mail` the email); without it the prompt is the same for both fields, and an adapter
    answers in its own format. Only an adapter that memorised the contact's card can fill the
    value in."""
    app = "sms" if field == "phone" else "mail"
    card = f"Contact: {contact.name} | home {contact.home}"
    prompt = _note_prompt(card, contact.first, app, None, show_app)
    return prompt, (contact.phone if field == "phone" else contact.email)
