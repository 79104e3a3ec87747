"""Training memory: the chunked next-token loss, per-layer rematerialisation, bfloat16 against
transformers, `client_chunk="auto"` and the planner (`floe_jax.plan`)."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from floe_jax.config import LoRAConfig, ModelConfig
from floe_jax.lora import init_lora
from floe_jax.loss import token_loss
from floe_jax.model import init_params

TINY = ModelConfig(
    model_type="qwen2", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=3,
    num_heads=4, num_kv_heads=2, qkv_bias=True, tie_word_embeddings=True,
)  # fmt: skip


def _lora(cfg, seed=1):
    """An adapter with nonzero `b`, so gradients reach both factors."""
    lo = init_lora(cfg, LoRAConfig(rank=4), key=jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(lo.b)))
    b = {m: 0.1 * jax.random.normal(next(keys), v.shape) for m, v in lo.b.items()}
    return dataclasses.replace(lo, b=b)


def _batch(cfg, B=3, T=13, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.float32)
    mask[0, :4] = 0  # left padding
    loss_mask = (rng.random((B, T)) < 0.7).astype(np.float32)
    return jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(loss_mask)


def _loss_and_grads(cfg, params, lora, batch):
    """Mean loss and its gradients wrt the adapter and the base (pretraining's gradient)."""

    def mean(params, train):
        s, n = token_loss(params, lora.with_trainable(train), *batch, cfg=cfg)
        return s / n

    return jax.value_and_grad(mean, argnums=(0, 1))(params, lora.trainable())


@pytest.mark.parametrize("chunk", [1, 5, 10_000])
def test_chunked_loss_equals_plain(chunk):
    """Value and gradients (adapter and base) of the chunked loss equal the plain loss's: one
    token per chunk, chunks that do not divide B·(T-1) = 36 tokens, one chunk bigger than it."""
    params = init_params(TINY, key=jax.random.key(0))
    lora, batch = _lora(TINY), _batch(TINY)
    want, (gp_want, gl_want) = _loss_and_grads(TINY, params, lora, batch)
    cfg = dataclasses.replace(TINY, loss_chunk=chunk)
    got, (gp_got, gl_got) = _loss_and_grads(cfg, params, lora, batch)
    assert float(want) > 1.0  # ~ln(97): the comparison means something
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert float(jnp.abs(gl_want["b"]["q_proj"]).max()) > 1e-4
    jax.tree.map(
        lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), gl_got, gl_want
    )
    jax.tree.map(
        lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), gp_got, gp_want
    )
    s, n = token_loss(params, lora, *batch, cfg=cfg)
    s0, n0 = token_loss(params, lora, *batch, cfg=TINY)
    assert float(n) == float(n0) > 0  # the count is the plain loss's, padding rows excluded


def test_chunked_loss_untied_head():
    """The chunked projection reads `lm_head` when the embeddings are untied."""
    cfg = dataclasses.replace(TINY, tie_word_embeddings=False)
    params = init_params(cfg, key=jax.random.key(3))
    lora, batch = _lora(cfg), _batch(cfg, seed=2)
    want, (gp_want, _) = _loss_and_grads(cfg, params, lora, batch)
    got, (gp_got, _) = _loss_and_grads(dataclasses.replace(cfg, loss_chunk=7), params, lora, batch)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(gp_got["lm_head"], gp_want["lm_head"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "num_layers, unstacked", [(3, False), (12, False), (3, True)]
)  # an unrolled layer scan, a rolled one, and the per-layer loop of `unstack_layers`
def test_remat_gradients_equal_plain(num_layers, unstacked):
    """`remat=True` changes what the backward pass stores, not what it computes."""
    from floe_jax.model import unstack_layers

    cfg = dataclasses.replace(TINY, num_layers=num_layers)
    params = init_params(cfg, key=jax.random.key(0))
    if unstacked:
        params = unstack_layers(params, fuse=False)
    lora, batch = _lora(cfg), _batch(cfg)
    want, (gp_want, gl_want) = _loss_and_grads(cfg, params, lora, batch)
    got, (gp_got, gl_got) = _loss_and_grads(
        dataclasses.replace(cfg, remat=True), params, lora, batch
    )
    np.testing.assert_allclose(got, want, rtol=1e-6)
    jax.tree.map(
        lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), gl_got, gl_want
    )
    jax.tree.map(
        lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), gp_got, gp_want
    )


