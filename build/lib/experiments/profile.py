"""`python -m experiments profile`: measure LoRA costs on this machine and write a cost table.

    python -m experiments profile --model tiny --out costs.json
    python -m experiments profile --model qwen2.5-0.5b --device jetson-orin-nano-8gb \\
        --ranks 4,8,16 --targets qv,all --batch 4 --seq-len 256 --context 512 --out orin.json

Costs depend on shapes only, so the model presets below carry the published architectures with
random weights. `--device` labels the table with the catalog profile it stands for (run this on
that hardware); the default `local` stands for this machine. The table prints as Markdown and is
saved as JSON for `floe_jax.devices.assign_ranks(..., cost_table=CostTable.load(path))`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from floe_jax.config import LORA_TARGETS, LoRAConfig, ModelConfig
from floe_jax.cost_table import CostTable, measure_cost_table
from floe_jax.devices import DEFAULT_RANKS, default_candidates

# Architectures from each model's config.json on the Hugging Face hub.
MODEL_PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
    ),
    "smollm2-135m": ModelConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        dtype="bfloat16",
    ),
    "qwen2.5-0.5b": ModelConfig(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        qkv_bias=True,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        dtype="bfloat16",
    ),
}

_TARGET_SETS = {
    "qv": ("q_proj", "v_proj"),
    "qkvo": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all": LORA_TARGETS,
}


def _markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no entries)"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def profile_machine(
    model_cfg: ModelConfig,
    out_path: str | None,
    *,
    candidates: list[LoRAConfig] | None = None,
    batch: int = 1,
    seq_len: int = 128,
    context: int = 256,
    decode_batch: int = 1,
    repeats: int = 3,
    device_name: str = "local",
    verbose: bool = True,
) -> CostTable:
    """Measures every candidate on this machine, prints the table, and writes it as JSON."""
    candidates = candidates if candidates is not None else default_candidates()

    def show(e):
        if verbose:
            tgt = "/".join(t.removesuffix("_proj") for t in e.targets)
            print(
                f"  rank={e.rank:<3d} targets={tgt:<22s} train {e.train_mem_bytes / 2**20:9.2f} "
                f"MiB {e.train_step_ms:9.3f} ms | decode {e.decode_ms:8.3f} ms",
                flush=True,
            )

    table = measure_cost_table(
        model_cfg,
        candidates,
        batch=batch,
        seq_len=seq_len,
        context=context,
        decode_batch=decode_batch,
        repeats=repeats,
        device_name=device_name,
        progress=show,
    )
    if verbose:
        print(
            f"\ncost table: device={table.device} machine={table.machine!r}\nmodel={table.model} "
            f"batch={batch} seq_len={seq_len} context={context} decode_batch={decode_batch}\n"
        )
        print(_markdown(table.rows()))
    if out_path:
        table.save(out_path)
        if verbose:
            print(f"\nwrote {out_path}")
    return table


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m experiments profile", description=__doc__)
    p.add_argument("--model", default="tiny", choices=sorted(MODEL_PRESETS))
    p.add_argument("--model-json", help="a JSON object of ModelConfig fields (overrides --model)")
    p.add_argument("--out", default="cost_table.json")
    p.add_argument("--device", default="local", help="profile name the table stands for")
    p.add_argument("--ranks", default=",".join(map(str, DEFAULT_RANKS)))
    p.add_argument("--targets", default="qv,qkvo,all", help=f"among {sorted(_TARGET_SETS)}")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--decode-batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="override the model dtype")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, attention_impl: str = "reference") -> CostTable:
    """`python -m experiments profile ...`; `attention_impl` is the decode attention kernel of the
    measured model (`FLOE_KERNELS`, read by the command line)."""
    args = _parse(argv)
    if args.model_json:
        cfg = ModelConfig(**json.loads(args.model_json))
    else:
        cfg = MODEL_PRESETS[args.model]
    if args.dtype:
        cfg = dataclasses.replace(cfg, dtype=args.dtype)
    cfg = dataclasses.replace(cfg, attention_impl=attention_impl)
    ranks = [int(r) for r in args.ranks.split(",") if r]
    try:
        target_sets = [_TARGET_SETS[t] for t in args.targets.split(",") if t]
    except KeyError as err:
        raise SystemExit(f"--targets: unknown set {err}; known: {sorted(_TARGET_SETS)}") from None
    return profile_machine(
        cfg,
        args.out,
        candidates=default_candidates(ranks, target_sets),
        batch=args.batch,
        seq_len=args.seq_len,
        context=args.context,
        decode_batch=args.decode_batch,
        repeats=args.repeats,
        device_name=args.device,
    )


if __name__ == "__main__":
    main()
