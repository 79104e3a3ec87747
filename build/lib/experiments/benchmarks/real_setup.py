"""`bench real_setup`: the real-model preset's setup on stand-ins of the published pairs' exact
shapes, without their weights (a 7B checkpoint does not fit a small machine, and nothing is
downloaded).

Pairs: Qwen2.5-0.5B-Instruct edge + Qwen2.5-7B-Instruct cloud (one tokenizer, 151,936 against
152,064 embedding rows) and Llama-3.2-1B-Instruct edge + Qwen2.5-7B-Instruct cloud (two families).
Each model is a folder with its published `config.json` (`experiments.standins.PUBLISHED`), a
stand-in tokenizer of its family's exact length, special tokens at their published ids, chat
template and `generation_config.json` stop list (`standin_tokenizer`, `write_standin`), and no
weights. For each pair it runs what the `qwen` preset runs before training, through the same
code: `setup_real(..., shapes_only=True)` (configs parsed, both tokenizers and chat templates,
every eos id, a Dolly-shaped dataset split Dirichlet over 64 clients, lengths against
`fed.rounds.seq_len`), the cloud-to-edge alignment map over the full vocabularies
(`build_map`, as `HTTPCloud` builds it), both models' parameter shapes (`jax.eval_shape` of
`init_params`: the counts are printed beside the published sizes) and the edge's and cloud's
forward on one prompt of each side's template (`jax.eval_shape` of `forward`: logits
[1, T, rows]). Without `--quick` it also writes the 0.5B edge with random bfloat16 weights
(`save_hf`, 1 GB), loads it with `load_hf` as the run does, checks the loaded tree against the
abstract one leaf by leaf and runs the real forward on the chat-templated prompt (finite logits).
Not exercised: the 7B's and the 1B's weights, training, decoding.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks._util import print_table
from experiments.demo.setup import setup_real
from experiments.real_presets import REAL_PRESETS
from experiments.standins import (
    FAMILY_OF,
    PUBLISHED,
    TOKENIZER_SIZES,
    dolly_jsonl,
    dolly_rows,
    standin_tokenizer,
    write_standin,
)
from floe_jax.data.tokenizer import encode_prompt
from floe_jax.hf import load_hf, save_hf
from floe_jax.hf.config import config_from_hf
from floe_jax.inference.align import build_map, vocab_of
from floe_jax.model import forward, init_params

PAIRS = (
    ("Qwen2.5-0.5B-Instruct", "Qwen2.5-7B-Instruct"),
    ("Llama-3.2-1B-Instruct", "Qwen2.5-7B-Instruct"),
)


def _params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def run(quick: bool = False) -> list[dict]:
    rows_n = 800 if quick else 4000
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        texts = [f"{r['instruction']} {r['context']} {r['response']}" for r in dolly_rows(256)]
        toks = {}
        for family, size in TOKENIZER_SIZES.items():
            t0 = time.perf_counter()
            toks[family] = standin_tokenizer(family, size, texts, seed=len(family))
            print(f"{family} stand-in tokenizer: {len(toks[family])} tokens "
                  f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
        for name, cfg in PUBLISHED.items():
            write_standin(root / name, FAMILY_OF[name], toks[FAMILY_OF[name]], cfg)
        dolly_jsonl(root / "dolly.jsonl", rows_n)
        for edge, cloud in PAIRS:
            t0 = time.perf_counter()
            preset = dataclasses.replace(
                REAL_PRESETS["qwen"], edge_path=str(root / edge), cloud_path=str(root / cloud),
                dataset=str(root / "dolly.jsonl"),
            )  # fmt: skip
            s = setup_real(preset, shapes_only=True)
            t_setup = time.perf_counter() - t0
            t1 = time.perf_counter()
            vmap = build_map(
                vocab_of(s.cloud_tokenizer, size=s.cloud_cfg.vocab_size),
                vocab_of(s.tokenizer, size=s.edge_cfg.vocab_size),
            )
            t_align = time.perf_counter() - t1
            q = s.bench.queries[0]
            if not rows:
                q0, abstract0 = q.prompt, s.edge_params
            shapes = []
            for cfg, params, tok, text in (
                (s.edge_cfg, s.edge_params, s.tokenizer, q.prompt),
                (s.cloud_cfg, s.cloud_params, s.cloud_tokenizer, s.real.cloud_prompts[0]),
            ):
                ids = jnp.asarray([encode_prompt(tok, text)], jnp.int32)
                out = jax.eval_shape(lambda p, t, c=cfg: forward(p, t, c), params, ids)
                logits = out[0] if isinstance(out, tuple) else out
                shapes.append(tuple(logits.shape))
            shared = min(len(s.tokenizer), len(s.cloud_tokenizer))
            same = s.tokenizer.get_vocab() == s.cloud_tokenizer.get_vocab()
            d = s.real.data
            rows.append(dict(
                edge=edge, cloud=cloud,
                edge_rows=s.edge_cfg.vocab_size, cloud_rows=s.cloud_cfg.vocab_size,
                edge_params_b=round(_params(s.edge_params) / 1e9, 3),
                cloud_params_b=round(_params(s.cloud_params) / 1e9, 3),
                map_exact=round(vmap.coverage()["exact"], 4),
                map_mapped=round(vmap.coverage()["mapped"], 4),
                identity_on_shared=bool(same and (vmap.cloud_to_edge[:shared]
                                                  == np.arange(shared)).all()),
                edge_eos=list(s.real.eos_ids), cloud_eos=list(s.real.cloud_eos_ids),
                clients=len(d["clients"]), queries=len(s.bench.queries),
                edge_logits=shapes[0], cloud_logits=shapes[1],
                setup_s=round(t_setup, 1), align_s=round(t_align, 1),
            ))  # fmt: skip
        if not quick:
            rows[0] |= _edge_weights(root / "Qwen2.5-0.5B-Instruct", toks["qwen2"], q0, abstract0)
    print_table(rows, title="real-model preset setup on exact-shape stand-ins")
    return rows


def _edge_weights(folder: Path, tok, prompt: str, abstract: dict) -> dict:
    """Random bfloat16 weights for the stand-in at `folder`, written and loaded as a real
    checkpoint; the loaded tree must match `abstract` (shapes and dtypes) and the forward on
    `prompt` must be finite."""
    name = folder.name
    cfg = config_from_hf(PUBLISHED[name], source=name)
    cfg = dataclasses.replace(cfg, dtype="bfloat16")
    save_hf(cfg, init_params(cfg, key=jax.random.key(0)), folder, max_shard_bytes=2**29)
    write_standin(folder, FAMILY_OF[name], tok, PUBLISHED[name])  # the published config.json
    t0 = time.perf_counter()
    cfg, params = load_hf(folder, dtype="bfloat16")
    load_s = time.perf_counter() - t0
    got = jax.tree.map(lambda x: (x.shape, x.dtype), params)
    want = jax.tree.map(lambda x: (x.shape, x.dtype), abstract)
    if got != want:
        raise AssertionError(f"{name}: the loaded params differ from the abstract ones")
    ids = jnp.asarray([encode_prompt(tok, prompt)], jnp.int32)
    logits = jax.jit(forward, static_argnames="cfg")(params, ids, cfg)
    logits = logits[0] if isinstance(logits, tuple) else logits
    finite = bool(jnp.isfinite(logits.astype(jnp.float32)).all())
    if not finite:
        raise AssertionError(f"{name}: non-finite logits on random weights")
    return dict(edge_weights_loaded=True, edge_load_s=round(load_s, 1), edge_forward_finite=finite)
