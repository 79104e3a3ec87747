"""Client screening: which clients an aggregation uses, and a reason code for each it leaves
out (a non-finite update or weight, ‖ΔW_k‖_F above `max_norm`, an adapter that moved more than
`max_update_norm`, zero weight).

`screen` is the one screening; `aggregate.screen_aggregate` runs it before every aggregation,
either in full (reading every client's factors for NaN/Inf, `factors_finite`) or without reading
the factors (`read_factors=False`), leaving their finiteness to the rule's own read of them:
for a rule with a one-pass apply (`Rule.one_pass`), a call without downloads, and stacked factors
of at least `aggregate.ONE_PASS_MIN_BYTES` (or `one_pass=True`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from floe_jax.lora import LoRA

REASON_OK = 0
REASON_NONFINITE = 1
REASON_NORM = 2
REASON_ZERO_WEIGHT = 3
REASON_UPDATE_NORM = 4
REASON_BAD_WEIGHT = 5
REASONS = {
    REASON_OK: "included",
    REASON_NONFINITE: "non-finite update (NaN/Inf in its factors or scale)",
    REASON_NORM: "update norm ‖ΔW‖_F above max_norm",
    REASON_ZERO_WEIGHT: "zero weight",
    REASON_UPDATE_NORM: "adapter moved more than max_update_norm",
    REASON_BAD_WEIGHT: "non-finite weight",
}


def exclusion_reasons(reason) -> list[str]:
    """Host-side text for each client's reason code."""
    return [REASONS.get(int(r), f"unknown reason {int(r)}") for r in np.asarray(reason)]


def lora_sq_norms(lora: LoRA) -> jax.Array:
    """‖ΔW‖_F² per client from factors, `s² Σ_m Σ_l tr((AᵀA)(BBᵀ))`, masks applied. [C]"""
    total = 0.0
    for m in lora.a:
        a = lora.a[m] * lora.mask[m][..., None, :]
        aa = jnp.einsum("...lir,...lis->...lrs", a, a)
        bb = jnp.einsum("...lro,...lso->...lrs", lora.b[m], lora.b[m])
        total = total + jnp.sum(aa * bb, axis=(-3, -2, -1))
    return total * lora.scale**2


def factors_finite(lora: LoRA) -> jax.Array:
    """[C] whether every entry of each client's factors (padded slots too) is finite: one read
    of the factors (`Σ (x - x)` is 0 when every x is finite, NaN otherwise, and never
    overflows). Written `x - x`, not `0 * x`: XLA:CPU wrote the scalar 0 broadcast to each
    factor's full shape before the reduction of `0 * x` (1.3 GiB at Qwen2.5-0.5B scale with 64
    clients, most of the screening's time there); `x - x` reduces straight from the factors.
    `test_screen_flags_nonfinite_factors_without_norms` checks that NaN and ±Inf are caught."""
    ok = True
    for x in jax.tree.leaves((lora.a, lora.b)):
        ok = ok & jnp.isfinite(jnp.sum(x - x, axis=tuple(range(1, x.ndim))))
    return ok


def screen(
    client_loras: LoRA,
    weights,
    *,
    max_norm: float | None = None,
    update_norm: jax.Array | None = None,
    max_update_norm: float | None = None,
    read_factors: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """The one client screening: which clients an aggregation uses.

    Args:
      client_loras: stacked LoRA [C, ...] (padded slots zero).
      weights: [C] example counts.
      max_norm: leave out a client with ‖ΔW_k‖_F above it; None = no limit.
      update_norm: [C] how far each adapter moved (the round's Frobenius norm of the change of
        its trainable tree), or None when unknown.
      max_update_norm: leave out a client whose `update_norm` is above it; None = no limit.
      read_factors: whether to read the factors for NaN/Inf (`factors_finite`). False for a
        caller that leaves that to the rule's own read of them (`aggregate.screen_aggregate`):
        the result is then the full screening's whenever every factor is finite.

    Returns:
      `(weights [C] float32, zero where left out; reason [C] int32, REASON_OK when used)`.
      The weights are rescaled by a power of two so that the largest lies in [0.5, 1): their
      sum cannot overflow (huge example counts would otherwise sum to inf and normalise to
      NaN), and every rule, which divides by the sum, gets bit for bit the same proportions.
    """
    finite = jnp.isfinite(client_loras.scale)
    if read_factors:
        finite = factors_finite(client_loras) & finite
    if update_norm is not None:
        finite = finite & jnp.isfinite(update_norm)
    # ‖ΔW_k‖² costs Gram matrices (2 C L R² (I + O) flops): computed only when a limit needs it.
    small = (
        jnp.ones_like(finite) if max_norm is None else lora_sq_norms(client_loras) <= max_norm**2
    )
    near = jnp.ones_like(finite)
    if update_norm is not None and max_update_norm is not None:
        near = update_norm <= max_update_norm
    w = jnp.asarray(weights, jnp.float32)
    reason = jnp.select(
        [~finite, ~jnp.isfinite(w), ~small, ~near, ~(w > 0)],
        [REASON_NONFINITE, REASON_BAD_WEIGHT, REASON_NORM, REASON_UPDATE_NORM, REASON_ZERO_WEIGHT],
        REASON_OK,
    ).astype(jnp.int32)
    return scale_to_unit(jnp.where(reason == REASON_OK, w, 0.0)), reason


def scale_to_unit(w_C):
    """`w_C` (finite, >= 0) divided by the power of two that brings its largest entry into
    [0.5, 1): exact, so `w / w.sum()` is unchanged, and a sum of C entries is at most C.
    All-zero weights stay zero. Works on numpy (float64) and jax arrays alike."""
    xp = jnp if isinstance(w_C, jax.Array) else np
    _, e = xp.frexp(xp.max(w_C))
    return xp.ldexp(w_C, -e)
