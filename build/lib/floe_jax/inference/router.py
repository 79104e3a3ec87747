"""Parameter-free mixture-of-experts router and logit-level fusion of edge and cloud.

Shapes: B batch, V edge vocab.

Floe fuses the edge SLM's and the cloud LLM's next-token distributions with a per-token edge
weight `w` set by a router that has no trained parameters. The paper does not publish the formula,
so floe_jax offers the natural published candidates (`FusionConfig.gate`):

- `"entropy"` (default): `w = e^{-H(p_e)/T} / (e^{-H(p_e)/T} + e^{-H(p_c)/T})`, a softmax over the
  two experts' negative entropies at temperature `T`. The more certain model gets more weight.
  It is the default because it uses each whole distribution (not one coordinate), is symmetric in
  the two experts, is smooth in both, and reduces to `w = 1/2` when they are equally certain; it is
  the confidence rule of entropy-weighted ensembling (and of PackLLM's importance weighting with a
  per-token instead of a per-query score).
- `"edge"`: `w = 1 - H(p_e) / log V`, the edge's own normalised certainty: the adapted edge
  decides the tokens it is sure of and hands the rest to the cloud, whatever the cloud's own
  certainty. For a cloud that answers a redacted, out-of-distribution prompt confidently but
  wrongly (a placeholder where a name was, a private format it never saw), the two-sided
  `"entropy"` gate hands such tokens to the cloud; the demo measures both (`README.md`).
- `"maxprob"`: `w = max p_e / (max p_e + max p_c)`.
- `"fixed"`: `w = FusionConfig.fixed_w`.

Fusion (`FusionConfig.space`): `"prob"` (default) mixes probabilities `p = w p_e + (1 - w) p_c`
(a true mixture of experts, which keeps a token either expert rates likely); `"log"` mixes
log-probs `log p ∝ w log p_e + (1 - w) log p_c` (a product of experts, sharper). Both are computed
stably from log-probs.

Proxy-tuning (Liu et al., 2024, "Tuning Language Models by Proxy") is a baseline
(`gate="proxy"`): `softmax(z_cloud + z_edge_tuned - z_edge_base)`, see `proxy_tuning`; the
generation loop then also decodes the edge base model (no adapters) beside the tuned one.

Deadline: a row whose cloud distribution missed the deadline gets `w = 1` (edge alone).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from floe_jax.config import ConfigError, require_finite
from floe_jax.inference.align import AlignConfig

GATES = ("entropy", "edge", "maxprob", "fixed", "proxy")
SPACES = ("prob", "log")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FusionConfig:
    """Router, fusion and alignment choices (static under jit).

    Attributes:
      gate: `"entropy"`, `"maxprob"`, `"fixed"`, or `"proxy"` (the proxy-tuning baseline: no
        mixture weight; the generation loop also runs the edge base model without adapters).
      temperature: T of the entropy gate (in nats).
      fixed_w: edge weight of the `"fixed"` gate (1 = edge only, 0 = cloud only).
      space: `"prob"` (mixture) or `"log"` (product of experts).
      align: vocabulary alignment rules (fallback, top-k tail).
    """

    gate: str = "entropy"
    temperature: float = 1.0
    fixed_w: float = 0.5
    space: str = "prob"
    align: AlignConfig = AlignConfig()

    def __post_init__(self):
        if self.gate not in GATES:
            raise ConfigError(f"FusionConfig.gate={self.gate!r} is not one of {GATES}")
        if self.space not in SPACES:
            raise ConfigError(f"FusionConfig.space={self.space!r} is not one of {SPACES}")
        require_finite("FusionConfig", temperature=self.temperature, fixed_w=self.fixed_w)
        if self.temperature <= 0:
            raise ConfigError(f"FusionConfig.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.fixed_w <= 1.0:
            raise ConfigError(f"FusionConfig.fixed_w must be in [0, 1], got {self.fixed_w}")


def entropy(logp_BV: jax.Array) -> jax.Array:
    """Shannon entropy [B] in nats of log-probs [B, V]."""
    p = jnp.exp(logp_BV)
    return -jnp.sum(jnp.where(p > 0, p * logp_BV, 0.0), axis=-1)


def entropy_gate(logp_e_BV, logp_c_BV, temperature: float = 1.0) -> jax.Array:
    """`w = e^{-H_e/T} / (e^{-H_e/T} + e^{-H_c/T})` = `sigmoid((H_c - H_e) / T)`. [B]."""
    return jax.nn.sigmoid((entropy(logp_c_BV) - entropy(logp_e_BV)) / temperature)


def edge_gate(logp_e_BV) -> jax.Array:
    """`w = 1 - H(p_e) / log V`: 1 for a one-hot edge, 0 for a uniform one. [B]."""
    return jnp.clip(1.0 - entropy(logp_e_BV) / jnp.log(logp_e_BV.shape[-1]), 0.0, 1.0)


def maxprob_gate(logp_e_BV, logp_c_BV) -> jax.Array:
    """`w = max p_e / (max p_e + max p_c)`. [B]."""
    me, mc = jnp.exp(logp_e_BV.max(-1)), jnp.exp(logp_c_BV.max(-1))
    return me / (me + mc)


def edge_weight(logp_e_BV, logp_c_BV, cloud_ok_B, config: FusionConfig) -> jax.Array:
    """Per-row edge weight w [B] in [0, 1]; rows without a cloud distribution get 1."""
    if config.gate == "entropy":
        w = entropy_gate(logp_e_BV, logp_c_BV, config.temperature)
    elif config.gate == "edge":
        w = edge_gate(logp_e_BV)
    elif config.gate == "maxprob":
        w = maxprob_gate(logp_e_BV, logp_c_BV)
    elif config.gate == "proxy":
        w = jnp.zeros(logp_e_BV.shape[:1], jnp.float32)  # the cloud drives; see proxy_tuning
    else:
        w = jnp.full(logp_e_BV.shape[:1], config.fixed_w, jnp.float32)
    return jnp.where(cloud_ok_B, w, 1.0).astype(jnp.float32)


def fuse(logp_e_BV, logp_c_BV, w_B, space: str = "prob") -> jax.Array:
    """Fused log-probs [B, V]. `w = 1` returns `logp_e` exactly, `w = 0` returns `logp_c`."""
    w = w_B[:, None]
    if space == "prob":
        # log(w p_e + (1 - w) p_c): both are normalised log-probs (<= 0), so exp cannot overflow;
        # the endpoints are returned exactly (w = 1 is bit-identical to edge-only decoding)
        p = w * jnp.exp(logp_e_BV) + (1 - w) * jnp.exp(logp_c_BV)
        z = jnp.log(jnp.maximum(p, 1e-38))
        return jnp.where(w >= 1, logp_e_BV, jnp.where(w <= 0, logp_c_BV, z))
    if space == "log":
        z = jnp.where(w > 0, w * logp_e_BV, 0.0) + jnp.where(w < 1, (1 - w) * logp_c_BV, 0.0)
        z = jax.nn.log_softmax(z, axis=-1)
        return jnp.where(w >= 1, logp_e_BV, jnp.where(w <= 0, logp_c_BV, z))  # exact endpoints
    raise ValueError(f"unknown fusion space {space!r}; one of {SPACES}")


def proxy_tuning(z_cloud_BV, z_edge_tuned_BV, z_edge_base_BV) -> jax.Array:
    """Proxy-tuning log-probs: `log_softmax(z_cloud + z_edge_tuned - z_edge_base)` [B, V].

    Any of the three may be log-probs instead of logits (a per-row shift cancels in the softmax).
    """
    z = z_cloud_BV + z_edge_tuned_BV - z_edge_base_BV
    return jax.nn.log_softmax(z.astype(jnp.float32), axis=-1)