@pytest.mark.parametrize("case", ["qwen2-gqa", "llama-mqa-tied"])
def test_bf16_forward_matches_transformers_bf16(case, tmp_path):
    """A bfloat16 checkpoint runs in bfloat16 (weights and activations) and its logits agree with
    transformers' bfloat16 model within bfloat16 tolerance: at most 2^-5 of the largest logit
    anywhere (8 units in the last place of bf16's 8-bit mantissa) and 2^-6 on average."""
    import torch

    from floe_jax.hf import load_hf
    from floe_jax.model import hidden_states
    from tests import _hf_utils as U

    model = U.make_hf_model(case, seed=3).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    cfg, params = load_hf(tmp_path)
    assert cfg.dtype == "bfloat16"
    tokens = U.random_tokens(cfg, b=2, t=24, seed=1)
    x, _ = hidden_states(params, jnp.asarray(tokens), cfg)
    assert x.dtype == jnp.bfloat16  # activations, not only weights, are bf16
    want = U.hf_logits(model, tokens)
    got = np.asarray(U.forward(params, jnp.asarray(tokens), cfg))
    scale = np.abs(want).max()
    assert scale > 1.0
    err = np.abs(got - want)
    assert err.max() <= 2**-5 * scale, (err.max(), scale)
    assert err.mean() <= 2**-6 * np.abs(want).mean(), (err.mean(), np.abs(want).mean())


# ----------------------------------------------------------------------------- memory analysis


def test_chunked_loss_halves_a_qwen05_training_step():
    """One client's local step of a Qwen2.5-0.5B-shaped model (bf16, batch 4 x 1,024 tokens,
    rank-16 LoRA on every projection, layers rematerialised): with the loss in chunks of 128
    tokens the compiled step's memory is at most half of the unchunked step's (XLA's memory
    analysis of abstract shapes; nothing is allocated)."""
    from experiments.profile import MODEL_PRESETS
    from floe_jax.federated.client import client_memory_bytes, make_optimizer

    qwen = MODEL_PRESETS["qwen2.5-0.5b"]  # Qwen/Qwen2.5-0.5B's config.json shapes, bf16
    spec = lambda dt: jax.ShapeDtypeStruct((1, 4, 1024), dt)  # noqa: E731
    batches = {"tokens": spec(jnp.int32), "mask": spec(jnp.float32), "loss_mask": spec(jnp.float32)}
    total = {}
    for chunk in (0, 128):
        cfg = dataclasses.replace(qwen, remat=True, loss_chunk=chunk)
        base = jax.eval_shape(lambda cfg=cfg: init_params(cfg, key=jax.random.key(0)))
        lora = jax.eval_shape(
            lambda cfg=cfg: init_lora(cfg, LoRAConfig(rank=16), key=jax.random.key(0))
        )
        m = client_memory_bytes(base, lora, batches, cfg=cfg, opt=make_optimizer("adamw"))
        total[chunk] = m["total"]
    print(f"Qwen2.5-0.5B step, 4 x 1024 bf16 remat: unchunked {total[0] / 2**20:.0f} MiB, "
          f"loss_chunk=128 {total[128] / 2**20:.0f} MiB")  # fmt: skip
    assert total[128] <= total[0] / 2


_MEASURE = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from floe_jax.config import ModelConfig
from floe_jax.federated.client import local_update_clients, make_optimizer
from floe_jax.lora import init_lora
from floe_jax.model import init_params
from floe_jax.plan import plan

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

cfg = ModelConfig(vocab_size=32000, hidden_size=128, intermediate_size=256, num_layers=2,
                  num_heads=4, num_kv_heads=2)
B, T, S, k = 4, 256, 1, 3
pl = plan(cfg, budget_bytes=1 << 40, batch=B, seq_len=T, local_steps=S)
opt = make_optimizer("adamw")
run = jax.jit(lambda p, l, b, ks: local_update_clients(
    p, l, b, cfg=cfg, opt=opt, keys=ks, client_chunk=0))
