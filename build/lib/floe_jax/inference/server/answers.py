"""The OpenAI response rows of `serve_cloud`: log-probs of completions (with the prompt's, for
`echo` and vLLM's `prompt_logprobs`) and of chat, usage, and the response head."""

from __future__ import annotations

import time
import uuid

from floe_jax.inference.server.choice import Choice


class AnswerRows:
    """Builds response rows from finished or running `Choice`s; needs `self.tok` (`Tokens`)
    and `self.cfg` (`ServeConfig`)."""

    def _token(self, i: int, as_ids: bool) -> str:
        return f"token_id:{i}" if as_ids else self.tok.text(i)

    def _completion_logprobs(self, c: Choice, lo: int, hi: int, as_ids: bool, offset: int):
        toks = [self._token(t, as_ids) for t in c.ids[lo:hi]]
        offs, pos = [], offset
        for t in c.ids[lo:hi]:
            offs.append(pos)
            pos += len(self.tok.text(t))
        tops = None
        if c.s.top_logprobs:
            tops = []
            for ids, lps in zip(c.tops[lo:hi], c.top_lps[lo:hi], strict=True):
                d: dict[str, float] = {}
                for i, lp in zip(ids, lps, strict=True):
                    d.setdefault(self._token(i, as_ids), lp)  # a repeated string keeps the likelier
                tops.append(d)
        return {"tokens": toks, "token_logprobs": c.logprobs[lo:hi], "top_logprobs": tops,
                "text_offset": offs}  # fmt: skip

    def _chat_logprobs(self, c: Choice, lo: int, hi: int, as_ids: bool):
        def entry(i, lp):
            return {"token": self._token(i, as_ids), "logprob": lp, "bytes": self.tok.bytes(i)}

        content = []
        for j in range(lo, hi):
            e = entry(c.ids[j], c.logprobs[j])
            e["top_logprobs"] = [entry(i, lp) for i, lp in zip(c.tops[j], c.top_lps[j],
                                                                strict=True)]  # fmt: skip
            content.append(e)
        return {"content": content}

    def _echo_logprobs(self, c: Choice, as_ids: bool) -> dict:
        """OpenAI's legacy `echo` with `logprobs`: the prompt's tokens first (the first with no
        log-prob), then the completion's."""
        offs, pos = [], 0
        for t in c.prompt:
            offs.append(pos)
            pos += len(self.tok.text(t))
        gen = self._completion_logprobs(c, 0, len(c.ids), as_ids, pos)
        tops = None
        if gen["top_logprobs"] is not None:
            tops = [None]
            for ids, lps in zip(c.prompt_tops, c.prompt_top_lps, strict=True):
                d: dict[str, float] = {}
                for i, lp in zip(ids, lps, strict=True):
                    d.setdefault(self._token(i, as_ids), lp)
                tops.append(d)
            tops += gen["top_logprobs"]
        return {"tokens": [self._token(t, as_ids) for t in c.prompt] + gen["tokens"],
                "token_logprobs": [None, *c.prompt_lps, *gen["token_logprobs"]],
                "top_logprobs": tops, "text_offset": offs + gen["text_offset"]}  # fmt: skip

    def _prompt_logprobs(self, c: Choice, k: int) -> list:
        """vLLM's `prompt_logprobs`: per prompt position (the first None), token id -> log-prob,
        rank and text, the prompt's own token and the k likeliest."""
        out: list = [None]
        for j, t in enumerate(c.prompt[1:]):
            d = {str(t): {"logprob": c.prompt_lps[j], "rank": c.prompt_ranks[j],
                          "decoded_token": self.tok.text(t)}}  # fmt: skip
            tops = zip(c.prompt_tops[j][:k], c.prompt_top_lps[j][:k], strict=True)
            for r, (i, lp) in enumerate(tops):
                d.setdefault(str(i), {"logprob": lp, "rank": r + 1,
                                      "decoded_token": self.tok.text(i)})  # fmt: skip
            out.append(d)
        return out

    @staticmethod
    def _usage(prompts, choices) -> dict:
        p = sum(len(x) for x in prompts)
        n = sum(len(c.ids) for c in choices)
        return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}

    def _head(self, kind: str) -> dict:
        prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": kind,
                "created": int(time.time()), "model": self.cfg.model_name}  # fmt: skip
