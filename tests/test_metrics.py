"""Tests for floe_jax/data/metrics.py: ROUGE-L against rouge-score and a hand-computed LCS."""

import pytest
from rouge_score import rouge_scorer

from floe_jax.data.metrics import exact_match, normalize_answer, rouge_l, task_scores


def test_rouge_l_hand_computed_lcs():
    # reference "the cat sat on the mat" (6 words), answer "the cat lay on a red mat" (7 words):
    # the LCS is "the cat on mat" (4 words), so P = 4/7, R = 4/6, F = 2PR / (P + R) = 8/13
    assert rouge_l("the cat lay on a red mat", "the cat sat on the mat") == pytest.approx(8 / 13)
    # case and punctuation are not words: "Paris." equals "paris"
    assert rouge_l("Paris.", "paris") == 1.0
    # order matters (a subsequence, not a bag): "b a" against "a b" shares one word in order
    assert rouge_l("b a", "a b") == pytest.approx(0.5)
    assert rouge_l("", "anything") == 0.0 and rouge_l("nothing shared", "at all here") == 0.0


def test_rouge_l_equals_rouge_score_on_free_text():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = [
        ("Alice was born in 1990 in London, England.", "Alice was born in London in 1990."),
        ("Brainstorm: apples, pears, plums", "Some fruits are apples, plums and cherries."),
        ("It depends on the context", "The answer depends on context."),
    ]
    for pred, ref in pairs:
        want = scorer.score(ref, pred)["rougeL"].fmeasure
        assert rouge_l(pred, ref) == pytest.approx(want, abs=1e-12)
        assert 0.0 < want < 1.0  # the examples are partial matches


def test_exact_match_normalises_like_squad():
    assert normalize_answer("  The  Positive, sentiment! ") == "positive sentiment"
    assert exact_match("Positive.", "positive") and not exact_match("positive", "negative")


def test_task_scores_per_task_and_closed_tasks_only():
    preds = ["positive", "negative", "the cat sat", "nothing"]
    refs = ["Positive", "positive", "the cat sat on the mat", "a dog"]
    tasks = ["classification", "classification", "open_qa", "open_qa"]
    got = task_scores(preds, refs, tasks, closed_tasks={"classification"})
    cls, qa = got["per_task"]["classification"], got["per_task"]["open_qa"]
    assert cls == {"rouge_l": 0.5, "n": 2, "exact_match": 0.5, "n_exact": 2}
    assert qa["rouge_l"] == pytest.approx((2 * 3 / 6 / (1 + 3 / 6) + 0.0) / 2)  # P=1, R=1/2
    assert "exact_match" not in qa  # free-form: no exact match
    overall = got["overall"]
    assert overall["n"] == 4 and overall["n_exact"] == 2 and overall["exact_match"] == 0.5
    assert overall["rouge_l"] == pytest.approx((1 + 0 + qa["rouge_l"] * 2) / 4)
    with pytest.raises(ValueError, match="3 predictions, 4 references"):
        task_scores(preds[:3], refs, tasks)
