"""Orbax checkpoints of federated server state: the adapters, the cluster assignment, the key and
round index (so a resumed run repeats the uninterrupted one), and a base delta when an aggregation
rule folds updates into the base. Never the frozen base weights.

A state is saved as a flat dict of arrays (`leaf_00000`, ...) beside JSON metadata holding each
leaf's path, so any registered-dataclass pytree round-trips and a mismatched template fails with
the names of the differing leaves.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


def _paths(tree) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _manager(directory: str, max_to_keep: int | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=False,  # the state is donated to the next round right after
        create=True,
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(directory: str, step: int, state, metadata: dict | None = None, *, max_to_keep=None):
    """Saves `state` (a pytree of arrays) and JSON-serialisable `metadata` as checkpoint `step`."""
    leaves = jax.tree.leaves(state)
    flat = {f"leaf_{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}
    meta = {"paths": _paths(state), "user": metadata or {}}
    mngr = _manager(directory, max_to_keep)
    mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta)),
        force=True,
    )
    mngr.wait_until_finished()
    mngr.close()


def latest_step(directory: str) -> int | None:
    """The newest checkpoint step in `directory`, or None when there is none."""
    if not os.path.isdir(directory):
        return None
    mngr = _manager(directory)
    step = mngr.latest_step()
    mngr.close()
    return step


def restore(directory: str, like, *, step: int | None = None):
    """Restores `(state, metadata)` shaped like the template `like` (same pytree structure).

    Raises:
      FileNotFoundError: no checkpoint in `directory`.
      ValueError: the checkpoint's leaves differ from the template's (names them).
    """
    mngr = _manager(directory)
    step = mngr.latest_step() if step is None else step
    if step is None:
        mngr.close()
        raise FileNotFoundError(f"no checkpoint in {directory}")
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    want = _paths(like)
    if meta["paths"] != want:
        extra = sorted(set(meta["paths"]) - set(want))
        missing = sorted(set(want) - set(meta["paths"]))
        mngr.close()
        raise ValueError(
            f"checkpoint {directory} step {step} does not match the state template: "
            f"only in checkpoint {extra}, only in template {missing}"
        )
    leaves, treedef = jax.tree.flatten(like)
    abstract = {
        f"leaf_{i:05d}": jax.ShapeDtypeStruct(np.shape(x), x.dtype) for i, x in enumerate(leaves)
    }
    flat = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))[
        "state"
    ]
    mngr.close()
    state = jax.tree.unflatten(treedef, [flat[f"leaf_{i:05d}"] for i in range(len(leaves))])
    return state, meta["user"]