params = init_params(cfg, key=jax.random.key(0))
lora_keys = jax.random.split(jax.random.key(1), k)
loras = jax.vmap(lambda key: init_lora(cfg, pl.lora, key=key))(lora_keys)
tok = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (k, S, B, T)), jnp.int32)
ones = jnp.ones((k, S, B, T), jnp.float32)
b = {"tokens": tok, "mask": ones, "loss_mask": ones, "batch_mask": jnp.ones((k, S, B), jnp.float32)}
args = (params, loras, b, jax.random.split(jax.random.key(2), k))
compiled = run.lower(*args).compile()
jax.block_until_ready(args)
resident = sum(x.nbytes for x in jax.tree.leaves(args))
r0 = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM, the peak RSS, to the current RSS
jax.block_until_ready(compiled(*args))
print(json.dumps({"predicted": pl.memory.need(k) - resident, "measured": status("VmHWM") - r0}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
def test_plan_estimate_matches_measured_cpu_allocation():
    """The planner's bytes for k = 3 clients at once (a line through its compiles at k = 1 and 2,
    so k = 3 is extrapolated) against what XLA:CPU really allocates: a fresh process compiles
    the round, places its inputs, resets its peak RSS (/proc/self/clear_refs) and runs the round
    once; the peak's growth is the program's working memory beyond its resident inputs. The
    two agree within 20% (measured on the shared EPYC CPU: ~6% over, from the runtime's own
    allocations)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's floe_jax
    env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _MEASURE], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    print(got)
    assert got["predicted"] > 500 * 2**20  # the working set dwarfs the runtime's own noise
    assert abs(got["measured"] - got["predicted"]) <= 0.2 * got["predicted"], got


# ----------------------------------------------------------------------------- client_chunk="auto"


@pytest.fixture(scope="module")
def round_inputs():
    """Four clients' adapters and batches on `TINY`, and their `ClientsMemory`."""
    from floe_jax.federated.client import clients_memory, make_optimizer

    C = 4
    params = init_params(TINY, key=jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), C)
    loras = jax.vmap(lambda k: init_lora(TINY, LoRAConfig(rank=4), key=k))(keys)
    tok = jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab_size, (C, 2, 3, 16)))
    ones = jnp.ones(tok.shape, jnp.float32)
    batches = {"tokens": tok.astype(jnp.int32), "mask": ones, "loss_mask": ones}
    opt = make_optimizer("adamw", lr=1e-2)
    one = lambda t: jax.tree.map(lambda x: x[0], t)  # noqa: E731
    mem = clients_memory(params, one(loras), one(batches), cfg=TINY, opt=opt)
    return params, loras, batches, opt, mem


def test_auto_client_chunk_follows_the_budget(round_inputs):
    """`auto_client_chunk` vmaps all four clients when they fit, trains k at a time when only k
    fit (k = the most whose `need(k, 4)` is within the budget), and refuses a budget below one
    client, naming the sizes."""
    from floe_jax.federated.client import auto_client_chunk

    params, loras, batches, opt, mem = round_inputs
    assert 0 < mem.per_client_bytes and mem.base_bytes < mem.fixed_bytes
    auto = lambda budget: auto_client_chunk(  # noqa: E731
        params, loras, batches, cfg=TINY, opt=opt, budget_bytes=budget
    )
    assert auto(mem.need(4)) == 0
    assert auto(mem.need(4) - 1) == 3
    assert auto(mem.need(2, 4)) == 2
    assert auto(mem.need(2, 4) - 1) == 1
    with pytest.raises(ValueError, match="not even one client fits.*MiB.*budget"):
        auto(mem.need(1, 4) - 1)


def test_client_chunk_auto_inside_a_jitted_round(round_inputs):
    """`client_chunk="auto"` inside a jitted round is resolved at trace time from the host's
    free memory; here all four tiny clients fit, so it trains them as `client_chunk=0` does."""
    from floe_jax.federated.client import local_update_clients

    params, loras, batches, opt, _ = round_inputs
    keys = jax.random.split(jax.random.key(2), 4)
    run = lambda chunk: local_update_clients(  # noqa: E731
        params, loras, batches, cfg=TINY, opt=opt, keys=keys, client_chunk=chunk
    )
    got = jax.jit(lambda: run("auto"))()
    want = jax.jit(lambda: run(0))()
    assert float(jnp.abs(want[0].b["q_proj"]).max()) > 0  # training moved the adapters
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got, want)
    with pytest.raises(ValueError, match="client_chunk='two'"):
        run("two")


