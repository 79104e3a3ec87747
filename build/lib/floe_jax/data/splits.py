"""Non-IID client splits of a labelled dataset, deterministic from a seed.

- `split_by_task`: each client holds `tasks_per_client` tasks (the pathological non-IID split of
  McMahan et al., 2017, with tasks for classes); clients that share a task divide its examples.
- `split_dirichlet`: label skew with concentration alpha (Hsu et al., 2019, "Measuring the effects
  of non-identical data distribution for federated visual classification"), in the per-class
  form common to FL benchmarks (Yurochkin et al., 2019; Wang et al., 2020): for each task k,
  proportions `q_k ~ Dir_C(alpha)` over clients divide task k's examples. Small alpha gives each
  client few tasks; large alpha approaches an IID split. Draws are repeated (from the same seeded
  generator) until every client holds at least `min_size` examples.

Both return C sorted int64 index arrays that together cover each used example exactly once. The
real-model preset (`experiments.demo.setup.setup_real`) splits its clients with them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _by_task(task_ids) -> tuple[np.ndarray, list[np.ndarray]]:
    task_ids = np.asarray(task_ids)
    if task_ids.ndim != 1 or task_ids.size == 0:
        raise ValueError(f"task_ids must be a non-empty 1-D array, got shape {task_ids.shape}")
    tasks = np.unique(task_ids)
    return tasks, [np.flatnonzero(task_ids == t) for t in tasks]


def split_by_task(
    task_ids: Sequence[int] | np.ndarray,
    num_clients: int,
    *,
    tasks_per_client: int = 1,
    seed: int = 0,
) -> list[np.ndarray]:
    """Gives each client `tasks_per_client` distinct tasks, round-robin over shuffled tasks.

    Client c holds tasks `perm[(c * tasks_per_client + j) % K]` for j < tasks_per_client, where
    `perm` is a seeded permutation of the K tasks; every task is used when
    `num_clients * tasks_per_client >= K`. A task held by m clients is shuffled and cut into m
    near-equal parts.

    Raises:
      ValueError: `tasks_per_client` exceeds the number of tasks, or a task has fewer examples
        than clients holding it (some client would be empty).
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    tasks, members = _by_task(task_ids)
    k = len(tasks)
    if not 1 <= tasks_per_client <= k:
        raise ValueError(f"tasks_per_client={tasks_per_client} must be in [1, {k}] ({k} tasks)")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(k)
    holders: dict[int, list[int]] = {}
    for c in range(num_clients):
        for j in range(tasks_per_client):
            holders.setdefault(int(perm[(c * tasks_per_client + j) % k]), []).append(c)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for t, cs in sorted(holders.items()):
        idx = rng.permutation(members[t])
        if len(idx) < len(cs):
            raise ValueError(
                f"task {tasks[t].item()!r} has {len(idx)} examples but {len(cs)} clients hold it; "
                "use fewer clients or more tasks per client"
            )
        for c, chunk in zip(cs, np.array_split(idx, len(cs)), strict=True):
            parts[c].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def split_dirichlet(
    task_ids: Sequence[int] | np.ndarray,
    num_clients: int,
    *,
    alpha: float,
    seed: int = 0,
    min_size: int = 1,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Dirichlet(alpha) label skew over tasks; every client gets at least `min_size` examples.

    Raises:
      ValueError: fewer than `num_clients * min_size` examples, or no draw within `max_tries`
        gives every client `min_size` examples (raise alpha or lower the client count).
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    _, members = _by_task(task_ids)
    n = sum(len(m) for m in members)
    if n < num_clients * min_size:
        raise ValueError(
            f"{n} examples cannot give {num_clients} clients {min_size} example(s) each"
        )
    rng = np.random.default_rng(seed)
    sizes = None
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in members:
            idx = rng.permutation(idx)
            q = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(q)[:-1] * len(idx)).astype(np.int64)
            for c, chunk in enumerate(np.split(idx, cuts)):
                parts[c].append(chunk)
        out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        sizes = [len(o) for o in out]
        if min(sizes) >= min_size:
            return out
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw in {max_tries} tries gave all {num_clients} clients "
        f">= {min_size} example(s) (last sizes: {sizes}); raise alpha or use fewer clients"
    )


def task_histogram(task_ids, client_indices, num_tasks: int | None = None) -> np.ndarray:
    """[C, K] example counts per client and task (for reports and tests)."""
    task_ids = np.asarray(task_ids)
    k = int(task_ids.max()) + 1 if num_tasks is None else num_tasks
    return np.stack([np.bincount(task_ids[np.asarray(i)], minlength=k) for i in client_indices])
