"""`HTTPCloud`: a client for OpenAI-compatible servers (vLLM, hosted chat APIs, `serve_cloud`).

Two APIs (`api=`):

- `"completions"`: `POST {base}/v1/completions` with the prefix as `prompt` (text, or token ids),
  `max_tokens=1`, `logprobs=k`; the top-k is `choices[0].logprobs.top_logprobs[0]`.
- `"chat"`: `POST {base}/v1/chat/completions` with the conversation so far as messages: the first
  text of a request stream is the user's message, what the stream added since is the assistant's
  partial reply, continued (`continue_final_message`, vLLM's and `serve_cloud`'s) so the top-k is
  that of the reply's next token: `choices[0].logprobs.content[0].top_logprobs`, each token read
  from its `bytes`. Most hosted APIs expose only chat, with `top_logprobs` <= 20.

Token keys are strings (the decoded token text), or `token_id:N` (vLLM's
`return_tokens_as_token_ids`). String keys mean nothing without the edge vocabulary, so they are
mapped here, through `floe_jax.inference.align` (`StringMapper` over `vocab_of(edge_tokenizer)`;
`token_id:N` through `build_map` when the cloud's tokenizer is given too): the distribution comes
back in edge ids, and `generate_fused` is called with neither `vocab_map` nor `mapper`. A client
with string keys and no way to map them is refused at construction. A row whose top-k mass
mostly misses the edge vocabulary (the share of it that maps below `min_mapped_share`, none at
all included) is a failure (`unmapped`), never a fused token: what is left of it would be fused
as if it were the cloud's answer.

Each attempt has a time limit (`timeout_s`, connect to last byte: a server that drip-feeds
its answer cannot stretch it) and each request one total deadline (`deadline_s`, covering
retries and their waits, in real time and in the injected `sleep`'s time); an attempt past
either is cancelled (its socket shut), and `close()` cancels all in flight. Retried: connection
errors, timeouts and HTTP 408, 429, 500, 502, 503, 504, after `Retry-After` when the server sends
one, else exponential backoff. A 400 that names a cap on log-probs lowers `top_k` to it for this
and later requests (`logprobs_cap`), with a warning, instead of failing every request. Every
failure reason carries the server's own error message. Nothing raises out of `next_token`: a
failed row comes back missing with its reason.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import http.client
import json
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from floe_jax.inference.align import AlignConfig, StringMapper, build_map, vocab_of
from floe_jax.inference.cloud import CloudDistribution, CloudError, Draft, Prefix
from floe_jax.inference.http_cloud.parse import (
    TOKEN_ID,
    chat_top,
    completion_top,
    echo_rows,
    error_message,
    logprobs_cap,
    retry_after,
)
from floe_jax.inference.http_cloud.propose import Proposal, proposal_rows
from floe_jax.inference.http_cloud.transport import Cancelled, Transport

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
APIS = ("completions", "chat")
MAX_STREAMS = 4096  # chat streams whose first message is remembered


def openai_settings(environ: Mapping[str, str]) -> dict:
    """`base_url` and `api_key` for `HTTPCloud` from the variables the official `openai` client
    reads (`OPENAI_BASE_URL`, `OPENAI_API_KEY`). The library reads no environment itself: a
    command line passes `os.environ` here once, e.g. `HTTPCloud(**openai_settings(os.environ),
    edge_tokenizer=tok)`."""
    return {"base_url": environ.get("OPENAI_BASE_URL"), "api_key": environ.get("OPENAI_API_KEY")}


class HTTPCloud:
    """A sparse top-k cloud over HTTP in the OpenAI schema (module docstring).

    Args:
      base_url: e.g. `http://127.0.0.1:8000` (with or without `/v1`); see `openai_settings`.
      api: `"completions"` or `"chat"`.
      model: the `model` field.
      top_k: log-probs asked for (lowered to a server's cap when a 400 names one).
      timeout_s: the time limit of one attempt, connect to last byte.
      deadline_s: the total deadline of one request, retries and waits included (default:
        `timeout_s` per attempt plus the backoff waits).
      retries: extra attempts after the first.
      backoff_s: first retry wait when the server sends no `Retry-After`; doubles each retry.
      max_workers: concurrent requests.
      prompt: completions only: `"text"` sends the prefix text, `"ids"` its token ids.
      token_ids: ask for `token_id:N` keys (vLLM's `return_tokens_as_token_ids`).
      api_key: sent as a Bearer token (None: none).
      headers: extra HTTP headers (e.g. an organisation or a gateway key).
      edge_tokenizer: the edge's tokenizer (or anything `vocab_of` reads): string keys are
        mapped onto its vocabulary here.
      cloud_tokenizer: the cloud's, to map `token_id:N` keys across vocabularies.
      mapper: a ready `StringMapper` (instead of `edge_tokenizer`).
      align: the alignment's fallback rule.
      min_mapped_share: the least share of an answer's top-k probability mass (sum of
        `exp(logprob)` over its tokens) that must map onto edge tokens; an answer below it is a
        failure (`unmapped`). 0.5 by default: at least half of what the cloud said must survive
        the mapping for the fused token to be called the cloud's.
      system: chat only: a system message put first.
      continue_final: chat only: send `continue_final_message` / `add_generation_prompt=false`
        with a partial reply (False for a server that refuses those fields: the reply so far is
        then sent as a finished assistant message).
      sleep: waits between retries (inject a fake for simulated time).
    """

    kind = "sparse"

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api: str = "completions",
        model: str = "floe-cloud",
        top_k: int = 20,
        timeout_s: float = 10.0,
        deadline_s: float | None = None,
        retries: int = 2,
        backoff_s: float = 0.2,
        max_workers: int = 8,
        prompt: str = "text",
        token_ids: bool = False,
        api_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        edge_tokenizer=None,
        cloud_tokenizer=None,
        mapper: StringMapper | None = None,
        align: AlignConfig | None = None,
        min_mapped_share: float = 0.5,
        system: str | None = None,
        continue_final: bool = True,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not base_url:
            raise ValueError(
                "HTTPCloud needs base_url (`openai_settings(os.environ)` reads the "
                "OpenAI client's variables at the command line)"
            )
        if api not in APIS:
            raise ValueError(f"HTTPCloud api={api!r}: use one of {APIS}")
        if prompt not in ("text", "ids"):
            raise ValueError(f"HTTPCloud prompt={prompt!r}: use 'text' or 'ids'")
        if api == "chat" and prompt == "ids":
            raise ValueError("HTTPCloud api='chat' sends text: use prompt='text'")
        if top_k < 1:
            raise ValueError(f"HTTPCloud top_k must be >= 1, got {top_k}")
        if not timeout_s > 0 or retries < 0 or backoff_s < 0 or max_workers < 1:
            raise ValueError("HTTPCloud: timeout_s > 0, retries >= 0, backoff_s >= 0 and "
                             "max_workers >= 1 are needed")  # fmt: skip
        if not 0.0 <= min_mapped_share <= 1.0:
            raise ValueError(
                f"HTTPCloud min_mapped_share must be in [0, 1], got {min_mapped_share}"
            )
        self.min_mapped_share = min_mapped_share
        align = align or AlignConfig()
        if mapper is None and edge_tokenizer is not None:
            vm = None
            if cloud_tokenizer is not None:
                vm = build_map(vocab_of(cloud_tokenizer), vocab_of(edge_tokenizer), align)
            mapper = StringMapper(vocab_of(edge_tokenizer), align, vm)
        if mapper is None and not token_ids:
            raise ValueError(
                "HTTPCloud gets token strings it cannot place in the edge vocabulary: pass "
                "edge_tokenizer= (and cloud_tokenizer= if the cloud's differs), or mapper=; or "
                "token_ids=True with a tokenizer shared by edge and cloud"
            )
        self.mapper, self.api, self.model = mapper, api, model
        self.top_k = self.asked_k = top_k
        self.logprobs_cap: int | None = None
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        if deadline_s is None:
            deadline_s = timeout_s * (retries + 1) + backoff_s * (2**retries - 1)
        if not deadline_s > 0:
            raise ValueError(f"HTTPCloud deadline_s must be > 0, got {deadline_s}")
        self.deadline_s = deadline_s
        self.prompt, self.token_ids, self.system = prompt, token_ids, system
        self.continue_final = continue_final
        hdrs = dict(headers or {})
        if api_key:
            hdrs.setdefault("Authorization", f"Bearer {api_key}")
        url = base_url.rstrip("/")
        root = url if url.endswith("/v1") else url + "/v1"
        self.url = root + ("/chat/completions" if api == "chat" else "/completions")
        self._transport = Transport(root, hdrs)
        self._endpoint = "/chat/completions" if api == "chat" else "/completions"
        self._sleep = sleep
        self._pool = cf.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="httpcloud")
        self._lock = threading.Lock()
        self._prompts: collections.OrderedDict = collections.OrderedDict()  # stream -> first text
        self._forgotten: collections.OrderedDict = collections.OrderedDict()  # evicted streams
        self.failures: Counter[str] = Counter()
        self.requests = 0

    # -------------------------------------------------------------- request bodies
    def _messages(self, p: Prefix) -> tuple[list[dict], bool]:
        """The conversation of a prefix, and whether it ends in a partial assistant reply.

        Raises `CloudError("position: ...")` when the answer's first token would not be the
        reply's next one: a partial reply without `continue_final` (the server would start a new
        turn), or a stream whose first text is unknown (evicted) or no longer a prefix."""
        text = p.text
        first, seen = None, False
        if p.stream is not None:
            with self._lock:
                if p.stream in self._forgotten:
                    raise CloudError(f"position: this stream's first message was forgotten "
                                     f"(over {MAX_STREAMS} streams)")  # fmt: skip
                seen = p.stream in self._prompts
                first = self._prompts.setdefault(p.stream, text)
                self._prompts.move_to_end(p.stream)
                while len(self._prompts) > MAX_STREAMS:
                    self._forgotten[self._prompts.popitem(last=False)[0]] = None
                while len(self._forgotten) > 16 * MAX_STREAMS:
                    self._forgotten.popitem(last=False)
        if seen and not text.startswith(first):
            raise CloudError("position: the stream's text no longer extends its first message, "
                             "so the reply's next token cannot be asked for")  # fmt: skip
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        if first is not None and len(text) > len(first):
            if not self.continue_final:
                raise CloudError("position: continue_final=False sends the partial reply as "
                                 "a finished turn: the answer would start a new one")  # fmt: skip
            msgs += [{"role": "user", "content": first},
                     {"role": "assistant", "content": text[len(first) :]}]  # fmt: skip
            return msgs, True
        return msgs + [{"role": "user", "content": text}], False

    def _body(self, p: Prefix, k: int) -> dict:
        body: dict = {"model": self.model, "max_tokens": 1, "temperature": 0.0}
        if self.api == "chat":
            if p.text is None:
                raise CloudError("bad prefix: HTTPCloud(api='chat') got a prefix without text")
            msgs, partial = self._messages(p)
            body.update(messages=msgs, logprobs=True, top_logprobs=k)
            if partial:
                body.update(continue_final_message=True, add_generation_prompt=False)
        else:
            if self.prompt == "ids" and p.ids is not None:
                body["prompt"] = list(p.ids)
            elif p.text is not None:
                body["prompt"] = p.text
            else:
                raise CloudError("bad prefix: HTTPCloud(prompt='text') got a prefix without text")
            body["logprobs"] = k
        if self.token_ids:
            body["return_tokens_as_token_ids"] = True
        return body

    # -------------------------------------------------------------- one request
    def request(self, p: Prefix, *, echo: bool = False, propose: int = 0):
        """One prefix -> [(token, log-prob)] best first, within `deadline_s` and the prefix's
        `budget_s` (retries and waits included); raises `CloudError` with the reason, the
        server's message in it. `propose=k` (chat): k generated tokens, `propose.proposal_rows`."""
        start = time.monotonic()
        limit = self.deadline_s if p.budget_s is None else min(self.deadline_s, p.budget_s)
        waited = 0.0  # time spent in `sleep` (virtual under a fake sleep)
        attempt, last = 0, "no attempt"
        while True:
            k = self.top_k
            body = self._body(p, k)
            if echo:
                body["echo"] = True
            if propose:  # issue 20, chat speculation: see propose.py
                body["max_tokens"] = propose
            data = json.dumps(body).encode()
            end = start + limit - waited  # the request's (waits in `sleep` count)
            deadline = min(time.monotonic() + self.timeout_s, end)
            try:
                resp = self._transport.post(self._endpoint, data, deadline)
            except Cancelled as e:
                if "closed" in str(e):
                    raise CloudError("closed: the client was closed") from None
                if time.monotonic() >= end:
                    raise CloudError(f"deadline: no answer within {limit:.3g}s "
                                     f"({last})") from None  # fmt: skip
                last, wait = f"timeout: no answer within {self.timeout_s}s ({self.url})", None
            except (OSError, http.client.HTTPException) as e:  # e.g. a body cut short
                last = f"connection error: {type(e).__name__}: {e} ({self.url})"
                wait = None
            else:
                if resp.status == 200:
                    if echo:
                        return echo_rows(resp.body)
                    if propose:
                        return proposal_rows(resp.body)
                    return chat_top(resp.body) if self.api == "chat" else completion_top(resp.body)
                msg = error_message(resp.body)
                last = f"HTTP {resp.status}: {msg} ({self.url})"
                cap = logprobs_cap(msg, k) if resp.status in (400, 422) else None
                if cap is not None:
                    self._lower_cap(cap, msg)
                    continue  # the same attempt, asking for what the server allows
                if resp.status not in RETRY_STATUS:
                    raise CloudError(last)
                wait = retry_after(resp.headers.get("retry-after"))
            if attempt >= self.retries:
                raise CloudError(f"{last} (after {attempt + 1} attempts)")
            wait = self.backoff_s * 2**attempt if wait is None else wait
            spent = time.monotonic() - start + waited
            if spent + wait >= limit:
                raise CloudError(f"deadline: a retry in {wait:.3g}s would pass the "
                                 f"{limit:.3g}s deadline ({last})")  # fmt: skip
            self._sleep(wait)
            waited += wait
            attempt += 1

    def _lower_cap(self, cap: int, msg: str) -> None:
        with self._lock:
            if self.logprobs_cap is not None and self.logprobs_cap <= cap:
                return
            self.logprobs_cap = self.top_k = cap
        warnings.warn(f"HTTPCloud: {self.url} allows {cap} log-probs, not {self.asked_k}: asking "
                      f"for {cap} from now on (server: {msg})", stacklevel=2)  # fmt: skip

    # -------------------------------------------------------------- a batch
    def _ids(self, toks: list[str], *, fallback: bool = True) -> list[int]:
        out = []
        for t in toks:
            m = TOKEN_ID.match(t)
            cid = int(m.group(1)) if m else None
            if self.mapper is not None:
                out.append(self.mapper(t, cid, fallback=fallback))
            else:  # token_ids=True without tokenizers: a vocabulary shared with the edge
                out.append(-1 if cid is None or cid < 0 else cid)
        return out

    def _row(self, top: list[tuple[str, float]]):
        toks = [t for t, _ in top]
        ids = self._ids(toks)
        lps = [lp for _, lp in top]
        if all(i < 0 for i in ids):
            raise CloudError(f"unmapped: none of the cloud's {len(toks)} tokens maps to the "
                             f"edge vocabulary (first: {toks[:3]!r})")  # fmt: skip
        p = np.exp(np.asarray(lps, np.float64))
        share = float(p[np.asarray(ids) >= 0].sum() / p.sum()) if p.sum() > 0 else 0.0
        if share < self.min_mapped_share:
            lost = [t for t, i in zip(toks, ids, strict=True) if i < 0]
            raise CloudError(f"unmapped: {share:.1%} of the top-{len(toks)} mass maps to the edge "
                             f"vocabulary, under min_mapped_share={self.min_mapped_share} "
                             f"(unmapped: {lost[:3]!r})")  # fmt: skip
        return toks, ids, lps

    def _failed(self, e: CloudError) -> str:
        reason = str(e)
        with self._lock:
            self.failures[reason.split(":")[0].split(" (")[0]] += 1
        return reason

    def _one(self, p: Prefix):
        with self._lock:
            self.requests += 1
        try:
            return self._row(self.request(p)), None
        except CloudError as e:
            return None, self._failed(e)

    def _rows(self, results) -> CloudDistribution:
        B, K = len(results), max(self.asked_k, 1)
        ok = np.zeros(B, bool)
        ids = np.full((B, K), -1, np.int32)
        lps = np.full((B, K), -np.inf, np.float32)
        tokens: list[list[str]] = [[] for _ in range(B)]
        errors: list[str | None] = [None] * B
        for b, (res, err) in enumerate(results):
            if res is None:
                errors[b] = err
                continue
            t, i, lp = res
            n = min(len(t), K)
            tokens[b] = t[:n]
            ids[b, :n] = i[:n]
            lps[b, :n] = lp[:n]
            ok[b] = True
        return CloudDistribution(
            ok=ok, top_ids=ids, top_tokens=tokens, top_logprobs=lps, errors=errors
        )

    def score(self, draft: Draft) -> CloudDistribution:
        """The cloud's top-k at each of the draft's k + 1 positions from one completions request
        (`echo` with `logprobs`: the prompt's log-probs, as OpenAI's legacy API, vLLM and
        `serve_cloud` give them; `max_tokens=1` adds the position after the whole draft).

        Positions are found by token count (`prompt="ids"`: position j is `id_ends[j]` tokens
        in) or by `text_offset` (text: the token that starts at `text_ends[j]` characters); one
        the cloud's tokens do not start at is missing (`unscorable`). Chat has no prompt
        log-probs: position 0 alone is asked for (the guard asks `next_token`)."""
        P = draft.positions
        if self.api == "chat":
            return CloudDistribution.missing(P, "unscorable")
        with self._lock:
            self.requests += 1
        by_ids = self.prompt == "ids" and draft.ids is not None and draft.id_ends is not None
        try:
            if not by_ids and (draft.text is None or draft.text_ends is None):
                raise CloudError("bad prefix: HTTPCloud(prompt='text') got a draft without text")
            rows, offsets = self.request(draft, echo=True)
        except CloudError as e:
            return CloudDistribution.missing(P, self._failed(e))
        if by_ids:
            where = list(draft.id_ends)
        else:
            first = {}
            for i, o in enumerate(offsets):
                if i >= 1:
                    first.setdefault(o, i)
            where = [first.get(e, -1) if e >= 0 else -1 for e in draft.text_ends]
        results = []
        for i in where:
            if not 1 <= i < len(rows) or rows[i] is None:
                results.append((None, "unscorable"))
                continue
            try:
                results.append((self._row(rows[i]), None))
            except CloudError as e:
                results.append((None, self._failed(e)))
        return self._rows(results)

    @property
    def can_propose(self) -> bool:
        """A chat server proposes (`propose`); a completions server scores drafts."""
        return self.api == "chat"

    def propose(self, prefix: Prefix, k: int) -> Proposal:
        """Chat: one request for the cloud's next `k` tokens after `prefix` and its top-k before
        each (`propose.Proposal`): the same conversation as `next_token` sends, `max_tokens=k`,
        greedy. Never raises: a failed request comes back missing with its reason."""
        if self.api != "chat":
            raise ValueError("propose is for chat clouds; a completions server scores a draft")
        with self._lock:
            self.requests += 1
        try:
            content = self.request(prefix, propose=k)
        except CloudError as e:
            return Proposal.missing(k, self._failed(e))
        return self.read_proposal(content, k)

    def read_proposal(self, content, k: int) -> Proposal:
        """The `Proposal` of `proposal_rows(answer)`: each position's top-k mapped as any row
        (`_row`, with the fallback), each proposed token by exact match only: a token the edge
        has only a fallback for (" theory" -> " the") is -1, since the edge would emit another
        token and go on conditioned on the wrong text; the edge cannot follow the proposal past
        it."""
        results, ids, pieces = [], np.full(k, -1, np.int32), []
        for j, (key, piece, top) in enumerate(content[:k]):
            try:
                results.append((self._row(top), None))
            except CloudError as e:
                results.append((None, self._failed(e)))
            ids[j] = self._ids([key], fallback=False)[0]
            pieces.append(piece)
        results += [(None, "short")] * (k - len(results))  # the answer ended (a stop token)
        return Proposal(self._rows(results), ids, pieces)

    def next_token(self, prefixes: Sequence[Prefix]) -> CloudDistribution:
        return self._rows(list(self._pool.map(self._one, prefixes)))

    def close(self) -> None:
        """Cancels what is in flight (each request ends at once, with reason `closed`) and
        stops the workers."""
        self._transport.reaper.cancel_all()
        self._pool.shutdown(wait=False, cancel_futures=True)
