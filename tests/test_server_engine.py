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

from floe_jax.config import RopeScaling
from floe_jax.inference.server.engine import Engine, WarmUp


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


def _staggered(params, cfg, first, later, *, at=3, max_batch=8):
    """Serves `first` alone; after its `at`-th token the jobs `later` are queued together (one
    prefill). Returns the engine's stats once all are done."""
    box = {}

    def arrive(_):
        with box["e"]._cv:  # all queued before the engine takes the next prefill
            assert all(box["e"].submit(j) for j in later)

    first.at, first.then = at, arrive
    engine = Engine(params, cfg, max_batch=max_batch, start=False)
    box["e"] = engine
    assert engine.submit(first)
    engine.start()
    try:
        for j in [first, *later]:
            assert j.done.wait(120), "a job did not finish"
    finally:
        engine.close()
    for j in [first, *later]:
        assert j.error is None, j.error
    return engine.stats


def test_rows_join_at_once_from_another_prompt_bucket_and_into_a_freed_row(tok):
    """A (20-token prompt: bucket 32) decodes alone; after its 3rd token B and C (prompts of 5
    and 7 tokens: bucket 16) join it together, one prefill of 2 rows spliced at once (the
    batch grown from 1 row to 4). B finishes; its freed row decodes padding on while C's 17th
    token comes, then D arrives and joins into that row, whose slots still hold B's keys and
    values (B's prompt before D's spliced slots, padding in them). Every job gets what it
    gets alone."""
    cfg, params = chat_model(tok, context=256)
    prompts = {"a": list(range(40, 60)), "b": [7, 8, 9, 10, 11], "c": [3, 4, 5, 6, 7, 8, 9],
               "d": [21, 22, 23, 24, 25, 26]}  # fmt: skip
    lengths = {"a": 30, "b": 4, "c": 25, "d": 5}
    alone = {n: Job(prompts[n], lengths[n]) for n in prompts}
    for j in alone.values():
        _serve(params, cfg, [j])
    jobs = {n: Job(prompts[n], lengths[n]) for n in prompts}
    box = {}

    def d_arrives(_):
        with box["e"]._cv:
            assert box["e"].submit(jobs["d"])

    def d_row(_):  # D's first token, on the engine thread: the row it was given
        box["d_row"] = box["e"]._cohorts[0].jobs.index(jobs["d"])

    jobs["c"].at, jobs["c"].then = 17, d_arrives  # at slot 50: B's prompt is in 29..33
    jobs["d"].at, jobs["d"].then = 1, d_row
    engine = Engine(params, cfg, max_batch=8, start=False)
    box["e"] = engine

    def b_c_arrive(_):
        with engine._cv:
            assert engine.submit(jobs["b"]) and engine.submit(jobs["c"])

    jobs["a"].at, jobs["a"].then = 3, b_c_arrive
    assert engine.submit(jobs["a"])
    engine.start()
    try:
        for j in jobs.values():
            assert j.done.wait(120), "a job did not finish"
    finally:
        engine.close()
    for n in jobs:
        assert jobs[n].error is None, jobs[n].error
        _same(jobs[n], alone[n])
    stats = engine.stats
    assert stats["cohorts"] == 1 and stats["joins"] == 2 and stats["joined_rows"] == 3, stats
    assert stats["grown"] == 1, stats
    assert box["d_row"] == 1, box  # B's row (A has row 0, C row 2; row 3 was never used)


def _longrope(cfg, original: int):
    """`cfg` with Phi-4-mini's kind of RoPE: longrope factors that switch from short to long
    once a forward's sequence passes `original` positions."""
    rope = RopeScaling(rope_type="longrope", original_max_position_embeddings=original,
                       factor=4.0, short_factor=(1.0, 1.05, 1.3, 1.8),
                       long_factor=(1.0, 1.6, 3.5, 9.0))  # fmt: skip
    cfg = dataclasses.replace(cfg, rope_scaling=rope)
    assert cfg.rope_switches and cfg.rotary_dim // 2 == 4
    return cfg


