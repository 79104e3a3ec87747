"""Tests for floe_jax/data/splits.py: non-IID client splits (restored with the real-model preset,
which splits its clients by Dirichlet label skew)."""

import numpy as np
import pytest

from floe_jax.data.splits import split_by_task, split_dirichlet, task_histogram

TASKS = np.repeat(np.arange(4), [30, 20, 25, 25])


def _check_partition(parts, n):
    assert all(len(p) > 0 for p in parts)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(np.unique(allidx)) and allidx.max() < n


def test_split_by_task_pure_deterministic_nonempty():
    parts = split_by_task(TASKS, 6, seed=1)
    _check_partition(parts, len(TASKS))
    assert all(len(np.unique(TASKS[p])) == 1 for p in parts)
    # Every task is used when clients >= tasks; its examples are all assigned.
    assert len(np.concatenate(parts)) == len(TASKS)
    for a, b in zip(parts, split_by_task(TASKS, 6, seed=1), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(parts, split_by_task(TASKS, 6, seed=2), strict=True)
    )
    two = split_by_task(TASKS, 4, tasks_per_client=2, seed=0)
    assert all(len(np.unique(TASKS[p])) == 2 for p in two)
    with pytest.raises(ValueError, match="tasks_per_client"):
        split_by_task(TASKS, 2, tasks_per_client=5)
    with pytest.raises(ValueError, match="task 1 has 2 examples but 3 clients"):
        split_by_task(np.array([0, 0, 0, 1, 1]), 6)


def test_split_dirichlet_deterministic_nonempty_and_concentration():
    n = len(TASKS)
    a = split_dirichlet(TASKS, 8, alpha=0.5, seed=0)
    _check_partition(a, n)
    assert len(np.concatenate(a)) == n
    for x, y in zip(a, split_dirichlet(TASKS, 8, alpha=0.5, seed=0), strict=True):
        np.testing.assert_array_equal(x, y)

    def skew(alpha):
        # Mean over clients and seeds of the largest task share: 1 is one task per client.
        vals = []
        for seed in range(5):
            h = task_histogram(TASKS, split_dirichlet(TASKS, 8, alpha=alpha, seed=seed), 4)
            vals.append((h.max(1) / h.sum(1)).mean())
        return float(np.mean(vals))

    s_small, s_mid, s_big = skew(0.05), skew(1.0), skew(100.0)
    assert s_small > s_mid > s_big
    assert s_small > 0.7 and s_big < 0.4  # IID gives 0.3 here (the largest task share)
    with pytest.raises(ValueError, match="cannot give 200 clients"):
        split_dirichlet(TASKS, 200, alpha=1.0)
    with pytest.raises(ValueError, match="alpha=0.001"):
        split_dirichlet(TASKS, 90, alpha=0.001, max_tries=3)


def test_split_dirichlet_many_more_clients_than_tasks():
    """64 clients over 8 tasks (the real preset's shape): every client holds examples, every
    example is used once, and most clients hold a skewed mix (not one task, not all eight)."""
    tasks = np.repeat(np.arange(8), 200)
    parts = split_dirichlet(tasks, 64, alpha=0.5, seed=0, min_size=4)
    _check_partition(parts, len(tasks))
    assert len(np.concatenate(parts)) == len(tasks) and min(map(len, parts)) >= 4
    h = task_histogram(tasks, parts, 8)
    assert h.sum() == len(tasks) and (h.sum(0) == 200).all()
    held = (h > 0).sum(1)
    assert 1 < np.median(held) < 8
