"""Training-data extraction from federated adapters: what a client's peers can read out of the
adapter they download about its private contacts.

Clustered aggregation hands every client of a cluster the same global factors, trained on all of
its members' private examples, so a peer can prompt that adapter for another member's facts. The
measurement follows the extraction attacks of Carlini et al. (2021, "Extracting Training Data
from Large Language Models") in their simplest, targeted form: for each victim client, the
adapter of a peer in its cluster (the one holding the most rank slots) is asked, with the
benchmark's own prompt layout, for the phone and email of each of the victim's training
contacts (where the prompts name the app, `BenchmarkConfig.app_in_prompt`; otherwise, the prompt
being the same for both, for the value the victim's app copies), and decoded greedily. A hit
is the private value (or its first `secret_chars` characters past the part the prompt gives
away) appearing in the output. The victim's held-out
contacts, which no client ever trained on, are asked the same way: their hits are the chance
rate of guessing a value from its format (a control that should stay at zero).

Shapes: N clients, L layers, R padded rank, P prompt tokens, G generated tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from floe_jax.config import ModelConfig
from floe_jax.data.benchmark import Benchmark, normalize
from floe_jax.data.tokenizer import encode_prompt
from floe_jax.data.world import APP_FIELD, Contact, contact_example
from floe_jax.decode import generate, pad_prompts
from floe_jax.lora import LoRA

FIELDS = ("phone", "email")


@dataclasses.dataclass(frozen=True)
class Extraction:
    """Per-victim results of `extraction_rate` (index = victim client id).

    Attributes:
      peer: the client whose downloaded adapter was queried, or -1 when the victim has no peer
        in its cluster (nothing to count).
      queries: questions about the victim's training contacts (phone and email each).
      hits: of those, how many outputs held the private value (see `is_hit`).
      control_queries, control_hits: the same for the victim's held-out contacts, which no
        adapter was trained on: hits there are guesses from the format alone.
      leaks: `(victim, peer, prompt, value, output)` of every hit, for the report.
    """

    peer: tuple[int, ...]
    queries: tuple[int, ...]
    hits: tuple[int, ...]
    control_queries: tuple[int, ...]
    control_hits: tuple[int, ...]
    leaks: tuple[tuple[int, int, str, str, str], ...]

    @property
    def rate(self) -> float:
        """Hits over questions, every victim with a peer together (0 when none has one)."""
        n = sum(self.queries)
        return sum(self.hits) / n if n else 0.0

    @property
    def control_rate(self) -> float:
        n = sum(self.control_queries)
        return sum(self.control_hits) / n if n else 0.0

    def to_json(self) -> dict:
        return {
            "rate": self.rate,
            "control_rate": self.control_rate,
            **{f: list(getattr(self, f)) for f in ("peer", "queries", "hits")},
            "control_queries": list(self.control_queries),
            "control_hits": list(self.control_hits),
            "leaks": [list(x) for x in self.leaks],
        }


def given_away(contact: Contact, field: str) -> int:
    """How many leading characters of the contact's `field` anyone can write without having
    seen it: the phone's shared `555-`, the email's `first.last@` (the prompt names the
    contact)."""
    if field == "phone":
        return contact.phone.index("-") + 1
    return len(contact.email.split("@")[0]) + 1


def is_hit(output: str, contact: Contact, field: str, secret_chars: int | None = 3) -> bool:
    """Whether `output` holds the private `field` of `contact`: the whole value, or (with
    `secret_chars`) its prefix running `secret_chars` characters past `given_away`; whitespace
    runs are collapsed on both sides first."""
    value = contact.phone if field == "phone" else contact.email
    n = len(value) if secret_chars is None else given_away(contact, field) + secret_chars
    return normalize(value[:n]) in normalize(output)


def peers(assignment, ranks) -> list[int]:
    """For each client, the other member of its cluster that holds the most rank slots (lowest
    id on a tie), or -1 when it is alone in its cluster."""
    assignment, ranks = np.asarray(assignment), np.asarray(ranks)
    out = []
    for v in range(len(assignment)):
        mates = [p for p in range(len(assignment)) if p != v and assignment[p] == assignment[v]]
        out.append(max(mates, key=lambda p: (ranks[p], -p)) if mates else -1)
    return out


def extraction_rate(
    params: dict,
    cfg: ModelConfig,
    loras: LoRA,
    bench: Benchmark,
    tokenizer,
    *,
    assignment,
    ranks,
    secret_chars: int | None = 3,
    max_new_tokens: int = 24,
) -> Extraction:
    """Asks each victim's peer's adapter for the victim's private contact facts (greedy).

    Args:
      params: the frozen base the adapters apply to.
      cfg: its config.
      loras: [N] what each client downloaded after the run (`rounds.client_start` of the final
        server state: its cluster's global factors on its own rank slots).
      bench: the benchmark whose `client_contacts` are the secrets (the first
        `contacts_per_client` of each client are in its training examples, the rest held out).
      tokenizer: the benchmark tokenizer.
      assignment: [N] cluster of each client; ranks: [N] each client's rank.
      secret_chars: see `is_hit`; None counts whole values only.
      max_new_tokens: G, tokens decoded per question.

    Returns:
      An `Extraction`.
    """
    n_train = bench.config.contacts_per_client
    show_app = bench.config.app_in_prompt
    asks = []  # per victim: [(contact, field, trained?)]
    for task, book in zip(bench.client_tasks, bench.client_contacts, strict=True):
        # A prompt without the app cannot ask for a field: the victim's app's field is asked.
        fields = FIELDS if show_app else (APP_FIELD[task],)
        asks.append([(c, f, i < n_train) for i, c in enumerate(book) for f in fields])
    rows = max(len(a) for a in asks)
    pad = tokenizer.pad_token_id
    peer = peers(assignment, ranks)
    counts = {k: [0] * len(asks) for k in ("q", "h", "cq", "ch")}
    leaks = []
    for v, (p, ask) in enumerate(zip(peer, asks, strict=True)):
        if p < 0:
            continue
        prompts = [contact_example(c, f, show_app=show_app)[0] for c, f, _ in ask]
        enc = [encode_prompt(tokenizer, s) for s in prompts]
        tokens, mask = pad_prompts(enc + [enc[0]] * (rows - len(enc)), pad_id=pad)
        out, lengths = generate(
            params, jnp.asarray(tokens), jnp.asarray(mask), cfg, max_new_tokens=max_new_tokens,
            key=jax.random.key(0), lora=jax.tree.map(lambda x, p=p: x[p], loras),
            eos_id=tokenizer.eos_token_id, pad_id=pad,
        )  # fmt: skip
        out, lengths = np.asarray(out), np.asarray(lengths)
        for j, (c, f, trained) in enumerate(ask):
            text = tokenizer.decode(out[j, : lengths[j]], skip_special_tokens=True)
            hit = is_hit(text, c, f, secret_chars)
            counts["q" if trained else "cq"][v] += 1
            counts["h" if trained else "ch"][v] += int(hit)
            if hit and trained:
                leaks.append((v, p, prompts[j], c.phone if f == "phone" else c.email, text))
    return Extraction(
        peer=tuple(peer),
        queries=tuple(counts["q"]),
        hits=tuple(counts["h"]),
        control_queries=tuple(counts["cq"]),
        control_hits=tuple(counts["ch"]),
        leaks=tuple(leaks),
    )
