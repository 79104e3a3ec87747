"""`python -m experiments plan`: how many clients of a round fit a device memory budget.

    python -m experiments plan --model qwen2.5-0.5b --rank 16 --seq-len 512 --dtype bfloat16 \\
        --remat --loss-chunk 128 --budget-gb 80,141
    python -m experiments plan --model path/to/config.json --budget-gb 24
    python -m experiments plan --preset qwen --seq-len 512 --budget-gb 80

`--model` is a name of `experiments.profile.MODEL_PRESETS` (published architectures, written
here, nothing downloaded) or a Hugging Face `config.json` (or its folder); `--preset` takes a
real-model preset's edge config and its rounds' batch, local steps and adapter. Nothing is
allocated: `floe_jax.plan.plan` compiles the round from abstract shapes (module docstring there).
"""

from __future__ import annotations

import argparse
import dataclasses

from experiments.profile import MODEL_PRESETS
from floe_jax.config import ConfigError
from floe_jax.plan import DEFAULT_LORA, model_config, plan


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help=f"{', '.join(MODEL_PRESETS)}, or a config.json / folder")
    src.add_argument("--preset", help="a real-model preset (its edge model and rounds)")
    p.add_argument("--budget-gb", default="80,141",
                   help="device memory budgets in GB (10^9 bytes), comma-separated")  # fmt: skip
    p.add_argument("--rank", type=int, help=f"LoRA rank (default {DEFAULT_LORA.rank})")
    p.add_argument("--batch", type=int, help="rows per local step (default 8)")
    p.add_argument("--seq-len", type=int, help="tokens per row (default 512)")
    p.add_argument("--local-steps", type=int, help="local steps per round (default 1)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: the model's")
    p.add_argument(
        "--remat",
        action=argparse.BooleanOptionalAction,
        help="rematerialise each layer (backward); default: the preset's, else off",
    )
    p.add_argument(
        "--loss-chunk",
        type=int,
        help="tokens per loss chunk (0: off); default: the preset's, else 0",
    )
    p.add_argument("--devices", type=int, default=1,
                   help="devices on a `clients` mesh axis (figures per device, and the "
                        "total)")  # fmt: skip
    return p


def _config(path: str, flag: str):
    try:
        return model_config(path)
    except FileNotFoundError as e:
        raise ConfigError(f"{flag}: {e}") from None


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    for flag, v in (("--batch", args.batch), ("--seq-len", args.seq_len), ("--rank", args.rank),
                    ("--local-steps", args.local_steps), ("--devices", args.devices)):  # fmt: skip
        if v is not None and v < 1:  # 0 is not "the default"
            raise ConfigError(f"{flag} must be >= 1, got {v}")
    batch, seq_len, steps, lora = 8, 512, 1, DEFAULT_LORA
    if args.preset is not None:
        from experiments.real_presets import REAL_PRESETS

        if args.preset not in REAL_PRESETS:
            raise ConfigError(f"--preset {args.preset!r} is not one of {sorted(REAL_PRESETS)}")
        pre = REAL_PRESETS[args.preset]
        cfg = dataclasses.replace(
            _config(pre.edge_path, f"--preset {args.preset}"), dtype=pre.dtype,
            remat=pre.remat, loss_chunk=pre.loss_chunk,
        )  # fmt: skip
        r = pre.fed.rounds
        batch, steps, lora = r.batch_size, r.local_steps, r.lora
        seq_len = r.seq_len or seq_len
    elif args.model in MODEL_PRESETS:
        cfg = MODEL_PRESETS[args.model]
    else:
        cfg = _config(args.model, "--model")
    try:
        budgets = [float(x) for x in args.budget_gb.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--budget-gb {args.budget_gb!r}: give numbers, e.g. 80,141") from None
    if not budgets or min(budgets) <= 0:
        raise ConfigError(f"--budget-gb {args.budget_gb!r}: give positive numbers")
    cfg = dataclasses.replace(
        cfg,
        dtype=args.dtype or cfg.dtype,
        remat=cfg.remat if args.remat is None else args.remat,
        loss_chunk=cfg.loss_chunk if args.loss_chunk is None else args.loss_chunk,
    )
    if args.rank is not None:  # the preset's other adapter settings (targets, layers...) kept
        lora = dataclasses.replace(lora, rank=args.rank, max_rank=None)
    batch = batch if args.batch is None else args.batch
    seq_len = seq_len if args.seq_len is None else args.seq_len
    steps = steps if args.local_steps is None else args.local_steps
    first = plan(cfg, budget_bytes=int(budgets[0] * 1e9), lora=lora, batch=batch,
                 seq_len=seq_len, local_steps=steps, devices=args.devices)  # fmt: skip
    print(first.report())
    for gb in budgets[1:]:
        n = first.memory.max_clients(int(gb * 1e9))
        print(f"  budget {gb * 1e9 / 2**30:.2f} GiB ({gb:g} GB): {n} clients at once"
              + first.over_devices(n))  # fmt: skip
    return 0
