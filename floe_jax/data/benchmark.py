"""The embedded benchmark: a synthetic world, private contact cards, three app formats.

Built so that Floe's central claim (Tian et al., 2026, arXiv 2602.14302: a federated,
task-specialised edge SLM fused token by token with a black-box cloud LLM beats each alone) is
testable with tiny models on a CPU. A correct answer interleaves tokens only the edge can supply
with tokens only the cloud can supply:

- *General knowledge* (a country's capital and currency) lives in public text. The cloud model is
  pretrained on all of it; the edge base model only on the facts of the *local* countries
  (`edge_fact_fraction`), plus fact-free text that names every country. Test queries ask about
  the other countries only, so the edge cannot know their facts.
- *Personal knowledge* sits in the prompt's private context, a contact card on the device
  (`Contact: Mira Okafor | phone 555-0142 | email mira.okafor@example.com | home Zorbia`), and must
  be copied. The cloud sees the prompt only after the privacy detector has redacted the private
  spans (`Query.private_spans`: the name, phone and email as they occur in the prompt).
- *Answer formats* are conventions of three messaging apps (`world.APPS`), taught only by the
  clients' private examples; each client mostly uses one app, so clients form task clusters.
  The prompt does not name the app (`app_in_prompt=False`, the default): which format a client
  answers in is its own convention, learnt from its own data, so one adapter averaged over every
  client cannot know it and a task-clustered one can (federated specialisation). With
  `app_in_prompt=True` an `App: sms` line names it, and one shared adapter can learn all three.

    Contact: Mira Okafor | phone 555-0142 | email mira.okafor@example.com | home Zorbia
    Note: Mira travels to Quentor.
    A: Text 555-0142: the capital there is Velmar.

Query types: `general` (the public QA format, `"Q: What is the capital of Quentor?\\nA:"`: the cloud
alone answers), `personal` (a welcome back in the client's app: format + card, the edge alone
answers) and `both` (a trip: format + card + a fact: neither alone, nor any router that sends
whole queries to one side, answers). Each answer's *slots* (`Query.slots`) mark which characters
are copied from the card (`personal`) or are a fact (`general`); the rest is format, so
`score_slots` can say which side failed.

Everything is generated from one seed with `random.Random`: the same seed and sizes give
byte-identical data on every machine. The world's entities and texts live in
`floe_jax.data.world`; this module holds the config, the records, the generator and the scoring.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence

from floe_jax.config import ConfigError
from floe_jax.data.world import (
    APPS,
    FACT_ATTRS,
    Contact,
    Country,
    Names,
    app_answer,
    app_prompt,
    copy_drills,
    directory_docs,
    fact_value,
    make_contacts,
    make_countries,
    neutral_docs,
    public_docs,
    qa_prompt,
    travel_notes,
)

QUERY_TYPES = ("general", "personal", "both")
TASKS = APPS  # a client's task family is the app it mostly uses
SLOT_KINDS = ("format", "personal", "general")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchmarkConfig:
    """Sizes of the embedded benchmark.

    Attributes:
      seed: the generator's seed; same seed and sizes, byte-identical benchmark.
      num_countries: entities of the synthetic world (each: capital, currency).

    The pretraining cache is keyed on the corpora's tokens, not on these fields: a field that
    only changes the private data or the queries reuses the pretrained models.
      edge_fact_fraction: share of countries whose facts the edge base model is pretrained on.
      public_repeats: how many times each fact is stated (in random phrasings) in the public corpus.
      num_clients: simulated edge devices.
      contacts_per_client: contacts used in a client's private training examples.
      test_contacts_per_client: held-out contacts used only in test queries.
      examples_per_client: private (prompt, response) training examples per client.
      main_task_fraction: share of a client's app examples from its own app (the rest from
        the other apps). With the app not in the prompt, the rest is label noise: the same
        kind of prompt answered in another app's format.
      app_in_prompt: an `App:` line in each private example's and query's prompt names the app
        whose format the answer takes. False (the default): the prompt does not say, so the
        format is the client's convention (see the module docstring). The tokenizer's format
        text (`format_docs`) names the app either way, so both settings share one tokenizer and
        one pretraining cache.
      trivia_fraction: share of a client's examples in the public QA format (about local
        countries, whose facts the edge knows), so the adapter keeps answering general queries
        in that format: with the app not in the prompt and 5% of QA, a cluster's adapter wrote
        its app's format on public questions too (`Text 555-6611: the capital there is ...`).
      personal_fraction: share of a client's app examples that are welcome-backs (the rest are
        trips to local countries).
      queries_per_type: test queries of each type (general, personal, both).
      directory_docs: public documents about invented public people (phone, email, country),
        each value repeated, so base models learn to copy strings from their context.
      copy_drills: the edge's extra copy practice (`world.copy_drills`, edge corpus only), one
        card and one list per drill.
      far_train_fraction: of the countries the edge base model knows nothing about, the share
        whose facts clients' own examples may state (trips there); the others are asked about
        in test queries and stated nowhere but the public corpus (only the cloud knows them).
      format_samples: dummy-contact examples (values from a disjoint pool) given to the tokenizer
        trainer so it learns the card format without seeing any client's private values.
    """

    seed: int = 0
    num_countries: int = 24
    edge_fact_fraction: float = 0.4
    public_repeats: int = 6
    num_clients: int = 6
    contacts_per_client: int = 40
    test_contacts_per_client: int = 4
    examples_per_client: int = 48
    main_task_fraction: float = 0.9
    app_in_prompt: bool = False
    trivia_fraction: float = 0.15
    personal_fraction: float = 0.4
    queries_per_type: int = 48
    directory_docs: int = 1000
    copy_drills: int = 1500
    far_train_fraction: float = 0.5
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
        for name in ("main_task_fraction", "trivia_fraction", "personal_fraction"):
            v = getattr(self, name)
            req(0.0 <= v <= 1.0, f"{name} must be in [0, 1], got {v}")
        req(
            self.num_local < self.num_countries,
            f"edge_fact_fraction={self.edge_fact_fraction} leaves no country whose facts only "
            "the cloud knows (test queries ask about those)",
        )
        req(self.directory_docs >= 0, f"directory_docs must be >= 0, got {self.directory_docs}")
        req(self.copy_drills >= 0, f"copy_drills must be >= 0, got {self.copy_drills}")
        req(
            0.0 <= self.far_train_fraction < 1.0,
            f"far_train_fraction must be in [0, 1), got {self.far_train_fraction}",
        )
        req(self.format_samples >= 0, f"format_samples must be >= 0, got {self.format_samples}")
        req(
            isinstance(self.app_in_prompt, bool),
            f"app_in_prompt must be true or false, got {self.app_in_prompt!r}",
        )

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
      task: the app (`sms`, `mail`, `call`), or `trivia` for general queries.
      client: the client that asks (whose adapter / cluster and private terms apply).
      private_spans: every private string that occurs in `prompt` (empty for general queries).
      facts: the world facts the answer uses, as `(country, attribute, value)` tuples.
      slots: `(kind, value, start)` of each answer slot (`world.app_answer`): `personal` values
        copied from the card and `general` facts; the rest of the answer is format.
    """

    prompt: str
    answer: str
    qtype: str
    task: str
    client: int
    private_spans: tuple[str, ...]
    facts: tuple[tuple[str, str, str], ...] = ()
    slots: tuple[tuple[str, str, int], ...] = ()

    def char_kinds(self) -> list[str]:
        """The slot kind of every character of `answer` (`format` outside the slots)."""
        kinds = ["format"] * len(self.answer)
        for kind, value, start in self.slots:
            kinds[start : start + len(value)] = [kind] * len(value)
        return kinds


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
      client_tasks: each client's main app (its task family).
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
        """What client `client` registers with its privacy detector: every contact's name, phone
        and email (names no pattern can find; phones and emails are registered too, so they are
        matched even where their pattern would not be)."""
        return tuple(v for c in self.client_contacts[client] for v in c.private_values)

    def queries_of(self, qtype: str) -> tuple[Query, ...]:
        return tuple(q for q in self.queries if q.qtype == qtype)

    def pooled_examples(self) -> tuple[Example, ...]:
        """Every client's private examples together (for centralized checks; the demo's
        centralized baseline pools them per task family)."""
        return tuple(e for ex in self.client_examples for e in ex)


