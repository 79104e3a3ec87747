"""Full-parameter next-token pretraining of a small base model, with an on-disk cache.

The embedded demo pretrains its cloud model and its edge base model from scratch on the public
corpus (see `floe_jax.data.benchmark`). One jitted AdamW step (Loshchilov & Hutter, 2019) with
donated params and optimizer state, a warmup + cosine learning-rate schedule, fixed-shape batches
(random windows of a packed token stream), metric sums fetched one step late.

`pretrain_cached` keys a cache folder by a hash of the token stream, the model config, the
training config (the stream is derived from the benchmark seed and sizes, so the key covers them)
and the code that computes the training (`code_fingerprint`), so a second run with the same
settings and code loads the result instead of training, and a warm cache never serves a model that
the current code would have trained differently. A cached model is a Hugging Face checkpoint
folder (`floe_jax.hf.save_hf`), loaded back through `load_hf`, the loader of real checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import floe_jax.loss
import floe_jax.model
import floe_jax.params
import kernels.decode_attention
from floe_jax.config import ConfigError, ModelConfig
from floe_jax.hf import load_hf, save_hf
from floe_jax.loss import token_loss
from floe_jax.model import init_params

CACHE_VERSION = 2  # 2: Hugging Face checkpoint folders, code fingerprint in the key


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """How a base model is pretrained.

    Attributes:
      steps: optimizer steps.
      batch_size: sequences per step (B).
      seq_len: tokens per sequence (T); each row is a window of T + 1 tokens of the stream.
      lr: peak learning rate.
      warmup_steps: linear warmup, then cosine decay to `lr * final_lr_fraction`.
      final_lr_fraction: the learning rate at the last step, as a fraction of `lr`.
      weight_decay: AdamW decoupled weight decay.
      clip_norm: global gradient-norm clip (0 turns it off).
      seed: model init and batch sampling.
    """

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int = 30
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(f"warmup_steps={self.warmup_steps} must be in [0, steps]")


class PretrainStopped(Exception):
    """`pretrain` was asked to stop (its `stop` event) before its last step."""


@dataclasses.dataclass(frozen=True)
class PretrainResult:
    """What `pretrain_cached` returns.

    Attributes:
      params: the trained params.
      cache_hit: True when they were loaded from the cache (no training ran).
      path: the cache folder.
      losses: mean training loss per logged step (from the cache's metadata on a hit).
    """

    params: dict
    cache_hit: bool
    path: Path
    losses: tuple[float, ...]


# ----------------------------------------------------------------------------- step


def make_optimizer(tcfg: PretrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup then cosine decay, behind an optional global-norm clip."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=tcfg.lr,
        warmup_steps=tcfg.warmup_steps,
        decay_steps=max(tcfg.steps, tcfg.warmup_steps + 1),  # optax needs a cosine part
        end_value=tcfg.lr * tcfg.final_lr_fraction,
    )
    opt = optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=tcfg.weight_decay)
    if tcfg.clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(tcfg.clip_norm), opt)
    return opt


@functools.partial(jax.jit, static_argnames=("cfg", "opt"), donate_argnames=("params", "opt_state"))
def train_step(params, opt_state, tokens_BT, mask_BT, *, cfg: ModelConfig, opt):
    """One AdamW step of every parameter on the mean `token_loss` over the tokens of `mask_BT`
    ([B, T]; every token a target). Returns (params, opt_state, (loss sum, token count))."""

    def loss_fn(p):
        s, n = token_loss(p, None, tokens_BT, mask_BT, mask_BT, cfg=cfg)
        return s / jnp.maximum(n, 1.0), (s, n)

    grads, sums = jax.grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, sums


# ----------------------------------------------------------------------------- data


def sample_windows(stream: np.ndarray, batch: int, length: int, rng: np.random.Generator):
    """`batch` random windows of `length` tokens from a 1-D token stream: int32 [batch, length].

    A stream shorter than a window is tiled (the corpus repeats, as it does across epochs).
    """
    stream = np.asarray(stream, np.int32)
    if stream.ndim != 1 or stream.size == 0:
        raise ValueError(f"the token stream must be a non-empty 1-D array, got {stream.shape}")
    if stream.size < length + 1:
        stream = np.tile(stream, math.ceil((length + 1) / stream.size))
    starts = rng.integers(0, stream.size - length + 1, size=batch)
    return np.stack([stream[s : s + length] for s in starts])


# ----------------------------------------------------------------------------- training


def pretrain(
    cfg: ModelConfig,
    stream: np.ndarray,
    tcfg: PretrainConfig,
    *,
    params: dict | None = None,
    progress: bool = True,
    desc: str = "pretrain",
    position: int | None = None,
    stop: threading.Event | None = None,
) -> tuple[dict, list[float]]:
    """Trains all parameters on next-token prediction over a packed token stream.

    Args:
      cfg: the model config.
      stream: 1-D int token stream (documents joined `<bos> doc <eos>`; see `encode_docs`).
      tcfg: the training config.
      params: start from these (default: a fresh `init_params` from `tcfg.seed`).
      progress: show a tqdm bar with the running loss.
      desc: the bar's label.
      position: the bar's line (tqdm's `position`), for bars of trainings that run at once.
      stop: set from another thread, ends the training at its next step with `PretrainStopped`
        (how a caller running trainings at once stops the others when one fails).

    Returns:
      (params, mean loss of each step).
    """
    from tqdm.auto import tqdm

    stream = np.asarray(stream)
    if stream.max(initial=0) >= cfg.vocab_size or stream.min(initial=0) < 0:
        raise ValueError(
            f"token ids in [{stream.min()}, {stream.max()}] do not fit vocab_size={cfg.vocab_size}"
        )
    key = jax.random.key(tcfg.seed)
    if params is None:
        params = init_params(cfg, key=key)
    else:  # train_step donates its inputs: never consume the caller's arrays
        params = jax.tree.map(jnp.array, params)
    opt = make_optimizer(tcfg)
    opt_state = opt.init(params)
    rng = np.random.default_rng(tcfg.seed)
    mask = jnp.ones((tcfg.batch_size, tcfg.seq_len + 1), jnp.int32)
    losses: list[float] = []
    pending = None
    bar = tqdm(range(tcfg.steps), desc=desc, disable=not progress, leave=False, position=position)

    def fetch(sums):
        s, n = (float(x) for x in jax.device_get(sums))
        loss = s / max(n, 1.0)
        if not math.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss is {loss} at step {len(losses)}")
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    try:
        for step in bar:
            if stop is not None and stop.is_set():
                raise PretrainStopped(f"{desc}: stopped at step {step} of {tcfg.steps}")
            tokens = jnp.asarray(sample_windows(stream, tcfg.batch_size, tcfg.seq_len + 1, rng))
            params, opt_state, sums = train_step(params, opt_state, tokens, mask, cfg=cfg, opt=opt)
            if pending is not None:  # fetch one step late: the host never waits on this step
                fetch(pending)
            pending = sums
        if pending is not None:
            fetch(pending)
    finally:  # a failed or stopped training leaves no bar behind
        bar.close()
    return params, losses


@functools.cache
def code_fingerprint() -> str:
    """A hash of what decides the numbers pretraining produces beyond its inputs: the source of
    the model (`floe_jax.model`, its parameter init in `floe_jax.params`, and the attention code
    it takes from `kernels.decode_attention`), of the loss (`floe_jax.loss`) and of this module,
    and the jax, jaxlib and optax versions. Any edit to those files (comments included) is a new
    cache entry: the cost is one re-pretraining, the gain is that a warm cache and a fresh clone
    give the same models."""
    h = hashlib.sha256()
    sources = (floe_jax.model, floe_jax.params, kernels.decode_attention, floe_jax.loss)
    for source in (*(m.__file__ for m in sources), __file__):
        h.update(Path(source).read_bytes())
    for pkg in ("jax", "jaxlib", "optax"):
        h.update(f"{pkg}={importlib.metadata.version(pkg)};".encode())
    return h.hexdigest()[:16]


def cache_key(cfg: ModelConfig, tcfg: PretrainConfig, stream: np.ndarray, tag: str = "") -> str:
    """A short hash of (token stream, model config, training config, tag, cache version, code
    fingerprint). The model config's `attention_impl` is left out: it picks the kernel of cached
    decode steps, which pretraining never runs, so both implementations share one cache entry."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(np.asarray(stream, np.int64)).tobytes())
    model = dataclasses.asdict(dataclasses.replace(cfg, attention_impl="reference"))
    meta = {
        "model": json.loads(json.dumps(model, default=str)),
        "train": dataclasses.asdict(tcfg),
        "tag": tag,
        "version": CACHE_VERSION,
        "code": code_fingerprint(),
    }
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()[:16]


