"""`python -m experiments serve-cloud`: serve a floe_jax model as an OpenAI-compatible cloud.

Examples:
  python -m experiments serve-cloud --checkpoint path/to/hf_folder --port 8000
  python -m experiments serve-cloud --random --tokenizer path/to/tokenizer.json   # a demo cloud
  FLOE_API_KEY=secret python -m experiments serve-cloud --checkpoint path/to/hf_folder

The server speaks `POST /v1/completions` and `POST /v1/chat/completions` (log-probs, streaming,
stop, n, top_p), `GET /v1/models` and `GET /health` (see `floe_jax.inference.server`); point
`floe_jax.inference.HTTPCloud` or any OpenAI client at it. Everything loads from local files:
a checkpoint or tokenizer path that does not exist is an error, never a hub download.
"""

from __future__ import annotations

import argparse
import os
import sys

API_KEY_ENV = "FLOE_API_KEY"


def _tokenizer(path: str):
    """A bare `tokenizer.json` file (the `tokenizers` library's), or a tokenizer folder through
    the one folder loader (`floe_jax.data.tokenizer.load_tokenizer`: local files only)."""
    if os.path.isfile(path):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(path)
    if not os.path.isdir(path):
        raise SystemExit(f"--tokenizer/--checkpoint {path}: no such file or folder")
    from floe_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(path)


def _model(args, vocab_size: int):
    import jax

    from floe_jax.config import ModelConfig
    from floe_jax.hf import load_hf
    from floe_jax.model import init_params

    if args.checkpoint:
        return load_hf(args.checkpoint)
    cfg = ModelConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_layers=args.layers,
        num_heads=max(1, args.hidden // 32),
        num_kv_heads=max(1, args.hidden // 64),
    )
    return cfg, init_params(cfg, key=jax.random.key(args.seed))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments serve-cloud", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="local Hugging Face folder (config.json + safetensors)")
    src.add_argument("--random", action="store_true", help="a random Llama (demo / tests)")
    p.add_argument("--tokenizer", help="tokenizer.json or a folder (default: the checkpoint)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default="floe-cloud")
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require `Authorization: Bearer KEY` (default: ${API_KEY_ENV})",
    )
    p.add_argument(
        "--mesh", default=None, metavar="model=N",
        help="split the model tensor-parallel over N devices (attention heads, MLP width)",
    )  # fmt: skip
    p.add_argument("--max-logprobs", type=int, default=20)
    p.add_argument("--max-tokens-limit", type=int, default=1024)
    p.add_argument("--max-body-bytes", type=int, default=4 << 20)
    p.add_argument("--request-timeout-s", type=float, default=120.0)
    p.add_argument("--max-connections", type=int, default=1024)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument(
        "--no-warm-up",
        dest="warm_up",
        action="store_false",
        help="skip compiling the batch and prompt buckets at start",
    )
    p.add_argument(
        "--warm-up-prompt-tokens",
        type=int,
        default=128,
        help="the longest prompt bucket the warm-up compiles",
    )
    p.add_argument(
        "--memo-mib",
        type=int,
        default=0,
        help="memoise one-token answers' log-probs by prompt (MiB; 0: off): for clients that "
        "ask for the same prompts' next token again and again, not for timing the model",
    )
    p.add_argument("--hidden", type=int, default=256, help="--random: width")
    p.add_argument("--layers", type=int, default=4, help="--random: depth")
    p.add_argument("--seed", type=int, default=0)
    return p  # fmt: skip


def config_from(args):
    """The `ServeConfig` the command line asks for (the API key from the flag or the
    environment)."""
    from floe_jax.inference.server import ServeConfig

    return ServeConfig(
        model_name=args.model_name,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_logprobs=args.max_logprobs,
        max_tokens_limit=args.max_tokens_limit,
        max_body_bytes=args.max_body_bytes,
        request_timeout_s=args.request_timeout_s,
        max_connections=args.max_connections,
        max_batch=args.max_batch,
        warm_up=args.warm_up,
        warm_up_prompt_tokens=args.warm_up_prompt_tokens,
        memo_mib=args.memo_mib,
    )


def main(argv: list[str] | None = None, *, attention_impl: str = "reference") -> int:
    """Serves until interrupted; `attention_impl` (from `FLOE_KERNELS`, read by the command
    line) is set on the served model's config."""
    import dataclasses

    args = parser().parse_args(argv)
    tok_path = args.tokenizer or args.checkpoint
    if not tok_path:
        raise SystemExit("--random needs --tokenizer")
    if args.checkpoint and not os.path.isdir(args.checkpoint):
        raise SystemExit(f"--checkpoint {args.checkpoint}: no such folder (models load from "
                         "local files only)")  # fmt: skip
    config = config_from(args)
    tok = _tokenizer(tok_path)
    vocab = len(tok.get_vocab())
    cfg, params = _model(args, vocab)
    cfg = dataclasses.replace(cfg, attention_impl=attention_impl)
    if cfg.vocab_size < vocab:
        raise SystemExit(f"model vocab {cfg.vocab_size} is smaller than the tokenizer's {vocab}")

    if args.mesh:  # tensor parallel over this host's devices
        from floe_jax.sharding import shard_cloud

        params = shard_cloud(args.mesh, params)
    from floe_jax.hf.config import eos_ids
    from floe_jax.inference.server import serve_cloud

    # A checkpoint's stops include generation_config.json's list (an instruct model's turn end).
    eos = eos_ids(args.checkpoint, tok, cfg) if args.checkpoint else None
    auth = " (API key required)" if config.api_key else ""
    print(f"serving {args.model_name} on http://{args.host}:{args.port}/v1{auth}", file=sys.stderr)
    serve_cloud(params, cfg, tok, host=args.host, port=args.port, block=True, config=config,
                eos_ids=eos, log_level="info")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
