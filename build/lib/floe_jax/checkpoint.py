"""Orbax checkpoints of federated server state: the adapters, the cluster assignment, the key and
round index (so a resumed run repeats the uninterrupted one), and a base delta when an aggregation
rule folds updates into the base. Never the frozen base weights.

A state is saved as a flat dict of arrays (`leaf_00000`, ...) beside JSON metadata holding each
leaf's path, shape, dtype and the SHA-256 of its bytes, so any registered-dataclass pytree
round-trips, a template with other leaves or other shapes fails naming the leaf, and a step whose
bytes changed on disk is detected: orbax restores flipped bytes silently when they decode.

`restore` without a step takes the newest intact one: a step whose files are truncated, whose
manifest or metadata do not parse, or whose bytes fail their checksums is skipped with a warning
naming it, and only when no step is intact does it fail, naming the folder.
"""

from __future__ import annotations

import hashlib
import os
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp


class CorruptCheckpointError(OSError):
    """A checkpoint step on disk cannot be read back as it was saved (the message says why)."""


def _paths(tree) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _key(i: int) -> str:
    return f"leaf_{i:05d}"


def _sha256(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


def _spec(x) -> str:
    return f"{list(np.shape(x))} {np.dtype(x.dtype).name}"


def _manager(
    directory: str, max_to_keep: int | None = None, *, collective: bool = False
) -> ocp.CheckpointManager:
    """An orbax manager of `directory`. In a multi-host (`jax.distributed`) run, a `collective`
    one (`save`) is called by every process together and orbax writes the checkpoint once,
    with its barriers; any other (listing, reading, deleting) belongs to the calling process
    alone, so no process waits on another that does not call it."""
    me, shared = jax.process_index(), collective or jax.process_count() == 1
    mp = ocp.options.MultiprocessingOptions(
        **({} if shared else {"primary_host": me, "active_processes": {me}})
    )
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=False,  # the state is donated to the next round right after
        create=shared,  # one process's own manager reads a folder that exists (`all_steps`)
        multiprocessing_options=mp,
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(directory: str, step: int, state, metadata: dict | None = None, *, max_to_keep=None):
    """Saves `state` (a pytree of arrays) and JSON-serialisable `metadata` as checkpoint `step`,
    with each leaf's shape, dtype and SHA-256 in the checkpoint's metadata.

    In a multi-host run every process calls it with the same (replicated) state; orbax writes
    the step once (process 0) and returns on every process when it is complete."""
    leaves = [np.asarray(x) for x in jax.tree.leaves(state)]
    flat = {_key(i): x for i, x in enumerate(leaves)}
    meta = {
        "paths": _paths(state),
        "leaves": [
            {"shape": list(x.shape), "dtype": x.dtype.name, "sha256": _sha256(x)} for x in leaves
        ],
        "user": metadata or {},
    }
    mngr = _manager(directory, max_to_keep, collective=True)
    mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta)),
        force=True,
    )
    mngr.wait_until_finished()
    mngr.close()


def all_steps(directory: str) -> list[int]:
    """The checkpoint steps in `directory`, oldest first (intact or not)."""
    if not os.path.isdir(directory):
        return []
    mngr = _manager(directory)
    steps = sorted(mngr.all_steps())
    mngr.close()
    return steps


def latest_step(directory: str) -> int | None:
    """The newest checkpoint step in `directory`, or None when there is none (intact or not)."""
    steps = all_steps(directory)
    return steps[-1] if steps else None


def delete_steps_after(directory: str, step: int) -> list[int]:
    """Deletes the steps newer than `step` (after a fallback past corrupt ones, so that the run
    can save those steps again); returns the steps deleted."""
    newer = [s for s in all_steps(directory) if s > step]
    if newer:
        mngr = _manager(directory)
        for s in newer:
            mngr.delete(s)
        mngr.close()
    return newer


def _why(e: Exception) -> str:
    first = str(e).strip().splitlines()
    return f"{type(e).__name__}: {first[0] if first else ''}"[:300]


