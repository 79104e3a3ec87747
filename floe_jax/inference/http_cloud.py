"""`HTTPCloud`: a client for OpenAI-compatible completion servers (vLLM, hosted APIs,
`serve_cloud`).

Each prefix is one `POST {base_url}/v1/completions` with `prompt` (text, or the token id list),
`max_tokens=1`, `logprobs=k`, `echo=false`; the next-token top-k is read from
`choices[0].logprobs.top_logprobs[0]`, a dict token -> log-prob. Keys of the form `token_id:N`
(vLLM's `return_tokens_as_token_ids`) are read as cloud ids.

Requests run concurrently on a thread pool; each has a timeout and is retried with exponential
backoff on connection errors, timeouts and HTTP 408, 429, 500, 502, 503 and 504. A row that
still fails comes back missing with its reason (`CloudDistribution.errors`) and is counted in
`failures`; nothing raises out of `next_token`, so the generation loop degrades to the edge.
Standard library only.
"""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import math
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from floe_jax.inference.cloud import CloudDistribution, CloudError, Prefix

_TOKEN_ID = re.compile(r"^token_id:(-?\d+)$")
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class HTTPCloud:
    """OpenAI-compatible completions client returning sparse top-k distributions.

    Args:
      base_url: e.g. `http://127.0.0.1:8000` (with or without a trailing `/v1`).
      model: the `model` field of each request.
      top_k: `logprobs=k` (APIs allow up to 20; vLLM up to its `max_logprobs`).
      timeout_s: per-attempt socket timeout.
      retries: extra attempts after the first.
      backoff_s: first retry delay; doubles each retry.
      max_workers: concurrent requests.
      prompt: `"text"` sends the prefix text, `"ids"` its token ids (a shared tokenizer).
      token_ids: ask for `token_id:N` keys (vLLM `return_tokens_as_token_ids`).
      api_key: sent as a Bearer token when given.
      sleep: injected for tests.
    """

    kind = "sparse"

    def __init__(
        self,
        base_url: str,
        *,
        model: str = "floe-cloud",
        top_k: int = 20,
        timeout_s: float = 10.0,
        retries: int = 2,
        backoff_s: float = 0.2,
        max_workers: int = 8,
        prompt: str = "text",
        token_ids: bool = False,
        api_key: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if prompt not in ("text", "ids"):
            raise ValueError(f"HTTPCloud prompt={prompt!r}: use 'text' or 'ids'")
        if top_k < 1:
            raise ValueError(f"HTTPCloud top_k must be >= 1, got {top_k}")
        url = base_url.rstrip("/")
        self.url = (url if url.endswith("/v1") else url + "/v1") + "/completions"
        self.model, self.top_k, self.timeout_s = model, top_k, timeout_s
        self.retries, self.backoff_s, self.prompt, self.token_ids = (
            retries,
            backoff_s,
            prompt,
            token_ids,
        )
        self.api_key, self._sleep = api_key, sleep
        self._pool = cf.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="httpcloud")
        self._lock = threading.Lock()
        self.failures: Counter[str] = Counter()
        self.requests = 0

    # -------------------------------------------------------------- one request
    def _body(self, p: Prefix) -> dict:
        if self.prompt == "ids" and p.ids is not None:
            prompt = list(p.ids)
        elif p.text is not None:
            prompt = p.text
        else:
            raise CloudError("HTTPCloud(prompt='text') got a prefix without text")
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": 1,
            "logprobs": self.top_k,
            "echo": False,
            "temperature": 0.0,
        }
        if self.token_ids:
            body["return_tokens_as_token_ids"] = True
        return body

    def _post(self, data: bytes) -> bytes:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            return resp.read()

    def request(self, p: Prefix) -> tuple[list[str], list[int | None], list[float]]:
        """One prefix -> (token strings, ids or None, log-probs), retrying; raises CloudError."""
        data = json.dumps(self._body(p)).encode()
        last = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                self._sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                raw = self._post(data)
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code} from {self.url}"
                if e.code in _RETRY_STATUS:
                    continue
                raise CloudError(last) from None
            except TimeoutError:
                last = f"timeout after {self.timeout_s}s from {self.url}"
                continue
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                last = f"connection error to {self.url}: {getattr(e, 'reason', e)}"
                continue
            return self.parse(raw)
        raise CloudError(f"{last} (after {self.retries + 1} attempts)")

    @staticmethod
    def parse(raw: bytes) -> tuple[list[str], list[int | None], list[float]]:
        """Reads `choices[0].logprobs.top_logprobs[0]`; raises CloudError on anything else."""
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise CloudError(f"response is not JSON: {raw[:80]!r}") from None
        try:
            top = obj["choices"][0]["logprobs"]["top_logprobs"][0]
        except (KeyError, IndexError, TypeError):
            raise CloudError("response has no choices[0].logprobs.top_logprobs[0]") from None
        if not isinstance(top, dict) or not top:
            raise CloudError("top_logprobs[0] is not a non-empty dict token -> logprob")
        toks, ids, lps = [], [], []
        for tok, lp in top.items():
            if not isinstance(lp, int | float) or isinstance(lp, bool):
                raise CloudError(f"log-prob of {tok!r} is not a number: {lp!r}")
            if math.isnan(lp) or lp > 1e-4:
                raise CloudError(f"log-prob of {tok!r} is invalid: {lp!r}")
            m = _TOKEN_ID.match(tok)
            toks.append(tok)
            ids.append(int(m.group(1)) if m else None)
            lps.append(float(lp))
        return toks, ids, lps

    # -------------------------------------------------------------- a batch
    def _one(self, p: Prefix):
        with self._lock:
            self.requests += 1
        try:
            return self.request(p), None
        except CloudError as e:
            reason = str(e)
            key = reason.split(" from ")[0].split(":")[0].split(" (after")[0]
            with self._lock:
                self.failures[key] += 1
            return None, reason

    def next_token(self, prefixes: Sequence[Prefix]) -> CloudDistribution:
        results = list(self._pool.map(self._one, prefixes))
        B, K = len(prefixes), self.top_k
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
            ids[b, :n] = [-1 if x is None else x for x in i[:n]]
            lps[b, :n] = lp[:n]
            ok[b] = True
        return CloudDistribution(
            ok=ok, top_ids=ids, top_tokens=tokens, top_logprobs=lps, errors=errors
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
