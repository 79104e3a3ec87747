"""Reading OpenAI-schema answers: top log-probs of completions and chat, error bodies, the
log-probs cap a 400 names, and `Retry-After`."""

from __future__ import annotations

import email.utils
import json
import math
import re
import time

from floe_jax.inference.cloud import CloudError

TOKEN_ID = re.compile(r"^token_id:(-?\d+)$")


def parse_json(raw: bytes):
    """A response body as JSON; a body that is not JSON is a `CloudError` quoting it."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise CloudError(f"bad response: not JSON: {raw[:80]!r}") from None


def checked_logprob(tok: str, lp) -> float:
    """A server's log-prob for `tok` as a float; a non-number, NaN or positive one is a
    `CloudError` naming the token."""
    if not isinstance(lp, int | float) or isinstance(lp, bool):
        raise CloudError(f"bad response: log-prob of {tok!r} is not a number: {lp!r}")
    if math.isnan(lp) or lp > 1e-4:
        raise CloudError(f"bad response: log-prob of {tok!r} is invalid: {lp!r}")
    return float(lp)


def completion_top(raw: bytes) -> list[tuple[str, float]]:
    """`choices[0].logprobs.top_logprobs[0]` of a completions answer: [(token, log-prob)]."""
    obj = parse_json(raw)
    try:
        top = obj["choices"][0]["logprobs"]["top_logprobs"][0]
    except (KeyError, IndexError, TypeError):
        raise CloudError("bad response: no choices[0].logprobs.top_logprobs[0]") from None
    if not isinstance(top, dict) or not top:
        raise CloudError("bad response: top_logprobs[0] is not a non-empty dict token -> logprob")
    return [(str(t), checked_logprob(t, lp)) for t, lp in top.items()]


def echo_rows(raw: bytes) -> tuple[list[list[tuple[str, float]] | None], list[int]]:
    """The prompt's and the completion's top log-probs of an `echo` answer (OpenAI legacy): per
    token position, [(token, log-prob)] (None for the first, which has no context), and each
    token's `text_offset`."""
    obj = parse_json(raw)
    try:
        lp = obj["choices"][0]["logprobs"]
        tops, offsets = lp["top_logprobs"], lp.get("text_offset") or []
    except (KeyError, IndexError, TypeError):
        raise CloudError("bad response: no choices[0].logprobs.top_logprobs (echo)") from None
    if not isinstance(tops, list):
        raise CloudError("bad response: echo top_logprobs is not a list")
    rows: list[list[tuple[str, float]] | None] = []
    for top in tops:
        ok = isinstance(top, dict) and top
        rows.append([(str(t), checked_logprob(t, v)) for t, v in top.items()] if ok else None)
    return rows, [int(o) for o in offsets]


def chat_top(raw: bytes, position: int = 0) -> list[tuple[str, float]]:
    """`choices[0].logprobs.content[position].top_logprobs` of a chat answer: [(token, log-prob)],
    the token spelled by its `bytes` when given (decoded as UTF-8, an undecodable fragment kept
    as `\\xNN` escapes as the aligner spells it), else by `token`."""
    obj = parse_json(raw)
    try:
        top = obj["choices"][0]["logprobs"]["content"][position]["top_logprobs"]
    except (KeyError, IndexError, TypeError):
        raise CloudError(
            f"bad response: no choices[0].logprobs.content[{position}].top_logprobs"
        ) from None
    if not isinstance(top, list) or not top:
        raise CloudError("bad response: top_logprobs is not a non-empty list")
    out = []
    for e in top:
        if not isinstance(e, dict) or "logprob" not in e:
            raise CloudError(f"bad response: top_logprobs entry {e!r:.80}")
        tok = str(e.get("token", ""))
        b = e.get("bytes")
        if isinstance(b, list) and b and not TOKEN_ID.match(tok):
            try:
                tok = bytes(b).decode("utf-8", errors="backslashreplace")
            except (ValueError, TypeError):
                pass
        out.append((tok, checked_logprob(tok, e["logprob"])))
    return out


def error_message(raw: bytes, limit: int = 300) -> str:
    """The server's own words from an error body (OpenAI's `error.message`, FastAPI's
    `detail`, or the text)."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return raw[:limit].decode("utf-8", errors="replace").strip() or "(empty body)"
    msg = obj
    if isinstance(obj, dict):
        msg = obj.get("error", obj.get("detail", obj.get("message", obj)))
        if isinstance(msg, dict):
            msg = msg.get("message", msg)
    text = msg if isinstance(msg, str) else json.dumps(msg)
    return text[:limit]


def logprobs_cap(message: str, asked: int) -> int | None:
    """The cap on (top) log-probs that a 400 names, when it names one below `asked`.

    Servers word it differently ("must be <= 5", "greater than max allowed: 5", "Expected a
    value <= 20"); the message must mention log-probs, and the cap is the largest number in it
    below what was asked."""
    if "logprob" not in message.lower():
        return None
    nums = [int(x) for x in re.findall(r"(?<![\w.])\d+(?![\w.])", message)]
    below = [x for x in nums if 0 < x < asked]
    return max(below) if below else None


def retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (seconds, or an HTTP date)."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)