def test_client_chunk_auto_under_a_clients_mesh(round_inputs):
    """`client_chunk="auto"` in a round traced under a mesh whose `clients` axis splits the four
    clients into two blocks: the memory probe prices one device's block on its own (before the
    fix it split its single probe client over the axis and refused the round)."""
    from floe_jax.federated.client import local_update_clients

    params, loras, batches, opt, _ = round_inputs
    keys = jax.random.split(jax.random.key(2), 4)
    mesh = jax.sharding.AbstractMesh((2,), ("clients",), (jax.sharding.AxisType.Auto,))
    with jax.sharding.use_abstract_mesh(mesh):
        got = jax.eval_shape(
            lambda: local_update_clients(
                params, loras, batches, cfg=TINY, opt=opt, keys=keys, client_chunk="auto"
            )
        )
    assert got[0].b["q_proj"].shape[0] == 4 and got[1]["loss_sum"].shape == (4,)


def test_client_chunk_auto_refused_across_processes(round_inputs, monkeypatch):
    """In a multi-process run each process would size "auto" from its own free memory, so the
    processes could compile different round programs: refused, naming the fix."""
    from floe_jax.federated.client import local_update_clients

    params, loras, batches, opt, _ = round_inputs
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="'auto' in a run of 2 jax.distributed.*an int"):
        keys = jax.random.split(jax.random.key(2), 4)
        local_update_clients(
            params, loras, batches, cfg=TINY, opt=opt, keys=keys, client_chunk="auto"
        )


def test_fed_config_client_chunk_auto():
    from floe_jax.config import ConfigError
    from floe_jax.federated.config import FedConfig
    from floe_jax.overrides import apply_overrides

    assert apply_overrides(FedConfig(), ["client_chunk=auto"]).client_chunk == "auto"
    assert apply_overrides(FedConfig(), ["client_chunk=3"]).client_chunk == 3
    with pytest.raises(ConfigError, match="client_chunk"):
        apply_overrides(FedConfig(), ["client_chunk=some"])


# ----------------------------------------------------------------------------- plan


def test_plan_command(tmp_path, capsys):
    """`python -m experiments plan` on a HF config.json: the planner's numbers, and the clients
    that fit each budget are the largest k with `need(k)` within it."""
    from experiments.cli import main
    from floe_jax.hf.config import config_to_hf
    from floe_jax.plan import plan

    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(TINY)))
    assert main(["plan", "--model", str(tmp_path), "--budget-gb", "0.002,0.02", "--batch", "2",
                 "--seq-len", "16", "--rank", "4"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    p = plan(TINY, budget_bytes=2 * 10**6, lora=LoRAConfig(rank=4, alpha=32.0), batch=2,
             seq_len=16)  # fmt: skip
    m = p.memory
    for gb in (0.002, 0.02):
        n = m.max_clients(int(gb * 1e9))
        assert m.need(n) <= gb * 1e9 < m.need(n + 1)
        assert f"({gb:g} GB): {n} clients at once" in out
    assert "model: qwen2 V=97" in out and "per client" in out
    # a clients mesh axis of 4 devices: each trains its block, 4 times one device's clients
    assert main(["plan", "--model", str(tmp_path), "--budget-gb", "0.02", "--batch", "2",
                 "--seq-len", "16", "--rank", "4", "--devices", "4"]) == 0  # fmt: skip
    n = m.max_clients(int(0.02e9))
    assert f"{n} clients at once per device, {4 * n} over 4" in capsys.readouterr().out
    assert main(["plan", "--model", str(tmp_path), "--budget-gb", "-1"]) == 2
    assert main(["plan", "--model", str(tmp_path), "--batch", "0"]) == 2  # not the default 8
    assert "--batch must be >= 1, got 0" in capsys.readouterr().err
    assert main(["plan", "--preset", "qwen"]) == 2  # its edge folder is not downloaded here
    assert (
        "--preset qwen: no model config at models/Qwen2.5-0.5B-Instruct" in capsys.readouterr().err
    )
