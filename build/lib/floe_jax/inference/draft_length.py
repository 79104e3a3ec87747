"""How many tokens to draft per cloud call in speculative fused decoding
(`floe_jax.inference.speculative`): k minimises the expected cost per emitted token, from the
measured acceptance by draft position, the round trip and the edge's step time.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class DraftLength:
    """Chooses k each round from the measured run lengths of accepted drafts, round trip and
    edge step.

    Acceptance is not a coin tossed afresh at every position: a fused output alternates between
    stretches the edge predicts and tokens it does not, so a draft that survived position i is
    more likely to survive i + 1 than the pooled rate says. `survival(i)` is therefore estimated
    per position (Kaplan-Meier over rounds: of the drafts judged at position i, the share that
    passed it; a draft stopped before i is censored, not failed), shrunk towards the pooled rate
    where few rounds reached i. A round of k drafted tokens then emits on average
    `E(k) = 1 + S(1) + ... + S(k)` and costs `e * (k - ahead) + min(rtt, tau)` (tokens drafted
    during the last wait, `ahead`, are free); k minimises the cost per token.

    Attributes:
      k_max: the longest draft sent; `adapt=False` always drafts `k_max`.
      deadline_s: tau (a wait never lasts longer).
      decay: weight of the past in the running counts and averages.
      prior: pseudo-rounds pulling each position's rate towards the pooled rate.
    """

    k_max: int
    deadline_s: float
    adapt: bool = True
    decay: float = 0.9
    prior: float = 2.0
    rtt_s: float | None = None
    edge_s: float | None = None

    def __post_init__(self):
        self.passed = np.zeros(2 * self.k_max + 2)  # [i]: drafts that passed position i (1-based)
        self.judged = np.zeros(2 * self.k_max + 2)  # [i]: drafts judged at position i

    @property
    def alpha(self) -> float:
        """The pooled acceptance rate (1/2 before anything was judged)."""
        return float((self.passed.sum() + 1) / (self.judged.sum() + 2))

    def update(self, rows, rtt_s: float | None, edge_s: float | None) -> None:
        """rows: (drafted tokens kept, drafted tokens judged) of each answered row this round."""
        d = self.decay
        self.passed *= d
        self.judged *= d
        for kept, judged in rows:
            self.judged[1 : judged + 1] += 1
            self.passed[1 : kept + 1] += 1
        if rtt_s is not None:
            self.rtt_s = rtt_s if self.rtt_s is None else d * self.rtt_s + (1 - d) * rtt_s
        if edge_s is not None:
            self.edge_s = edge_s if self.edge_s is None else d * self.edge_s + (1 - d) * edge_s

    def survival(self) -> np.ndarray:
        """S(i), i = 0..2 k_max + 1: the chance a draft's first i tokens are all accepted."""
        a = self.alpha
        n = self.judged + self.prior
        rate = np.where(n > 0, (self.passed + self.prior * a) / np.maximum(n, 1e-12), a)
        rate[0] = 1.0
        return np.cumprod(rate)

    def expected_tokens(self, k: int) -> float:
        """E(k): tokens a round of k drafted tokens emits on average."""
        return float(self.survival()[: k + 1].sum())

    def choose(self, cap: int, ahead: int = 0) -> int:
        """k for the next round, at most `cap` (cache slots or tokens left), at least 1;
        `ahead` tokens are drafted already."""
        hi = max(1, min(self.k_max, cap))
        if not self.adapt or self.rtt_s is None or self.edge_s is None:
            return hi
        wait = min(self.rtt_s, self.deadline_s)
        s = self.survival()
        cost = {k: (self.edge_s * max(k - ahead, 0) + wait) / s[: k + 1].sum()
                for k in range(1, hi + 1)}  # fmt: skip
        return min(cost, key=cost.get)