def test_a_longrope_model_serves_staggered_requests_each_as_alone(tok):
    """longrope (factors switch past 20 positions): A (12-token prompt, 12 tokens) decodes
    alone; after its 6th token B and E (short prompts and answers, never past 20 positions)
    arrive. A forward's factors follow its longest row, and A's switch to the long ones while
    B would still decode beside it, so they do not join A's batch (a join would also lose the
    cache's tokens): they share one prefill of their own, whose cache of 16 + 4 slots never
    passes 20. Each gets what it gets alone, and no request fails."""
    cfg, params = chat_model(tok, context=64)
    cfg = _longrope(cfg, 20)
    prompts = {"a": list(range(40, 52)), "b": [7, 8, 9, 10, 11], "e": [30, 31, 32]}
    lengths = {"a": 12, "b": 5, "e": 3}
    alone = {n: Job(prompts[n], lengths[n]) for n in prompts}
    for j in alone.values():
        _serve(params, cfg, [j])
    jobs = {n: Job(prompts[n], lengths[n]) for n in prompts}
    stats = _staggered(params, cfg, jobs["a"], [jobs["b"], jobs["e"]], at=6)
    for n in jobs:
        _same(jobs[n], alone[n])
    assert stats["joins"] == 0 and stats["cohorts"] == 2 and stats["prefills"] == 2, stats
    assert stats["prefill_rows"] == 3, stats


def test_warm_up_compiles_the_bucket_that_holds_its_prompt_tokens(tok):
    """`WarmUp(max_prompt=17)`: a 17-token prompt takes bucket 32, so the warm-up compiles
    buckets 16 and 32 (not only those up to 17), and serving such a prompt compiles nothing."""
    from floe_jax.decode import prefill_jit

    cfg, params = chat_model(tok, context=48, seed=11)  # shapes no other test compiles
    engine = Engine(params, cfg, max_batch=1, start=False)
    engine.warm_up(WarmUp(max_prompt=17, max_tokens=1))
    assert engine.stats["warm_up_shapes"] == 2, engine.stats  # buckets 16, 32 (of 16, 32, 48)
    size = prefill_jit._cache_size()
    job = Job(list(range(3, 20)), 1)
    _serve_on(engine, job)
    assert prefill_jit._cache_size() == size


def _serve_on(engine, job):
    assert engine.submit(job)
    engine.start()
    try:
        assert job.done.wait(120), "the job did not finish"
    finally:
        engine.close()
    assert job.error is None, job.error


def test_max_batch_past_the_largest_bucket_is_refused(tok):
    cfg, params = chat_model(tok)
    with pytest.raises(ValueError, match="max_batch 65 is past the largest batch bucket 64"):
        Engine(params, cfg, max_batch=65, start=False)


def test_one_token_answers_come_from_the_memo_for_a_prompt_seen_before(tok):
    """`memo_bytes`: a one-token job whose prompt ids were prefilled before is answered from the
    memo (the same log-probs, no prefill); a longer job, or one with another prompt, is not."""
    cfg, params = chat_model(tok)
    p1, p2 = tok.encode("user: hello there")[:12], tok.encode("user: what is it")[:12]
    assert p1 != p2

    def run(engine, jobs):
        for j in jobs:
            assert engine.submit(j)
        for j in jobs:
            assert j.done.wait(120), "a job did not finish"
            assert j.error is None, j.error

    engine = Engine(params, cfg, max_batch=8, memo_bytes=1 << 20)
    try:
        first = [Job(p1, 1), Job(p2, 1)]
        run(engine, first)
        rows = engine.stats["prefill_rows"]
        again, longer, other = Job(p1, 1), Job(p1, 3), Job(p2[:-1], 1)
        run(engine, [again, longer, other])
        assert engine.stats["memo_hits"] == 1
        assert engine.stats["prefill_rows"] - rows == 2  # `longer` and `other` were prefilled
        np.testing.assert_array_equal(again.lps[0], first[0].lps[0])
        np.testing.assert_allclose(longer.lps[0], first[0].lps[0], atol=2e-5)
        run(engine, [Job(p2[:-1], 1)])  # `other`'s prompt, memoised in turn
        assert engine.stats["memo_hits"] == 2
    finally:
        engine.close()
    engine = Engine(params, cfg, max_batch=8)  # off by default
    try:
        run(engine, [Job(p1, 1)])
        run(engine, [Job(p1, 1)])
        assert engine.stats["memo_hits"] == 0 and engine.stats["prefill_rows"] == 2
    finally:
        engine.close()
