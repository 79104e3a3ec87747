"""Fused decoding across families and vocabularies: a tiny Gemma 3-style edge (byte-level BPE)
with a tiny Qwen3-style cloud (Metaspace BPE), both with sliding windows shorter than the text so
their ring-buffer caches wrap, aligned by token strings."""

import dataclasses

import jax
import numpy as np
import pytest

from floe_jax.config import ModelConfig
from floe_jax.decode import generate, pad_prompts
from floe_jax.inference.align import StringMapper, build_map, vocab_of
from floe_jax.inference.cloud import LocalCloud
from floe_jax.inference.deadline import SimClock
from floe_jax.inference.fused import FusedDecodeConfig, generate_fused
from floe_jax.inference.privacy import GuardedCloud, PrivacyDetector, PrivacyPolicy
from floe_jax.inference.router import FusionConfig
from tests import _hf_utils as U
from tests._inference_util import bytelevel_tokenizer, metaspace_tokenizer

N = 8
EDGE_ONLY = FusionConfig(gate="fixed", fixed_w=1.0)
CLOUD_ONLY = FusionConfig(gate="fixed", fixed_w=0.0)
SIZES = dict(hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2, head_dim=16)


def _gemma3_edge(vocab: int) -> ModelConfig:
    return ModelConfig(
        model_type="gemma3_text", vocab_size=vocab, num_layers=3, **SIZES, qk_norm=True,
        norm_unit_offset=True, sandwich_norms=True, scale_embeddings=True,
        query_pre_attn_scalar=16.0, hidden_act="gelu_pytorch_tanh", sliding_window=4,
        layer_types=("sliding_attention", "sliding_attention", "full_attention"),
        rope_local_theta=10000.0, rope_theta=1e6, tie_word_embeddings=True,
    )  # fmt: skip


def _qwen3_cloud(vocab: int) -> ModelConfig:
    return ModelConfig(
        model_type="qwen3", vocab_size=vocab, num_layers=2, **SIZES, qk_norm=True,
        sliding_window=5, layer_types=("full_attention", "sliding_attention"), rope_theta=1e6,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pair():
    bl, ms = bytelevel_tokenizer(), metaspace_tokenizer()
    ecfg, ccfg = _gemma3_edge(bl.get_vocab_size()), _qwen3_cloud(ms.get_vocab_size())
    assert ecfg.vocab_size != ccfg.vocab_size
    return bl, ms, (ecfg, U.random_params(ecfg, seed=0)), (ccfg, U.random_params(ccfg, seed=1))


def _allow(backend):
    return GuardedCloud(backend, PrivacyDetector(PrivacyPolicy(action="allow")))


class _ByString:
    """A top-k back end that names tokens by string only, as an HTTP API does."""

    kind = "sparse"

    def __init__(self, cloud: LocalCloud):
        self.cloud = cloud

    def next_token(self, prefixes):
        return dataclasses.replace(self.cloud.next_token(prefixes), top_ids=None)


PROMPTS = ["the dog sat on the mat and", "the cloud"]


def test_gemma3_edge_alone_equals_its_plain_decoding(pair):
    """w = 1: the fused loop (prefill and advance on the edge's ring buffers) emits what plain
    `generate` emits."""
    bl, ms, (ecfg, eparams), (ccfg, cparams) = pair
    prompts = [bl.encode(p).ids for p in PROMPTS]
    res = generate_fused(
        eparams, ecfg, prompts, cloud=_allow(LocalCloud(cparams, ccfg, tokenizer=ms)),
        decode=bl.decode, vocab_map=build_map(vocab_of(ms), vocab_of(bl)), clock=SimClock(),
        config=FusedDecodeConfig(max_new_tokens=N, fusion=EDGE_ONLY, deadline_s=1e9),
    )  # fmt: skip
    tokens, mask = pad_prompts(prompts)
    want, _ = generate(eparams, tokens, mask, ecfg, max_new_tokens=N, key=jax.random.key(0))
    assert res.tokens == np.asarray(want).tolist()


def _cloud_driven(pair, cloud, **kw):
    bl, _, (ecfg, eparams), _ = pair
    prompts = [bl.encode(p).ids for p in PROMPTS]
    return generate_fused(
        eparams, ecfg, prompts, cloud=_allow(cloud), decode=bl.decode, clock=SimClock(),
        config=FusedDecodeConfig(max_new_tokens=N, fusion=CLOUD_ONLY, deadline_s=1e9), **kw,
    )  # fmt: skip


def test_qwen3_cloud_drives_the_gemma3_edge_across_vocabularies(pair):
    """w = 0 with a dense cloud: every token is the edge image of the cloud's distribution
    aligned by token strings (`build_map`), through the cloud's ring-buffer cache."""
    bl, ms, (ecfg, _), (ccfg, cparams) = pair
    vm = build_map(vocab_of(ms), vocab_of(bl))
    cloud = LocalCloud(cparams, ccfg, tokenizer=ms, headroom=32)
    res = _cloud_driven(pair, cloud, vocab_map=vm)
    assert res.share_fused == 1.0 and not res.failures
    assert cloud.stats["extends"] > 0  # the cloud's cache was extended, past its window
    for row in res.tokens:
        assert len(row) == N
    for row, p in zip(res.tokens, PROMPTS, strict=True):
        for t in range(2):  # the first two tokens, each from the cloud given the text so far
            lp = cloud.logprobs(ms.encode(bl.decode(bl.encode(p).ids + row[:t])).ids)
            p_edge = np.zeros(ecfg.vocab_size)
            ok = vm.cloud_to_edge >= 0
            np.add.at(p_edge, vm.cloud_to_edge[ok], np.exp(lp)[ok])
            assert row[t] == int(np.argmax(p_edge))


def test_top_k_by_token_string_equals_top_k_by_id(pair):
    """A top-k cloud naming tokens by string only (`StringMapper`) drives the edge exactly as
    the same cloud naming them by id through `build_map`."""
    bl, ms, _, (ccfg, cparams) = pair
    by_id = _cloud_driven(
        pair, LocalCloud(cparams, ccfg, tokenizer=ms, top_k=8, headroom=32),
        vocab_map=build_map(vocab_of(ms), vocab_of(bl)),
    )  # fmt: skip
    by_string = _cloud_driven(
        pair, _ByString(LocalCloud(cparams, ccfg, tokenizer=ms, top_k=8, headroom=32)),
        mapper=StringMapper(vocab_of(bl)),
    )  # fmt: skip
    assert by_string.share_fused == 1.0 and by_string.tokens == by_id.tokens