# ----------------------------------------------------------------------------- generator


def make_benchmark(config: BenchmarkConfig = BenchmarkConfig()) -> Benchmark:
    """Generates the benchmark deterministically from `config` (seed and sizes)."""
    rng = random.Random(f"floe-benchmark-{config.seed}")
    names = Names(rng)
    countries = make_countries(rng, names, config.num_countries)
    local = tuple(c.name for c in rng.sample(countries, config.num_local))
    local_set = set(local)
    homes = [c.name for c in countries]

    phones: set[str] = set()
    public = public_docs(rng, countries, config.public_repeats)
    neutral = neutral_docs(rng, countries, max(1, config.public_repeats // 2))
    people = make_contacts(rng, names, phones, homes, config.directory_docs)
    neutral += directory_docs(rng, people)
    local_countries = [c for c in countries if c.name in local_set]
    unknown = [c for c in countries if c.name not in local_set]
    n_seen = min(len(unknown) - 1, round(config.far_train_fraction * len(unknown)))
    seen, far = unknown[:n_seen], unknown[n_seen:]  # trips in private data / test queries only
    drillers = make_contacts(rng, names, phones, homes, config.copy_drills)
    edge = public_docs(rng, local_countries, config.public_repeats) + neutral
    edge += copy_drills(rng, drillers)
    rng.shuffle(edge)
    # the notes draw from their own stream; the edge corpus is already drawn and shuffled above
    notes_rng = random.Random(f"floe-benchmark-{config.seed}-notes")
    public = public + neutral + travel_notes(notes_rng, countries, people, config.public_repeats)
    rng.shuffle(public)

    client_tasks, client_contacts, client_examples = [], [], []
    for k in range(config.num_clients):
        app = APPS[k % len(APPS)]
        train_c = make_contacts(rng, names, phones, homes, config.contacts_per_client)
        test_c = make_contacts(rng, names, phones, homes, config.test_contacts_per_client)
        examples = [
            _train_example(rng, config, app, train_c, local_countries, local_countries + seen)
            for _ in range(config.examples_per_client)
        ]
        client_tasks.append(app)
        client_contacts.append(train_c + test_c)
        client_examples.append(tuple(examples))

    # test queries: held-out contacts in the asking client's own app, facts only the cloud knows
    queries = []
    for qtype in QUERY_TYPES:
        for i in range(config.queries_per_type):
            client = i % config.num_clients
            held_out = client_contacts[client][config.contacts_per_client :]
            queries.append(_query(rng, qtype, client, client_tasks[client], held_out, far,
                                  show_app=config.app_in_prompt))  # fmt: skip

    # Tokenizer-only text: the private formats with dummy values from a disjoint pool. Its own
    # rng keeps the benchmark independent of `format_samples`; the used-name and phone sets carry
    # over, so no dummy value equals a client's private value.
    dummy_rng = random.Random(f"floe-benchmark-format-{config.seed}")
    dummy_names = Names(dummy_rng)
    dummy_names.used = set(names.used)
    dummy = make_contacts(dummy_rng, dummy_names, set(phones), homes, config.format_samples)
    fmt = []
    for c in dummy:
        app = dummy_rng.choice(APPS)
        dest = dummy_rng.choice([None, dummy_rng.choice(countries)])
        fmt.append(f"{app_prompt(c, app, dest and dest.name)} {app_answer(c, app, dest)[0]}")

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


def _train_example(rng, config, app, contacts, local_countries, destinations) -> Example:
    """One private example: public QA about a local country, or a note in an app (the client's
    own with probability `main_task_fraction`) about a training contact, a trip to one of
    `destinations` (the local countries and the far ones clients have been to: never a country
    the test queries ask about)."""
    if rng.random() < config.trivia_fraction:
        c = rng.choice(local_countries)
        attr = rng.choice(FACT_ATTRS)
        return Example(qa_prompt(c.name, attr), f" {fact_value(c, attr)}", "trivia")
    if rng.random() >= config.main_task_fraction:
        app = rng.choice([a for a in APPS if a != app])
    contact = rng.choice(contacts)
    dest = None if rng.random() < config.personal_fraction else rng.choice(destinations)
    answer, _ = app_answer(contact, app, dest)
    prompt = app_prompt(contact, app, dest and dest.name, show_app=config.app_in_prompt)
    return Example(prompt, f" {answer}", app)


def _query(rng, qtype, client, app, contacts, far, *, show_app: bool) -> Query:
    if qtype == "general":
        c, attr = rng.choice(far), rng.choice(FACT_ATTRS)
        value = fact_value(c, attr)
        return Query(qa_prompt(c.name, attr), value, qtype, "trivia", client, (),
                     ((c.name, attr, value),), (("general", value, 0),))  # fmt: skip
    contact = rng.choice(contacts)
    dest = rng.choice(far) if qtype == "both" else None
    answer, slots = app_answer(contact, app, dest)
    facts = ()
    if dest is not None:
        attr = "currency" if app == "mail" else "capital"
        facts = ((dest.name, attr, fact_value(dest, attr)),)
    prompt = app_prompt(contact, app, dest and dest.name, show_app=show_app)
    spans = tuple(v for v in contact.private_values if v in prompt)
    return Query(prompt, answer, qtype, app, client, spans, facts, slots)


# ----------------------------------------------------------------------------- scoring


def normalize(text: str) -> str:
    """What exact match compares: surrounding whitespace stripped, inner runs collapsed."""
    return " ".join(text.split())


def score_slots(prediction: str, query: Query) -> dict[str, bool]:
    """Which parts of `query`'s answer `prediction` got right: `format` (the text between the
    slots, with any slot contents; app queries only), and `personal` / `general` (every slot of
    that kind holds its value: at its place when the format matched, else anywhere as a whole
    word). Kinds the answer does not have are left out."""
    pred, out = normalize(prediction), {}
    pieces, last = [], 0
    for _, value, start in sorted(query.slots, key=lambda s: s[2]):
        pieces.append(re.escape(query.answer[last:start]))
        last = start + len(value)
    pieces.append(re.escape(query.answer[last:]))
    m = re.fullmatch("(.+?)".join(pieces), pred)  # answers hold single spaces only
    if query.qtype != "general":
        out["format"] = m is not None
    got: dict[str, list[bool]] = {}
    for i, (kind, value, _) in enumerate(sorted(query.slots, key=lambda s: s[2])):
        ok = m.group(i + 1) == value if m else re.search(
            rf"(?<!\w){re.escape(value)}(?!\w)", pred) is not None  # fmt: skip
        got.setdefault(kind, []).append(ok)
    out.update({k: all(v) for k, v in got.items()})
    return out


def score(predictions: Sequence[str], queries: Sequence[Query]) -> dict[str, float]:
    """Exact-match accuracy per query type and overall (the mean over every query), and the
    accuracy of each slot kind (`slot_format`, `slot_personal`, `slot_general`: over the queries
    that have it, see `score_slots`).

    Returns a dict with `general`, `personal`, `both`, `overall` (accuracies in [0, 1]; a type
    with no queries is left out), the `slot_<kind>` accuracies and `n_<type>` / `n_overall`
    counts.
    """
    if len(predictions) != len(queries):
        raise ValueError(f"{len(predictions)} predictions for {len(queries)} queries")
    hits: dict[str, list[bool]] = {}
    slots: dict[str, list[bool]] = {}
    for pred, q in zip(predictions, queries, strict=True):
        hits.setdefault(q.qtype, []).append(normalize(pred) == normalize(q.answer))
        for kind, ok in score_slots(pred, q).items():
            slots.setdefault(kind, []).append(ok)
    out: dict[str, float] = {}
    for t in QUERY_TYPES:
        if t in hits:
            out[t] = sum(hits[t]) / len(hits[t])
            out[f"n_{t}"] = len(hits[t])
    every = [h for v in hits.values() for h in v]
    out["overall"] = sum(every) / len(every) if every else 0.0
    out["n_overall"] = len(every)
    for kind in SLOT_KINDS:
        if kind in slots:
            out[f"slot_{kind}"] = sum(slots[kind]) / len(slots[kind])
    return out
