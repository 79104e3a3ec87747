"""`bench latency`: first-token and per-token latency of edge-only, cloud-only, token-by-token
fused and speculative fused decoding at RTTs of 20, 50, 150 and 300 ms (see
`experiments.benchmarks.fusion.latency_rows`)."""

from experiments.benchmarks.fusion import run_latency


def run(quick: bool = False) -> list[dict]:
    return run_latency(quick)