def _check_template(directory: str, step: int, meta: dict, like) -> None:
    """Raises ValueError when the saved leaves differ from the template's in name, shape or
    dtype: a different run's settings, not a damaged file, so no other step is tried."""
    want = _paths(like)
    if meta["paths"] != want:
        extra = sorted(set(meta["paths"]) - set(want))
        missing = sorted(set(want) - set(meta["paths"]))
        raise ValueError(
            f"checkpoint {directory} step {step} does not match the state template: "
            f"only in checkpoint {extra}, only in template {missing}"
        )
    if "leaves" not in meta:  # saved before shapes were recorded; checked after the restore
        return
    bad = [
        f"{path}: saved {saved['shape']} {saved['dtype']}, expected {_spec(x)}"
        for path, saved, x in zip(want, meta["leaves"], jax.tree.leaves(like), strict=True)
        if f"{saved['shape']} {saved['dtype']}" != _spec(x)
    ]
    if bad:
        raise ValueError(
            f"checkpoint {directory} step {step} has leaves of other shapes or dtypes than "
            "the state template (was it saved with another model or LoRA config?): "
            + "; ".join(bad)
        )


def _restore_step(mngr, directory: str, step: int, like):
    """`(state, user metadata)` of one step; CorruptCheckpointError when its files are damaged,
    ValueError when its leaves do not fit the template."""
    try:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001  (any storage-layer failure means: unreadable)
        raise CorruptCheckpointError(f"its metadata cannot be read ({_why(e)})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("paths"), list):
        raise CorruptCheckpointError("its metadata has no list of leaf paths")
    _check_template(directory, step, meta, like)
    leaves, treedef = jax.tree.flatten(like)
    # In a multi-host run each process reads the whole (replicated) state as host arrays.
    like_leaf = jax.ShapeDtypeStruct if jax.process_count() == 1 else np.empty
    abstract = {_key(i): like_leaf(np.shape(x), x.dtype) for i, x in enumerate(leaves)}
    try:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        flat = mngr.restore(step, args=args)["state"]
    except Exception as e:  # noqa: BLE001
        raise CorruptCheckpointError(f"its arrays cannot be read ({_why(e)})") from e
    got = [flat[_key(i)] for i in range(len(leaves))]
    paths = meta["paths"]
    for i, (path, x, want) in enumerate(zip(paths, got, leaves, strict=True)):
        if _spec(x) != _spec(want):
            raise ValueError(
                f"checkpoint {directory} step {step}: leaf {path} restored as {_spec(x)}, "
                f"expected {_spec(want)}"
            )
        if "leaves" in meta and _sha256(np.asarray(x)) != meta["leaves"][i]["sha256"]:
            raise CorruptCheckpointError(f"leaf {path} fails its SHA-256 checksum")
    return jax.tree.unflatten(treedef, got), meta["user"]


def restore(directory: str, like, *, step: int | None = None):
    """Restores `(state, metadata)` shaped like the template `like` (same pytree structure,
    shapes and dtypes).

    Without `step`, the newest intact step: each newer step that is damaged (truncated or
    unparsable files, a failed checksum) is skipped with a warning naming it and why.

    Raises:
      FileNotFoundError: no checkpoint in `directory`.
      ValueError: the checkpoint's leaves differ from the template's in name, shape or dtype
        (names each leaf, with the saved and the expected shape and dtype).
      CorruptCheckpointError: `step` (or, without it, every step) is damaged; names the folder.
    """
    steps = all_steps(directory)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"no checkpoint step {step} in {directory} (steps: {steps})")
    mngr = _manager(directory)
    failures = []
    try:
        for s in [step] if step is not None else steps[::-1]:
            try:
                return _restore_step(mngr, directory, s, like)
            except CorruptCheckpointError as e:
                failures.append(f"step {s}: {e}")
                if step is None and s != steps[0]:
                    warnings.warn(
                        f"checkpoint {directory} step {s} is damaged and skipped: {e}; "
                        "trying the previous step",
                        stacklevel=2,
                    )
    finally:
        mngr.close()
    raise CorruptCheckpointError(f"no intact checkpoint in {directory}: " + "; ".join(failures))
