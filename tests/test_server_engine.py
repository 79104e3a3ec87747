"""The serve-cloud engine's continuous batching: a request arriving while another decodes joins
its running batch at the next step (its prompt spliced into the shared cache, the batch grown
when full), finished rows leave, a mostly empty batch shrinks; every row gets the tokens and
log-probs it gets served alone (greedy). Bucket warm-up compiles before the first request."""

import dataclasses
import threading
import time

import numpy as np
import pytest
from _serve_util import chat_model, chat_tokenizer

from floe_jax.inference.server.engine import Engine


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()


class Job:
    """Greedy: records every log-probs row it gets and the token it chose; `then(job)` runs
    (on the engine thread) once it has `at` tokens."""

    def __init__(self, prompt, max_tokens, at=None, then=None):
        self.prompt, self.max_tokens = list(prompt), max_tokens
        self.lps, self.ids, self.error, self.at, self.then = [], [], None, at, then
        self.done = threading.Event()

    def on_logprobs(self, lp):
        self.lps.append(np.array(lp))
        self.ids.append(int(np.argmax(lp)))
        if len(self.ids) == self.at:
            self.then(self)
        if len(self.ids) >= self.max_tokens:
            self.done.set()
            return None
        return self.ids[-1]

    def on_error(self, msg):
        self.error = msg
        self.done.set()


def _serve(params, cfg, jobs, *, first=None):
    """Runs `jobs` on a fresh engine (all queued before it starts, so they share one prefill;
    `first` alone first, when given) until all are done; returns the engine's stats."""
    engine = Engine(params, cfg, max_batch=8, start=False)
    for j in [first] if first is not None else jobs:
        assert engine.submit(j)
    engine.start()
    try:
        everything = jobs if first is None else [first, *jobs]
        for j in everything:
            assert j.done.wait(120), "a job did not finish"
    finally:
        engine.close()
    for j in everything:
        assert j.error is None, j.error
    return engine.stats


def _same(got: Job, alone: Job):
    assert got.ids == alone.ids
    np.testing.assert_allclose(np.stack(got.lps), np.stack(alone.lps), atol=2e-5)


@pytest.mark.parametrize("window", [8, 24])
def test_a_request_arriving_mid_generation_shares_the_decode_steps(tok, window):
    """A (12 tokens) decodes alone; after its 3rd token B (a shorter prompt, 6 tokens) arrives,
    joins A's batch (grown from 1 row to 2) and is served in A's decode steps: 11 steps in all,
    not 11 + 5. Both get what they get alone. The model has a full-attention layer and a
    sliding-window one (window 8: ring buffers on both sides of the splice; 24: a ring in the
    batch's longer cache only)."""
    cfg, params = chat_model(tok, context=256)
    cfg = dataclasses.replace(cfg, sliding_window=window,
                              layer_types=("sliding_attention", "full_attention"))  # fmt: skip
    prompt_a, prompt_b = list(range(40, 52)), [7, 8, 9, 10, 11]
    alone_a, alone_b = Job(prompt_a, 12), Job(prompt_b, 6)
    _serve(params, cfg, [alone_a])
    _serve(params, cfg, [alone_b])
    engine_box = {}
    b = Job(prompt_b, 6)
    a = Job(prompt_a, 12, at=3, then=lambda _: engine_box["e"].submit(b))
    engine = Engine(params, cfg, max_batch=8, start=False)
    engine_box["e"] = engine
    assert engine.submit(a)
    engine.start()
    try:
        assert a.done.wait(120) and b.done.wait(120)
    finally:
        engine.close()
    assert a.error is None and b.error is None
    _same(a, alone_a)
    _same(b, alone_b)
    stats = engine.stats
    assert stats["steps"] == 11 and stats["cohorts"] == 1, stats
    assert stats["joins"] == 1 and stats["grown"] == 1 and stats["step_rows"] == 11 + 5, stats


def test_finished_rows_leave_and_a_sparse_batch_shrinks(tok):
    """Five jobs prefilled together (a batch of 8 rows): four finish after 3 tokens, the fifth
    decodes on in a batch shrunk to 1 row; every job gets what it gets alone."""
    cfg, params = chat_model(tok, context=256)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16, 17]]
    lengths = [3, 3, 3, 3, 10]
    together = [Job(p, n) for p, n in zip(prompts, lengths, strict=True)]
    stats = _serve(params, cfg, together)
    assert stats["prefills"] == 1 and stats["compacted"] == 1 and stats["steps"] == 9, stats
    assert stats["step_rows"] == 5 * 2 + 7, stats  # 2 steps of 5 live rows, 7 of the last one
    for j, p, n in zip(together, prompts, lengths, strict=True):
        alone = Job(p, n)
        _serve(params, cfg, [alone])
        _same(j, alone)


def test_warm_up_compiles_before_the_first_request_and_health_answers_meanwhile(tok):
    """`serve_cloud(warm_up=True)`: `/health` answers while the engine compiles (503, `warming
    up`: an answer from before the warm-up ended), a request sent meanwhile waits and is
    answered, `/health` is then ok; a batch of two rows of the warmed shapes compiles nothing
    more (the jitted functions' caches do not grow)."""
    import json
    import urllib.error
    import urllib.request

    from floe_jax.decode import advance_jit, prefill_jit
    from floe_jax.inference.server import serve_cloud

    def health(url):
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    cfg, params = chat_model(tok, context=176, seed=7)  # shapes no other test compiles
    with serve_cloud(params, cfg, tok, model_name="tiny", warm_up=True, max_batch=2,
                     warm_up_prompt_tokens=16, default_max_tokens=4) as srv:  # fmt: skip
        status, body = health(srv.url)
        assert status == 503 and body["status"] == "warming up", body
        got = {}
        req = urllib.request.Request(srv.url + "/v1/completions", json.dumps({
            "model": "tiny", "prompt": "the dog", "max_tokens": 4, "temperature": 0}).encode(),
            headers={"Content-Type": "application/json"})  # fmt: skip
        t = threading.Thread(target=lambda: got.update(
            r=json.loads(urllib.request.urlopen(req, timeout=300).read())))  # fmt: skip
        t.start()
        while srv.engine.warming:
            assert health(srv.url)[0] in (503, 200)
            time.sleep(0.05)
        t.join(300)
        engine = srv.engine
        assert engine.warm_up_error is None and engine.stats["warm_up_shapes"] == 2  # B 1, 2
        assert health(srv.url) == (200, {"status": "ok"})
        assert got["r"]["choices"][0]["finish_reason"] == "length"
        sizes = prefill_jit._cache_size(), advance_jit._cache_size()
        jobs = [Job([5, 6, 7], 4), Job(list(range(20, 32)), 4)]
        with engine._cv:  # queued together: one prefill of two rows
            assert all(engine.submit(j) for j in jobs)
        assert all(j.done.wait(60) and j.error is None for j in jobs)
        assert (prefill_jit._cache_size(), advance_jit._cache_size()) == sizes


def test_max_batch_past_the_largest_bucket_is_refused(tok):
    cfg, params = chat_model(tok)
    with pytest.raises(ValueError, match="max_batch 65 is past the largest batch bucket 64"):
        Engine(params, cfg, max_batch=65, start=False)
