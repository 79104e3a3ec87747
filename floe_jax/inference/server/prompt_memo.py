"""`PromptMemo`: the engine's memo of one-token answers (`Engine(memo_bytes=...)`).

A one-token job (`max_tokens` 1, no prompt log-probs) needs only its prompt's next-token
log-probs, a pure function of the served model and the prompt ids; a client that asks for the
same prompts again and again (fused decoding's evaluation of many methods) gets them from here,
without a prefill, and still chooses its own token (temperature, seed, stops).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from floe_jax.memo import LRUMemo


def _key(prompt: Sequence[int]) -> bytes:
    return np.asarray(prompt, np.int32).tobytes()


class PromptMemo:
    """Log-probs rows by prompt ids, up to `max_bytes` (a row's float32 log-probs and its ids)."""

    def __init__(self, max_bytes: int):
        self._memo = LRUMemo(max_bytes)

    @staticmethod
    def takes(job) -> bool:
        """Whether `job`'s answer can come from the memo (and its row go into it)."""
        return job.max_tokens == 1 and not getattr(job, "wants_prompt", False)

    def answer(self, job) -> bool:
        """Answers a one-token job from the memo; False for a job that is not one or whose
        prompt is not memoised. An error in the job's own callback ends the job, as the engine's
        `_feed` does."""
        if not self.takes(job):
            return False
        lp_V = self._memo.get(_key(job.prompt))
        if lp_V is None:
            return False
        try:
            job.on_logprobs(lp_V)  # its one token: the job ends whatever it returns
        except Exception as e:  # noqa: BLE001
            job.on_error(f"{type(e).__name__}: {e}")
        return True

    def store(self, jobs: Sequence, lp_BV: np.ndarray) -> None:
        """Keeps row b of one prefill's log-probs for each job b the memo takes."""
        for b, job in enumerate(jobs):
            if self.takes(job):
                row = lp_BV[b].copy()  # its own buffer, not a view of the batch's
                row.flags.writeable = False
                key = _key(job.prompt)
                self._memo.put(key, row, row.nbytes + len(key))
