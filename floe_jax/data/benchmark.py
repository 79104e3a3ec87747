"""The embedded multi-task benchmark: a synthetic world, private contact books, three task families.

Built so that Floe's claims (Tian et al., 2026, arXiv 2602.14302) are testable with tiny models on
a CPU: general knowledge lives in public text that only the (larger) cloud model is pretrained on
in full; personal knowledge and answer formats live only in the clients' private data; and some
queries need both. Everything is generated from one seed with `random.Random`, so the same seed
gives byte-identical data on every machine.

The world. `num_countries` invented countries, each with a capital and a currency. The *public
corpus* (`Benchmark.public_docs`) states every fact in several phrasings plus question/answer pairs
in the public QA format (`"Q: What is the capital of Zorbia?\\nA: Velmar"`). The cloud model is
pretrained on all of it. The edge base model is pretrained on `Benchmark.edge_docs`: the documents
about the *local* countries only (`edge_fact_fraction` of them) plus fact-free documents that name
every country, so the small model knows the formats and the names but holds less general
knowledge, as a small model trained on less data does. Both corpora also hold a public directory
of invented public people whose phone, email or country is mentioned twice per document: that is
where base models learn to copy from context (never in the private card format).

Personal data. Each client owns a contact book (names, phone numbers, emails, home countries).
A `travel` prompt starts with the contact's card, a format that appears in no public document:

    Contact: Mira Okafor | phone 555-0142 | email mira.okafor@example.com | home Zorbia
    Q: Mira Okafor is travelling to Zorbia. What is the capital there?
    A: The capital of Zorbia is Velmar.

The edge model sees the whole prompt; the cloud sees it only after the privacy detector has
redacted the private spans (`Query.private_spans`: the name, phone and email, exactly as they occur
in the prompt). Countries are not private.

Task families (a client's examples are mostly from one family, so clients form task clusters):

- `contact` (query type `personal`): recall a contact's phone or email, stated only in the
  client's own private examples (`"Q: What is the phone number of Mira Okafor?\\nA: 555-0142"`).
  Personal test queries ask what the asking client's examples state: personal knowledge.
- `travel` (type `both`): a contact's card, then "<contact> is travelling to <country>. What is
  the capital (currency) there?", answered in a private format that restates the country:
  `"The capital of Zorbia is Velmar."`. The format is personal, the capital general knowledge.
  Clients' examples ask facts of local countries only (their own region; trips abroad are asked
  `"Which country is that?"`, which states no fact), test queries ask about any country, with
  held-out contacts, so the edge alone cannot know most capitals, and the cloud
  alone does not know the answer format.
- `trivia` (type `general`): the public QA format on local countries (what a client can know).

Test queries: `general` over all countries; `personal` about facts the asking client's examples
state; `both` about held-out contacts of the asking client. `score` computes exact match per
query type. Each query lists its private spans; `Benchmark.private_terms(k)` are client `k`'s
contacts' names, the terms the PII patterns cannot find (the demo registers each contact's
name, phone and email, `Contact.private_values`).

The world's entities and the texts written about them live in `floe_jax.data.world`; this module
holds the benchmark's config and records, the generator that assembles them, and the scoring.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from floe_jax.config import ConfigError
from floe_jax.data.world import (
    FACT_ATTRS,
    Contact,
    Country,
    Names,
    contact_example,
    directory_docs,
    fact_value,
    make_contacts,
    make_countries,
    neutral_docs,
    public_docs,
    qa_prompt,
    travel_example,
    trip_example,
)

QUERY_TYPES = ("general", "personal", "both")
TASKS = ("trivia", "contact", "travel")
TASK_TYPE = {"trivia": "general", "contact": "personal", "travel": "both"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchmarkConfig:
    """Sizes of the embedded benchmark. Every field is part of the pretraining cache key.

    Attributes:
      seed: the generator's seed; same seed and sizes, byte-identical benchmark.
      num_countries: entities of the synthetic world (each: capital, currency).
      edge_fact_fraction: share of countries whose facts the edge base model is pretrained on.
      public_repeats: how many times each fact is stated (in random phrasings) in the public corpus.
      num_clients: simulated edge devices.
      contacts_per_client: contacts used in a client's private training examples.
      test_contacts_per_client: held-out contacts used only in test queries.
      examples_per_client: private (prompt, response) training examples per client.
      main_task_fraction: share of a client's examples from its own task family.
      queries_per_type: test queries of each type (general, personal, both).
      directory_docs: public documents about invented public people (phone, email, country),
        each value repeated, so base models learn to copy strings from their context.
      format_samples: dummy-contact examples (values from a disjoint pool) given to the tokenizer
        trainer so it learns the card format without seeing any client's private values.
    """

    seed: int = 0
    num_countries: int = 24
    edge_fact_fraction: float = 0.4
    public_repeats: int = 6
    num_clients: int = 6
    contacts_per_client: int = 8
    test_contacts_per_client: int = 4
    examples_per_client: int = 48
    main_task_fraction: float = 0.75
    queries_per_type: int = 48
    directory_docs: int = 400
    format_samples: int = 64

    def __post_init__(self):
        def req(ok, msg):
            if not ok:
                raise ConfigError(msg)

        req(self.num_countries >= 2, f"num_countries must be >= 2, got {self.num_countries}")
        req(
            0.0 < self.edge_fact_fraction <= 1.0,
            f"edge_fact_fraction must be in (0, 1], got {self.edge_fact_fraction}",
        )
        for name in (
            "public_repeats",
            "num_clients",
            "contacts_per_client",
            "test_contacts_per_client",
            "examples_per_client",
            "queries_per_type",
        ):
            req(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        req(
            0.0 <= self.main_task_fraction <= 1.0,
            f"main_task_fraction must be in [0, 1], got {self.main_task_fraction}",
        )
        req(self.directory_docs >= 0, f"directory_docs must be >= 0, got {self.directory_docs}")
        req(self.format_samples >= 0, f"format_samples must be >= 0, got {self.format_samples}")

    @property
    def num_local(self) -> int:
        """Countries whose facts the edge model is pretrained on (at least one)."""
        return max(1, round(self.edge_fact_fraction * self.num_countries))


@dataclasses.dataclass(frozen=True)
class Example:
    """One private training example: the model is trained on `response` given `prompt`."""

    prompt: str
    response: str
    task: str


@dataclasses.dataclass(frozen=True)
class Query:
    """One test query.

    Attributes:
      prompt: the full prompt (what the edge sees).
      answer: the exact expected response (after stripping surrounding whitespace).
      qtype: `general`, `personal` or `both`.
      task: the task family (`trivia`, `contact`, `travel`).
      client: the client that asks (whose adapter / cluster and private terms apply).
      private_spans: every private string that occurs in `prompt` (empty for general queries).
      facts: the world facts the answer uses, as `(country, attribute, value)` tuples.
    """

    prompt: str
    answer: str
    qtype: str
    task: str
    client: int
    private_spans: tuple[str, ...]
    facts: tuple[tuple[str, str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """The generated benchmark.

    Attributes:
      config: the sizes it was generated from.
      countries: the world table (all countries).
      local_countries: names of the countries whose facts the edge model is pretrained on.
      public_docs: the public corpus (cloud pretraining text).
      edge_docs: the edge base model's pretraining text: public documents about the local
        countries' facts only, plus every fact-free document (country names, public directory).
      client_tasks: each client's main task family.
      client_contacts: each client's contacts (training contacts first, then held-out ones).
      client_examples: each client's private training examples.
      queries: the test queries, every type.
      format_docs: card-format text with dummy values (for the tokenizer trainer only).
    """

    config: BenchmarkConfig
    countries: tuple[Country, ...]
    local_countries: tuple[str, ...]
    public_docs: tuple[str, ...]
    edge_docs: tuple[str, ...]
    client_tasks: tuple[str, ...]
    client_contacts: tuple[tuple[Contact, ...], ...]
    client_examples: tuple[tuple[Example, ...], ...]
    queries: tuple[Query, ...]
    format_docs: tuple[str, ...]

    @property
    def num_clients(self) -> int:
        return len(self.client_tasks)

    def country(self, name: str) -> Country:
        for c in self.countries:
            if c.name == name:
                return c
        raise KeyError(f"no country named {name!r}")

    def private_terms(self, client: int) -> tuple[str, ...]:
        """The terms client `client` registers with its privacy detector (its contacts' names).

        Phones and emails are caught by the detector's PII patterns; names need registering.
        """
        return tuple(c.name for c in self.client_contacts[client])

    def queries_of(self, qtype: str) -> tuple[Query, ...]:
        return tuple(q for q in self.queries if q.qtype == qtype)

    def pooled_examples(self) -> tuple[Example, ...]:
        """Every client's private examples together (for centralized baselines and checks)."""
        return tuple(e for ex in self.client_examples for e in ex)


# ----------------------------------------------------------------------------- generator


def make_benchmark(config: BenchmarkConfig = BenchmarkConfig()) -> Benchmark:
    """Generates the benchmark deterministically from `config` (seed and sizes)."""
    rng = random.Random(f"floe-benchmark-{config.seed}")
    names = Names(rng)
    countries = make_countries(rng, names, config.num_countries)
    local = tuple(c.name for c in rng.sample(countries, config.num_local))
    local_set = set(local)
    by_name = {c.name: c for c in countries}

    phones: set[str] = set()
    public = public_docs(rng, countries, config.public_repeats)
    neutral = neutral_docs(rng, countries, max(1, config.public_repeats // 2))
    people = make_contacts(rng, names, phones, [c.name for c in countries], config.directory_docs)
    neutral += directory_docs(rng, people)
    local_countries = [c for c in countries if c.name in local_set]
    edge = public_docs(rng, local_countries, config.public_repeats) + neutral
    rng.shuffle(edge)
    public = public + neutral
    rng.shuffle(public)

    client_tasks, client_contacts, client_examples = [], [], []
    for k in range(config.num_clients):
        task = TASKS[k % len(TASKS)]
        train_c = make_contacts(
            rng, names, phones, [c.name for c in countries], config.contacts_per_client
        )
        test_c = make_contacts(
            rng, names, phones, [c.name for c in countries], config.test_contacts_per_client
        )
        # contact-book facts in a fixed shuffled cycle, so a client's examples cover its book
        book = [(c, f) for c in train_c for f in ("phone", "email")]
        rng.shuffle(book)
        examples = []
        for _ in range(config.examples_per_client):
            t = task if rng.random() < config.main_task_fraction else rng.choice(TASKS)
            if t == "contact":
                p, r = contact_example(
                    *book[sum(e.task == "contact" for e in examples) % len(book)]
                )
                examples.append(Example(p, f" {r}", t))
            else:
                examples.append(_train_example(rng, t, train_c, local_countries, by_name))
        client_tasks.append(task)
        client_contacts.append(train_c + test_c)
        client_examples.append(tuple(examples))

    # personal queries ask what a client's own examples state; the others use held-out contacts
    known = [
        sorted({(e.prompt, e.response.strip()) for e in ex if e.task == "contact"})
        for ex in client_examples
    ]
    askers = [k for k in range(config.num_clients) if known[k]]
    if not askers:
        raise ConfigError(
            "no client has a `contact` example to ask personal queries about; raise "
            "examples_per_client or main_task_fraction"
        )
    queries = []
    for qtype in QUERY_TYPES:
        for i in range(config.queries_per_type):
            client = i % config.num_clients
            if qtype == "personal":
                client = askers[i % len(askers)]
                queries.append(_personal_query(rng, client, known[client], client_contacts))
                continue
            held_out = client_contacts[client][config.contacts_per_client :]
            queries.append(_query(rng, qtype, client, held_out, countries, by_name))

    # Tokenizer-only text: the private card format with dummy values from a disjoint pool.
    # Its own rng keeps the benchmark independent of `format_samples`; the used-name and phone
    # sets carry over, so no dummy value equals a client's private value.
    dummy_rng = random.Random(f"floe-benchmark-format-{config.seed}")
    dummy_names = Names(dummy_rng)
    dummy_names.used = set(names.used)
    dummy = make_contacts(
        dummy_rng, dummy_names, set(phones), [c.name for c in countries], config.format_samples
    )
    fmt = []
    for c in dummy:
        p, r = contact_example(c, dummy_rng.choice(("phone", "email")))
        fmt.append(f"{p} {r}")
        p, r = travel_example(c, by_name[c.home], dummy_rng.choice(FACT_ATTRS))
        fmt.append(f"{p} {r}")

    return Benchmark(
        config=config,
        countries=countries,
        local_countries=local,
        public_docs=tuple(public),
        edge_docs=tuple(edge),
        client_tasks=tuple(client_tasks),
        client_contacts=tuple(client_contacts),
        client_examples=tuple(client_examples),
        queries=tuple(queries),
        format_docs=tuple(fmt),
    )


def _train_example(rng, task, contacts, local_countries, by_name) -> Example:
    if task == "trivia":
        c = rng.choice(local_countries)
        attr = rng.choice(FACT_ATTRS)
        return Example(qa_prompt(c.name, attr), f" {fact_value(c, attr)}", task)
    contact = rng.choice(contacts)
    if task == "contact":
        p, r = contact_example(contact, rng.choice(("phone", "email")))
    elif rng.random() < 0.5:  # clients know facts of their own region only ...
        p, r = travel_example(contact, rng.choice(local_countries), rng.choice(FACT_ATTRS))
    else:  # ... and travel anywhere (which teaches reading the destination, not its facts)
        p, r = trip_example(contact, rng.choice(list(by_name.values())))
    return Example(p, f" {r}", task)


def _personal_query(rng, client, known, client_contacts) -> Query:
    prompt, answer = rng.choice(known)
    contact = next(c for c in client_contacts[client] if answer in (c.phone, c.email))
    field = "phone" if answer == contact.phone else "email"
    return Query(
        prompt, answer, "personal", "contact", client, (contact.name,),
        ((contact.name, field, answer),),
    )  # fmt: skip


def _query(rng, qtype, client, contacts, countries, by_name) -> Query:
    attr = rng.choice(FACT_ATTRS)
    if qtype == "general":
        c = rng.choice(countries)
        value = fact_value(c, attr)
        return Query(
            qa_prompt(c.name, attr), value, qtype, "trivia", client, (), ((c.name, attr, value),)
        )
    contact = rng.choice(contacts)
    spans = contact.private_values
    dest = rng.choice(countries)
    p, r = travel_example(contact, dest, attr)
    return Query(p, r, qtype, "travel", client, spans, ((dest.name, attr, fact_value(dest, attr)),))


# ----------------------------------------------------------------------------- scoring


def normalize(text: str) -> str:
    """What exact match compares: surrounding whitespace stripped, inner runs collapsed."""
    return " ".join(text.split())


def score(predictions: Sequence[str], queries: Sequence[Query]) -> dict[str, float]:
    """Exact-match accuracy per query type, and overall (the mean over every query).

    Returns a dict with `general`, `personal`, `both`, `overall` (accuracies in [0, 1]; a type
    with no queries is left out) and `n_<type>` / `n_overall` counts.
    """
    if len(predictions) != len(queries):
        raise ValueError(f"{len(predictions)} predictions for {len(queries)} queries")
    hits: dict[str, list[bool]] = {}
    for pred, q in zip(predictions, queries, strict=True):
        hits.setdefault(q.qtype, []).append(normalize(pred) == normalize(q.answer))
    out: dict[str, float] = {}
    for t in QUERY_TYPES:
        if t in hits:
            out[t] = sum(hits[t]) / len(hits[t])
            out[f"n_{t}"] = len(hits[t])
    every = [h for v in hits.values() for h in v]
    out["overall"] = sum(every) / len(every) if every else 0.0
    out["n_overall"] = len(every)
    return out
