"""Answer metrics of instruction data: ROUGE-L and exact match, per task and overall.

- ROUGE-L (Lin, 2004): the F-measure of the longest common subsequence of the answer's and the
  reference's words, `F = 2PR / (P + R)` with `P = LCS / |answer|`, `R = LCS / |reference|`;
  computed by Google's `rouge-score` package (the reference implementation papers report with,
  FedIT and Dolly evaluations included), with its default tokenizer (lower case, runs of
  `[a-z0-9]`) and no stemming.
- Exact match (SQuAD's normalisation, Rajpurkar et al., 2016): lower case, punctuation and the
  articles a/an/the removed, whitespace collapsed; only meaningful where a task has a closed
  answer (a class label, a short span), so `task_scores` reports it for the tasks it is told are
  closed and leaves it out elsewhere (free-form answers score near zero on it for every method).
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Collection, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


@functools.cache
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of one answer against one reference, in [0, 1] (module docstring)."""
    return float(_scorer().score(reference, prediction)["rougeL"].fmeasure)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the two answers are equal after `normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(reference)


def task_scores(
    predictions: Sequence[str],
    references: Sequence[str],
    tasks: Sequence[str],
    *,
    closed_tasks: Collection[str] = (),
) -> dict:
    """Mean ROUGE-L of every answer, and exact match over the closed tasks' answers, overall and
    per task.

    Returns:
      `{"overall": {...}, "per_task": {task: {...}}}`, each `{...}` holding `rouge_l`, `n` and,
      where it covers a closed task, `exact_match` and `n_exact` (the answers it is over).

    Raises:
      ValueError: the three sequences differ in length.
    """
    if not len(predictions) == len(references) == len(tasks):
        raise ValueError(
            f"{len(predictions)} predictions, {len(references)} references and {len(tasks)} "
            "task labels: one each per query"
        )
    closed = set(closed_tasks)
    rl = [rouge_l(p, r) for p, r in zip(predictions, references, strict=True)]
    em = [exact_match(p, r) for p, r in zip(predictions, references, strict=True)]

    def summary(sel: list[int]) -> dict:
        out = {"rouge_l": sum(rl[i] for i in sel) / max(len(sel), 1), "n": len(sel)}
        shut = [i for i in sel if tasks[i] in closed]
        if shut:
            out |= {"exact_match": sum(em[i] for i in shut) / len(shut), "n_exact": len(shut)}
        return out

    per_task = {t: summary([i for i, x in enumerate(tasks) if x == t]) for t in sorted(set(tasks))}
    return {"overall": summary(list(range(len(tasks)))), "per_task": per_task}
