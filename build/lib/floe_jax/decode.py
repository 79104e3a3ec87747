"""Static-shape autoregressive decoding: prompt buckets, prefill, one jitted step, generate.

Shapes: B batch, P prompt bucket length, N max new tokens, S = P + N cache slots, V vocab.

Prompts are left-padded to a bucket length so a batch shares one cache write index; the cache and
the output buffer are preallocated, and the step count, positions and stop flags are arrays, so one
compiled program serves every step and every prompt length within a bucket. `generate` runs the
whole loop on the device under `lax.while_loop`; `decode_step` is the same step for a host-driven
(streaming) loop.

Every decode loop in floe_jax is built from the same three pieces: `prefill` (the prompt into a
fresh cache), `advance` (one token through the model) and `append_token` (sample, append, stop):
plain decoding here, fused decoding (`floe_jax.inference.fused`, which fuses the logits between
`advance` and `append_token`) and the local cloud (`floe_jax.inference.cloud.LocalCloud`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from floe_jax.config import ConfigError, ModelConfig, require_finite
from floe_jax.lora import LoRA
from floe_jax.model import KVCache, forward, init_cache, unstack_layers

# Prompt lengths are padded up to one of these (one compile per bucket used), past 2,048 tokens
# too: long-context evaluation (Qwen2.5's 32k context) gets buckets rather than an error.
DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How the next token is chosen. `temperature == 0` is greedy; `top_p < 1` is nucleus
    sampling (Holtzman et al., 2020) over the temperature-scaled distribution."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self):
        require_finite("SamplingConfig", temperature=self.temperature, top_p=self.top_p)
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


def greedy(logits_BV: jax.Array) -> jax.Array:
    """`argmax` over the last axis as int32 [B] (the first index on ties, as `jnp.argmax`),
    computed as a max, then the smallest index holding it: two plain reductions, which XLA:CPU
    runs faster than the (value, index) pair reduction `jnp.argmax` lowers to. A row with NaNs
    gets its first NaN, as `jnp.argmax` does."""
    V = logits_BV.shape[-1]
    z = jnp.where(jnp.isnan(logits_BV), jnp.inf, logits_BV)
    at_max = z == jnp.max(z, axis=-1, keepdims=True)
    return jnp.min(jnp.where(at_max, jnp.arange(V, dtype=jnp.int32), V - 1), axis=-1)


def sample_logits(logits_BV: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Next token ids [B] from float logits [B, V]."""
    if sampling.temperature == 0.0:
        return greedy(logits_BV)
    z = logits_BV.astype(jnp.float32) / sampling.temperature
    if sampling.top_p < 1.0:
        z_sorted = jnp.sort(z, axis=-1)[:, ::-1]
        p_sorted = jax.nn.softmax(z_sorted, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        keep = jnp.cumsum(p_sorted, axis=-1) - p_sorted < sampling.top_p
        cutoff = jnp.min(jnp.where(keep, z_sorted, jnp.inf), axis=-1, keepdims=True)
        z = jnp.where(z >= cutoff, z, -jnp.inf)
    return jax.random.categorical(key, z, axis=-1).astype(jnp.int32)


def bucket_length(n: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"prompt of {n} tokens is longer than the largest bucket {max(buckets)}")


def pad_prompts(
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int = 0,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    vocab_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists to one bucket length. Returns (tokens [B, P] int32, mask [B, P]).

    A negative token id, or one at or past `vocab_size` when it is given, is an error naming the
    prompt: inside the model it would be an out-of-bounds gather (NaN logits, or a row counted
    from the end), not an error.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    for i, p in enumerate(prompts):
        ids = np.asarray(p)
        bad = (ids < 0) | (ids >= vocab_size) if vocab_size is not None else ids < 0
        if bad.any():
            j = int(np.argmax(bad))
            bound = (
                "ids must be >= 0"
                if vocab_size is None
                else f"outside [0, vocab_size={vocab_size})"
            )
            raise ValueError(f"prompt {i}: token id {int(ids[j])} at position {j} ({bound})")
    P = bucket_length(max(len(p) for p in prompts), buckets)
    tokens = np.full((len(prompts), P), pad_id, np.int32)
    mask = np.zeros((len(prompts), P), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p) :] = p
        mask[i, P - len(p) :] = 1
    return tokens, mask


@struct.dataclass
class DecodeState:
    """Everything that changes between decode steps.

    Attributes:
      cache: the KV cache (S slots).
      token: [B] int32, the token chosen last (fed to the next step).
      out: [B, N] int32 generated tokens (pad after a row stops).
      step: [] int32, tokens generated so far.
      done: [B] bool, row has emitted EOS.
      key: PRNG key; step t samples with `fold_in(key, t)`.
    """

    cache: KVCache
    token: jax.Array
    out: jax.Array
    step: jax.Array
    done: jax.Array
    key: jax.Array


def prefill(
    params: dict,
    tokens: jax.Array,
    mask: jax.Array,
    cfg: ModelConfig,
    *,
    max_new_tokens: int,
    key: jax.Array,
    lora: LoRA | None = None,
    done: jax.Array | None = None,
) -> tuple[DecodeState, jax.Array]:
    """Runs the prompt through the model into a fresh cache of P + N slots.

    The one prefill of every decode loop (`generate`, `stream`, fused decoding, the local cloud).
    Nothing is sampled: `append_token` (after fusion, in fused decoding) chooses token 0.

    Args:
      params, cfg, lora: the model (`lora`: None, one adapter, or per-row adapters).
      tokens: int32 [B, P] left-padded prompts; mask: [B, P] 1 for real tokens.
      max_new_tokens: N, the cache slots past the prompt.
      key: PRNG key of the state (token t samples with `fold_in(key, t)`).
      done: [B] bool rows that generate nothing (batch padding); default none.

    Returns:
      (state at step 0 with `token` the last prompt token, logits [B, V] for token 0).
    """
    B, P = tokens.shape
    cache = init_cache(cfg, B, P + max_new_tokens)
    logits, cache = forward(params, tokens, cfg, lora=lora, cache=cache, mask=mask, last_only=True)
    state = DecodeState(
        cache=cache,
        token=tokens[:, -1],
        out=jnp.zeros((B, max_new_tokens), jnp.int32),
        step=jnp.zeros((), jnp.int32),
        done=jnp.zeros((B,), bool) if done is None else done,
        key=key,
    )
    return state, logits[:, -1]


def advance(
    params: dict, state: DecodeState, cfg: ModelConfig, *, lora: LoRA | None = None
) -> tuple[DecodeState, jax.Array]:
    """Feeds `state.token` to the model: (state with the cache advanced, logits [B, V])."""
    logits, cache = forward(params, state.token[:, None], cfg, lora=lora, cache=state.cache)
    return dataclasses.replace(state, cache=cache), logits[:, 0]


EosIds = int | tuple[int, ...] | None
"""A stop id, or several (instruct models list more than one in `generation_config.json`: Qwen2.5
ends a chat turn with `<|im_end|>` and a document with `<|endoftext|>`); None: never stop."""


def eos_tuple(eos_id: EosIds) -> tuple[int, ...]:
    """`eos_id` as a tuple of ids (empty for None)."""
    if eos_id is None:
        return ()
    return (int(eos_id),) if isinstance(eos_id, int | np.integer) else tuple(int(i) for i in eos_id)


def is_eos(tokens: jax.Array, eos_id: EosIds) -> jax.Array:
    """Bool mask of `tokens` equal to any of the stop ids (`eos_id` static)."""
    ids = eos_tuple(eos_id)
    if not ids:
        return jnp.zeros(jnp.shape(tokens), bool)
    return jnp.isin(tokens, jnp.asarray(ids, jnp.int32))


def append_token(
    state: DecodeState,
    logits_BV: jax.Array,
    *,
    sampling: SamplingConfig = SamplingConfig(),
    eos_id: int | None = None,
    pad_id: int = 0,
) -> DecodeState:
    """Samples token `state.step` from `logits_BV` with `fold_in(state.key, step)` and appends
    it: `pad_id` for rows already done, a row is done once it emits `eos_id` (one id or a tuple
    of them). The tail of every decode step, plain or fused."""
    nxt = sample_logits(logits_BV, jax.random.fold_in(state.key, state.step), sampling)
    nxt = jnp.where(state.done, pad_id, nxt)
    done = state.done if eos_id is None else state.done | is_eos(nxt, eos_id)
    out = jax.lax.dynamic_update_slice(state.out, nxt[:, None], (0, state.step))
    return dataclasses.replace(state, token=nxt, out=out, step=state.step + 1, done=done)


def decode_step(
    params: dict,
    state: DecodeState,
    cfg: ModelConfig,
    *,
    sampling: SamplingConfig = SamplingConfig(),
    lora: LoRA | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> tuple[DecodeState, jax.Array]:
    """Feeds `state.token`, samples the next token. Returns (state, logits [B, V])."""
    state, logits_BV = advance(params, state, cfg, lora=lora)
    return append_token(
        state, logits_BV, sampling=sampling, eos_id=eos_id, pad_id=pad_id
    ), logits_BV


def first_token(
    params: dict,
    tokens: jax.Array,
    mask: jax.Array,
    cfg: ModelConfig,
    *,
    max_new_tokens: int,
    key: jax.Array,
    sampling: SamplingConfig = SamplingConfig(),
    lora: LoRA | None = None,
    eos_id: int | None = None,
) -> DecodeState:
    """`prefill`, then `append_token`: the state after the first new token (step 1)."""
    state, logits_BV = prefill(
        params, tokens, mask, cfg, max_new_tokens=max_new_tokens, key=key, lora=lora
    )
    return append_token(state, logits_BV, sampling=sampling, eos_id=eos_id)


@functools.partial(
    jax.jit, static_argnames=("cfg", "max_new_tokens", "sampling", "eos_id", "pad_id")
)
def generate(
    params: dict,
    tokens: jax.Array,
    mask: jax.Array,
    cfg: ModelConfig,
    *,
    max_new_tokens: int,
    key: jax.Array,
    sampling: SamplingConfig = SamplingConfig(),
    lora: LoRA | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Generates up to `max_new_tokens` for a left-padded batch, entirely on the device.

    Args:
      params: base params.
      tokens: int32 [B, P] left-padded prompts (see `pad_prompts`).
      mask: [B, P] 1 for real prompt tokens.
      cfg: model config (static).
      max_new_tokens: N (static).
      key: PRNG key (unused when greedy).
      sampling: temperature / top-p (static).
      lora: adapters applied unmerged, or None.
      eos_id: stop a row after it emits this id, or any of a tuple of ids (static); None runs N
        steps.
      pad_id: written after a row stops.

    Returns:
      (out [B, N] int32, lengths [B] int32: tokens generated up to and including EOS).
    """
    params = unstack_layers(params)  # once per call: per-layer buffers, no slice copies per step
    state = first_token(
        params, tokens, mask, cfg, max_new_tokens=max_new_tokens, key=key, sampling=sampling,
        lora=lora, eos_id=eos_id,
    )  # fmt: skip

    def cond(s):
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s):
        s, _ = decode_step(
            params, s, cfg, sampling=sampling, lora=lora, eos_id=eos_id, pad_id=pad_id
        )
        return s

    state = jax.lax.while_loop(cond, body, state)
    if eos_id is None:
        lengths = jnp.full((tokens.shape[0],), state.step, jnp.int32)
    else:
        stop = is_eos(state.out, eos_id) & (jnp.arange(max_new_tokens) < state.step)
        first = jnp.argmax(stop, axis=1)
        lengths = jnp.where(stop.any(1), first + 1, state.step).astype(jnp.int32)
    return state.out, lengths


# The jitted pieces host-driven loops share (`stream`, fused decoding, the local cloud). A state
# passed to a step is donated: its buffers are reused for the next state.
prefill_jit = jax.jit(prefill, static_argnames=("cfg", "max_new_tokens"))
first_token_jit = jax.jit(
    first_token, static_argnames=("cfg", "max_new_tokens", "sampling", "eos_id")
)
advance_jit = jax.jit(advance, static_argnames=("cfg",), donate_argnames=("state",))
decode_step_jit = jax.jit(
    decode_step, static_argnames=("cfg", "sampling", "eos_id", "pad_id"), donate_argnames=("state",)
)


def stream(
    params: dict,
    tokens: jax.Array,
    mask: jax.Array,
    cfg: ModelConfig,
    *,
    max_new_tokens: int,
    key: jax.Array,
    sampling: SamplingConfig = SamplingConfig(),
    lora: LoRA | None = None,
    eos_id: int | None = None,
) -> Iterator[np.ndarray]:
    """Yields each step's tokens [B] as they are produced (host-driven loop, one jitted step)."""
    static = dict(cfg=cfg, sampling=sampling, eos_id=eos_id)
    state = first_token_jit(
        params, tokens, mask, max_new_tokens=max_new_tokens, key=key, lora=lora, **static
    )
    yield np.asarray(state.token)
    for _ in range(max_new_tokens - 1):
        state, _ = decode_step_jit(params, state, lora=lora, **static)
        tok = np.asarray(state.token)
        yield tok
        if eos_id is not None and bool(np.asarray(state.done).all()):
            return
