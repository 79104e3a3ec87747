"""`bench --profile DIR`: where a benchmark's XLA time goes, op by op.

The run is traced with `jax.profiler` (a Perfetto trace under `DIR/NAME/`, which
https://ui.perfetto.dev opens), and the XLA:CPU ops executed in it are summed by name: a fusion,
a dot or a custom call, with its trailing `.N` instance number dropped, so the per-layer copies of
one matmul count as one row. Left out: host-side Python, the executor's own bookkeeping
("ThunkExecutor::..."), control-flow ops (a `while` spans the ops of its body, which are counted
themselves), and everything the competitor (PyTorch) runs, so the table is floe_jax's device
work only. Times are summed over every call in the run, warm-up included, and tracing slows
small ops: read the shares, not the absolute times.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import gzip
import json
import os
import re

import jax

_INSTANCE = re.compile(r"(\.\d+)+$")
_CONTAINERS = {"while", "conditional", "call"}  # control flow: spans the ops it runs


@contextlib.contextmanager
def traced(out_dir: str):
    """Traces the block with `jax.profiler` into `out_dir` (Perfetto JSON included). Python
    frames are not traced: a whole benchmark's worth of them (PyTorch's included) floods the
    trace buffer, which then drops the XLA events this is for."""
    os.makedirs(out_dir, exist_ok=True)
    opts = jax.profiler.ProfileOptions()
    opts.python_tracer_level = 0
    with jax.profiler.trace(out_dir, create_perfetto_trace=True, profiler_options=opts):
        yield


def op_table(out_dir: str, top: int = 25) -> list[dict]:
    """The `top` XLA ops by summed time in the newest trace under `out_dir`."""
    paths = glob.glob(os.path.join(out_dir, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no *.trace.json.gz under {out_dir} (was the block traced?)")
    with gzip.open(max(paths, key=os.path.getmtime)) as f:
        events = json.load(f)["traceEvents"]
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    total_us, calls = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name.startswith(("$", "end: ")) or "::" in name:
            continue  # host Python frames, executor bookkeeping, completion markers
        if not threads.get((e["pid"], e["tid"]), "").startswith("tf_XLA"):
            continue  # not an XLA worker thread
        op = _INSTANCE.sub("", name)
        if op in _CONTAINERS:
            continue  # its body's ops are counted themselves
        total_us[op] += e["dur"]
        calls[op] += 1
    all_us = sum(total_us.values()) or 1.0
    return [
        {"op": op, "calls": calls[op], "total ms": us / 1e3, "share": us / all_us}
        for op, us in total_us.most_common(top)
    ]
