"""Calibration of the embedded benchmark: do the pretrained models know what they should?

Checks, on a preset's sizes, that (a) the cloud model answers most `general` queries, (b) the edge
base model answers fewer, (c) neither base model answers `personal` queries, (d) a centralized
LoRA fine-tune of the edge model on the pooled private examples makes it good at `personal` (on
the benchmark with the app named in the prompts, `app_in_prompt=True`: one adapter for every
client cannot otherwise know which client's format a prompt wants).
That makes Floe's claim (fusion beats edge-only and cloud-only) reachable on this benchmark.

`python -m experiments calibrate [preset] [key=value ...]` prints the table and the stage times;
`python -m experiments pretrain [preset] [key=value ...]` only fills the cache.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.presets import DemoPreset, FinetuneConfig, get_preset
from floe_jax.config import ModelConfig
from floe_jax.data.benchmark import Benchmark, Example, make_benchmark, score
from floe_jax.data.tokenizer import (
    benchmark_tokenizers,
    encode_docs,
    encode_examples,
    encode_prompt,
    load_tokenizer,
    save_tokenizer,
)
from floe_jax.decode import generate, pad_prompts
from floe_jax.federated.client import optimized_factors, train_step
from floe_jax.lora import LoRA, init_lora
from floe_jax.pretrain import PretrainResult, PretrainStopped, pretrain_cached


@dataclasses.dataclass
class Prepared:
    """The benchmark, the edge's and the cloud's tokenizers and the pretrained base models (a
    model `prepare` was not asked for is None)."""

    bench: Benchmark
    tokenizer: object
    cloud_tokenizer: object
    edge: PretrainResult | None
    cloud: PretrainResult | None
    times: dict[str, float]


def benchmark_and_tokenizers(preset: DemoPreset) -> tuple[Benchmark, object, object]:
    """Generates the benchmark and trains (or loads the cached) edge and cloud tokenizers."""
    bench = make_benchmark(preset.bench)
    h = hashlib.sha256(json.dumps([preset.vocab_size, preset.cloud_vocab_size, 2]).encode())
    for text in bench.public_docs + bench.format_docs:  # what the tokenizers are trained on
        h.update(text.encode() + b"\0")
    path = Path(preset.cache_dir) / f"tokenizers-{h.hexdigest()[:16]}"
    if not all((path / w / "tokenizer.json").is_file() for w in ("edge", "cloud")):
        edge, cloud = benchmark_tokenizers(
            bench, edge_vocab_size=preset.vocab_size, cloud_vocab_size=preset.cloud_vocab_size
        )
        save_tokenizer(edge, path / "edge")
        save_tokenizer(cloud, path / "cloud")
    # through AutoTokenizer, as a real checkpoint's
    return bench, load_tokenizer(path / "edge"), load_tokenizer(path / "cloud")


MODELS = ("cloud", "edge")  # the base models of a demo preset; a progress bar's row each


def pretrain_model(
    preset: DemoPreset,
    which: str,
    bench: Benchmark,
    tokenizer,
    *,
    progress: bool = True,
    stop: threading.Event | None = None,
) -> PretrainResult:
    """Pretrains (or loads from the cache) `which` of `MODELS` on its corpus: the cloud on the
    public documents, the edge on its own; `stop` ends the training at its next step."""
    docs = bench.public_docs if which == "cloud" else bench.edge_docs
    return pretrain_cached(
        getattr(preset, which),
        np.asarray(encode_docs(tokenizer, docs), np.int32),
        getattr(preset, f"{which}_pretrain"),
        cache_dir=preset.cache_dir,
        name=which,
        progress=progress,
        position=MODELS.index(which),
        stop=stop,
    )


@contextlib.contextmanager
def pretraining(preset: DemoPreset, models: tuple[str, ...], bench: Benchmark, tokenizers: dict,
                *, progress: bool = True):  # fmt: skip
    """Pretrains (or loads) each of `models` in its own thread while the body runs; yields
    `{model: future}` and on exit waits for them all.

    The first error (in a training, or in the body, Ctrl-C included) stops the other trainings
    at their next step and is raised; an error another training hit as well is added to it as
    a note. JAX's context managers (`jax.set_mesh`, `jax.default_device`, ...) are per thread:
    one around the body does not reach the trainings."""
    if not models or not set(models) <= set(MODELS):
        raise ValueError(f"models must be a non-empty subset of {MODELS}, got {models}")
    stop = threading.Event()  # set: the other trainings end at their next step
    pool = concurrent.futures.ThreadPoolExecutor(len(models), thread_name_prefix="pretrain")
    futures = {
        which: pool.submit(
            pretrain_model, preset, which, bench, tokenizers[which], progress=progress, stop=stop
        )
        for which in models
    }
    try:
        yield futures
        done, _ = concurrent.futures.wait(  # inside the try: Ctrl-C here stops them too
            futures.values(), return_when=concurrent.futures.FIRST_EXCEPTION
        )
        for f in done:
            if f.exception() is not None:
                raise f.exception()
    except BaseException as error:
        stop.set()
        pool.shutdown(wait=True)
        for which, f in futures.items():
            other = f.exception()
            if other is not None and other is not error and not isinstance(other, PretrainStopped):
                error.add_note(f"pretraining the {which} model failed too: {other!r}")
        raise
    pool.shutdown(wait=True)


def prepare(
    preset: DemoPreset, *, progress: bool = True, models: tuple[str, ...] = MODELS
) -> Prepared:
    """Benchmark, tokenizer, and the base models of `models` pretrained (or loaded from the
    cache); a model left out is None (the federated rounds need only the edge).

    The models train at the same time (`pretraining`): one tiny model's step leaves part of a
    CPU's cores idle, so the two finish sooner together than one after the other (the demo's
    stage times, REPRODUCTION.md). On CPU the trained weights are the same either way, bit for
    bit (each thread runs its own jitted steps; `tests/test_pretrain.py`)."""
    times = {}
    t0 = time.perf_counter()
    bench, tok, cloud_tok = benchmark_and_tokenizers(preset)
    times["benchmark+tokenizers"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokenizers = {"cloud": cloud_tok, "edge": tok}
    with pretraining(preset, models, bench, tokenizers, progress=progress) as futures:
        pass
    out = {which: f.result() for which, f in futures.items()}
    times[f"pretrain {' + '.join(models)}" + (" (at once)" if len(models) > 1 else "")] = (
        time.perf_counter() - t0
    )
    return Prepared(bench, tok, cloud_tok, out.get("edge"), out.get("cloud"), times)


# ----------------------------------------------------------------------------- generation


def greedy_answers(
    params: dict,
    cfg: ModelConfig,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    lora: LoRA | None = None,
    batch_size: int = 64,
) -> list[str]:
    """Greedy continuations of `prompts` (until `<eos>`), decoded and stripped."""
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        rows = [encoded[i] for i in idx]
        rows += [rows[-1]] * (batch_size - len(rows))  # one batch shape: no recompiles
        tokens, mask = pad_prompts(rows, pad_id=tokenizer.pad_token_id)
        toks, lengths = generate(
            params, jnp.asarray(tokens), jnp.asarray(mask), cfg,
            max_new_tokens=max_new_tokens, key=jax.random.key(0), lora=lora,
            eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
        )  # fmt: skip
        toks, lengths = np.asarray(toks), np.asarray(lengths)
        for j, i in enumerate(idx):
            ids = [t for t in toks[j, : lengths[j]] if t != tokenizer.eos_token_id]
            out[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return out


def evaluate(params, cfg, tokenizer, bench: Benchmark, *, max_new_tokens: int, lora=None) -> dict:
    """Exact-match accuracy of greedy answers per query type."""
    qs = bench.queries
    preds = greedy_answers(
        params, cfg, tokenizer, [q.prompt for q in qs], max_new_tokens=max_new_tokens, lora=lora
    )
    return score(preds, qs)


# ----------------------------------------------------------------------------- LoRA check


_finetune_step = jax.jit(
    train_step, static_argnames=("cfg", "opt", "frozen"), donate_argnames=("lora", "opt_state")
)


def finetune_lora(
    params: dict,
    cfg: ModelConfig,
    tokenizer,
    examples: list[Example],
    fcfg: FinetuneConfig,
    *,
    progress: bool = True,
) -> tuple[LoRA, list[float]]:
    """Centralized LoRA fine-tune on `examples` (loss on responses only), with the federated
    clients' `train_step`. Returns (lora, losses)."""
    from tqdm.auto import tqdm

    data = encode_examples(tokenizer, [(e.prompt, e.response) for e in examples])
    key = jax.random.key(fcfg.seed)
    lora = init_lora(cfg, fcfg.lora, key=key)
    opt = optax.adamw(
        optax.warmup_cosine_decay_schedule(
            0.0, fcfg.lr, max(1, fcfg.steps // 10), max(fcfg.steps, fcfg.steps // 10 + 2)
        ),
        weight_decay=0.0,
    )
    opt_state = opt.init(optimized_factors(lora))
    rng = np.random.default_rng(fcfg.seed)
    losses = []
    for _ in tqdm(range(fcfg.steps), desc="LoRA fine-tune", disable=not progress, leave=False):
        idx = rng.integers(0, len(data["tokens"]), fcfg.batch_size)
        batch = {k: jnp.asarray(v[idx]) for k, v in data.items()}
        lora, opt_state, sums = _finetune_step(params, lora, opt_state, batch, cfg=cfg, opt=opt)
        losses.append(sums)
    losses = [float(s) / max(float(n), 1.0) for s, n in jax.device_get(losses)]
    return lora, losses


# ----------------------------------------------------------------------------- the check


def run(preset: DemoPreset, *, progress: bool = True) -> dict:
    """Pretrains (or loads) both models, fine-tunes the edge, evaluates all four. Returns rows."""
    prep = prepare(preset, progress=progress)
    times = dict(prep.times)
    rows = {}
    n = preset.eval.decode.max_new_tokens
    for which in ("cloud", "edge"):
        t0 = time.perf_counter()
        res = getattr(prep, which)
        tk = prep.cloud_tokenizer if which == "cloud" else prep.tokenizer
        rows[f"{which} base"] = evaluate(
            res.params, getattr(preset, which), tk, prep.bench, max_new_tokens=n
        )
        times[f"evaluate {which}"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # One adapter for every client picks each client's format only if the prompt names the app:
    # the same benchmark with the app shown (same corpora, so the same tokenizer and models).
    named = make_benchmark(dataclasses.replace(preset.bench, app_in_prompt=True))
    lora, ft_losses = finetune_lora(
        prep.edge.params, preset.edge, prep.tokenizer, list(named.pooled_examples()),
        preset.finetune, progress=progress,
    )  # fmt: skip
    times["LoRA fine-tune edge"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows["edge + pooled LoRA"] = evaluate(
        prep.edge.params, preset.edge, prep.tokenizer, named, max_new_tokens=n, lora=lora
    )
    times["evaluate edge + LoRA"] = time.perf_counter() - t0
    return {
        "rows": rows,
        "times": times,
        "cache_hit": {"edge": prep.edge.cache_hit, "cloud": prep.cloud.cache_hit},
        "final_loss": {
            "cloud": prep.cloud.losses[-1] if prep.cloud.losses else None,
            "edge": prep.edge.losses[-1] if prep.edge.losses else None,
            "lora": ft_losses[-1] if ft_losses else None,
        },
    }


def format_report(result: dict) -> str:
    cols = ("general", "personal", "both", "overall", "slot_format", "slot_personal",
            "slot_general")  # fmt: skip
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in result["rows"].items():
        cells = [f"{r.get(t, float('nan')):.2f}" for t in cols]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in result["times"].items()]
    lines += ["", f"cache hit: {result['cache_hit']}; final losses: {result['final_loss']}"]
    return "\n".join(lines)


def _parse(argv: list[str], prog: str, description: str, attention_impl: str) -> DemoPreset:
    import argparse

    from experiments.cli import with_attention_impl
    from experiments.presets import PRESETS

    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("preset", nargs="?", default="default", help=f"one of {', '.join(PRESETS)}")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="preset overrides, e.g. cloud.num_layers=6 bench.seed=1 cache_dir=/tmp/c",
    )  # fmt: skip
    args = p.parse_args(argv)
    if "=" in args.preset:  # `calibrate key=value` without a preset name
        args.overrides, args.preset = [args.preset, *args.overrides], "default"
    return with_attention_impl(get_preset(args.preset, args.overrides), attention_impl)


def main(argv: list[str], attention_impl: str = "reference") -> int:
    """`python -m experiments calibrate [PRESET] [key=value ...]`; `attention_impl` is the decode
    attention kernel of both models (`FLOE_KERNELS`, read by the command line)."""
    preset = _parse(
        argv, "python -m experiments calibrate",
        "Pretrain (or load from the cache) the edge and cloud models of a preset, LoRA-fine-tune "
        "the edge on the pooled private examples, and print exact-match accuracy per query type "
        "with the time of each stage.", attention_impl,
    )  # fmt: skip
    print(format_report(run(preset)))
    return 0


def pretrain_main(argv: list[str], attention_impl: str = "reference") -> int:
    """`python -m experiments pretrain [PRESET] [key=value ...]`."""
    preset = _parse(
        argv, "python -m experiments pretrain",
        "Generate the embedded benchmark, train its BPE tokenizer and pretrain the cloud and edge "
        "base models into the cache folder (a second run finds them there and skips training).",
        attention_impl,
    )  # fmt: skip
    prep = prepare(preset)
    for which in ("cloud", "edge"):
        r = getattr(prep, which)
        state = "cached" if r.cache_hit else f"trained, final loss {r.losses[-1]:.3f}"
        print(f"{which}: {r.path} ({state})")
    print(", ".join(f"{k} {v:.1f}s" for k, v in prep.times.items()))
    return 0