def pretrain_cached(
    cfg: ModelConfig,
    stream: np.ndarray,
    tcfg: PretrainConfig,
    *,
    cache_dir: str | os.PathLike,
    name: str = "model",
    tag: str = "",
    progress: bool = True,
    position: int | None = None,
    stop: threading.Event | None = None,
) -> PretrainResult:
    """`pretrain`, or a load from `cache_dir/<name>-<key>/` when that folder is complete.

    `tag` adds anything else the caller wants in the key (for example the benchmark config);
    `position` places the progress bar and `stop` can end the training early (`pretrain`'s).
    """
    path = Path(cache_dir) / f"{name}-{cache_key(cfg, tcfg, stream, tag)}"
    meta_file = path / "pretrain.json"
    if meta_file.is_file():  # written last: its presence means the folder is complete
        cached_cfg, params = load_hf(path)
        if cached_cfg != cfg:
            raise ValueError(f"{path}: cached config {cached_cfg} differs from {cfg}")
        losses = tuple(json.loads(meta_file.read_text())["losses"])
        return PretrainResult(params, True, path, losses)
    params, losses = pretrain(
        cfg, stream, tcfg, progress=progress, desc=f"pretrain {name}", position=position, stop=stop
    )
    tmp = path.with_name(path.name + ".tmp")
    save_hf(cfg, params, tmp)
    (tmp / "pretrain.json").write_text(
        json.dumps({"train": dataclasses.asdict(tcfg), "tag": tag, "losses": losses}, indent=1)
    )
    if path.exists():  # a stale, incomplete folder from a killed run
        import shutil

        shutil.rmtree(path)
    os.replace(tmp, path)
    return PretrainResult(params, False, path, tuple(losses))
