"""`bench round`'s workloads: the issue's two, and the 64/256-client scale runs."""

from experiments.benchmarks.round import WORKLOADS, workloads


def test_default_workloads_are_the_issues_ref_and_xdev():
    ref, xdev = workloads()
    assert (ref.clients, ref.steps, ref.batch, ref.seq, ref.target) == (16, 4, 8, 128, 1.3)
    assert (xdev.clients, xdev.steps, xdev.batch, xdev.seq, xdev.target) == (64, 2, 2, 64, 3.0)
    assert workloads() == WORKLOADS


def test_scale_adds_64_and_256_vmapped_clients_of_xdev_shape():
    extra = workloads(scale=True)[len(WORKLOADS) :]
    assert [w.clients for w in extra] == [64, 256]
    assert all((w.steps, w.batch, w.seq, w.client_chunk) == (2, 2, 64, 0) for w in extra)
    quick = workloads(quick=True, scale=True)
    assert all(w.name.endswith("-quick") and w.clients <= 16 for w in quick)
