"""Vocabulary alignment: token-string normalisation, mapping across two locally trained
tokenizers (byte-level `Ġ` against sentencepiece-style `▁`), dense and sparse scatters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _inference_util import bytelevel_tokenizer, metaspace_tokenizer

from floe_jax.inference.align import (
    LOG_FLOOR,
    AlignConfig,
    StringMapper,
    align_dense,
    align_sparse,
    build_map,
    identity_map,
    surface,
    vocab_of,
)


@pytest.fixture(scope="module")
def toks():
    return bytelevel_tokenizer(), metaspace_tokenizer()


def test_surface_normalisation():
    assert surface("Ġthe", "bytelevel") == " the"
    assert surface("ĊĊ", "bytelevel") == "\n\n"
    assert surface("Ã©", "bytelevel") == "é"
    assert surface("â", "bytelevel") == "\\xe2"  # an incomplete UTF-8 fragment stays distinct
    assert surface("▁the", "metaspace") == " the"
    assert surface("<0x0A>", "metaspace") == "\n"
    assert surface("the", "metaspace") == "the"


def test_vocab_detects_styles_and_specials(toks):
    edge, cloud = vocab_of(toks[0]), vocab_of(toks[1])
    assert edge.style == "bytelevel" and cloud.style == "metaspace"
    assert edge.special["eos"] == toks[0].token_to_id("<|endoftext|>")
    assert cloud.special["eos"] == toks[1].token_to_id("</s>")
    assert cloud.special["unk"] == toks[1].token_to_id("<unk>")


def test_shared_strings_map_across_tokenizers(toks):
    bl, ms = toks
    edge, cloud = vocab_of(bl), vocab_of(ms)
    vm = build_map(cloud, edge, AlignConfig(fallback="none"))
    shared = 0
    for t, i in ms.get_vocab().items():
        if t in ("<unk>", "<s>", "</s>"):
            continue
        want = bl.token_to_id(t.replace("▁", "Ġ"))
        if want is not None:
            assert vm.cloud_to_edge[i] == want, t
            assert vm.exact[i]
            shared += 1
        else:
            assert vm.cloud_to_edge[i] == -1, t
    assert shared > 20  # " the", " dog", " cat", ... exist in both
    assert vm.cloud_to_edge[ms.token_to_id("▁the")] == bl.token_to_id("Ġthe")
    # special tokens map by role, not spelling
    assert vm.cloud_to_edge[ms.token_to_id("</s>")] == bl.token_to_id("<|endoftext|>")
    assert vm.cloud_to_edge[ms.token_to_id("<s>")] == -1  # the edge has no bos


def test_prefix_and_edit_fallbacks(toks):
    bl, ms = toks
    edge, cloud = vocab_of(bl), vocab_of(ms)
    prefix = build_map(cloud, edge, AlignConfig(fallback="prefix"))
    edit = build_map(cloud, edge, AlignConfig(fallback="edit"))
    surf = edge.surfaces
    for i, s in enumerate(cloud.surfaces):
        if i in cloud.special_ids or prefix.exact[i]:
            continue
        j = prefix.cloud_to_edge[i]
        assert j >= 0 and s.startswith(surf[j]), (s, surf[j])  # every byte is an edge token
        assert edit.cloud_to_edge[i] >= 0 and surf[edit.cloud_to_edge[i]][0] == s[0]
    assert prefix.coverage()["mapped"] > 0.95


def test_string_mapper_reads_api_spellings(toks):
    bl, ms = toks
    edge = vocab_of(bl)
    m = StringMapper(edge)
    assert m(" the") == bl.token_to_id("Ġthe")  # decoded text, as APIs send it
    assert m("Ġthe") == bl.token_to_id("Ġthe")  # raw vocab spelling
    vm = build_map(vocab_of(ms), edge)
    m2 = StringMapper(edge, vocab_map=vm)
    assert m2("ignored", token_id=ms.token_to_id("▁the")) == bl.token_to_id("Ġthe")


def test_string_mapper_maps_special_tokens_by_role(toks):
    """A cloud's end-of-text token, as an API spells it, is the edge's end-of-text token (so the
    cloud can vote to stop), never a piece of its spelling such as `<`."""
    bl, _ = toks
    m = StringMapper(vocab_of(bl))
    eos = bl.token_to_id("<|endoftext|>")
    for spelling in ("</s>", "<|im_end|>", "<eos>", "<|endoftext|>"):
        assert m(spelling) == eos, spelling
    assert m("<|no_such_role|>") == -1  # a special token of no known role maps nowhere


def test_dense_alignment_sums_many_to_one():
    c2e = jnp.array([0, 0, 2, -1, 1], jnp.int32)  # cloud ids 0,1 -> edge 0; 3 unmapped
    p = jnp.array([[0.1, 0.2, 0.3, 0.2, 0.2]])
    got = np.exp(align_dense(jnp.log(p), c2e, 3))
    np.testing.assert_allclose(got, [[0.3 / 0.8, 0.2 / 0.8, 0.3 / 0.8]], rtol=1e-5)


def test_identity_dense_is_log_softmax():
    z = jax.random.normal(jax.random.key(0), (2, 9))
    np.testing.assert_allclose(align_dense(z, None, 9), jax.nn.log_softmax(z), atol=1e-6)
    assert identity_map(9).identity


@pytest.mark.parametrize("tail", ["edge", "uniform", "renorm"])
def test_sparse_with_full_vocab_equals_dense(tail):
    V = 13
    k1, k2 = jax.random.split(jax.random.key(3))
    lc = jax.nn.log_softmax(jax.random.normal(k1, (2, V)) * 2)
    le = jax.nn.log_softmax(jax.random.normal(k2, (2, V)))
    order = jnp.argsort(-lc, axis=-1)
    ids = order.astype(jnp.int32)
    lps = jnp.take_along_axis(lc, order, axis=-1)
    got = align_sparse(ids, lps, jnp.ones_like(ids, bool), V, tail=tail, edge_logp_BV=le)
    np.testing.assert_allclose(got, align_dense(lc, None, V), atol=1e-5)


def test_sparse_tail_rules():
    V = 5
    ids = jnp.array([[3, 1, -1]], jnp.int32)  # third listed token did not map
    lps = jnp.log(jnp.array([[0.5, 0.2, 0.1]]))
    valid = jnp.ones((1, 3), bool)
    pe = jnp.array([[0.1, 0.3, 0.4, 0.1, 0.1]])
    tail = 1 - 0.7  # unmapped mass joins the tail
    edge = np.exp(align_sparse(ids, lps, valid, V, tail="edge", edge_logp_BV=jnp.log(pe)))
    rest = np.array([0.1, 0.0, 0.4, 0.0, 0.1]) / 0.6
    want = np.array([0, 0.2, 0, 0.5, 0]) + tail * rest
    np.testing.assert_allclose(edge[0], want, rtol=1e-5)
    uni = np.exp(align_sparse(ids, lps, valid, V, tail="uniform"))
    np.testing.assert_allclose(uni[0], [0.1, 0.2, 0.1, 0.5, 0.1], rtol=1e-5)
    ren = np.asarray(align_sparse(ids, lps, valid, V, tail="renorm"))
    np.testing.assert_allclose(np.exp(ren[0, [1, 3]]), [0.2 / 0.7, 0.5 / 0.7], rtol=1e-5)
    assert ren[0, 0] == LOG_FLOOR


def test_sparse_sums_duplicates_and_jits():
    ids = jnp.array([[2, 2, 0, 0]], jnp.int32)
    lps = jnp.log(jnp.array([[0.4, 0.3, 0.3, 1.0]]))
    valid = jnp.array([[True, True, True, False]])  # last slot is padding
    f = jax.jit(lambda i, lp, v: align_sparse(i, lp, v, 3, tail="renorm"))
    got = np.exp(f(ids, lps, valid))
    np.testing.assert_allclose(got[0], [0.3, 0.0, 0.7], atol=1e-6)


def test_align_config_validates():
    with pytest.raises(ValueError, match="fallback"):
        AlignConfig(fallback="closest")
    with pytest.raises(ValueError, match="tail"):
        AlignConfig(tail="spread")
