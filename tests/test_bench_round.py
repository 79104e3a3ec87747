"""`bench round`'s workloads: the issue's two, and the 64/256-client scale runs."""

from experiments.benchmarks._util import FJ_REF
from experiments.benchmarks.round import WORKLOADS, useful_flops, workloads


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


def test_useful_flops_by_hand_for_ref():
    """FJ-REF per layer: q 256x256, k/v 256x128, o 256x256, gate/up 256x704, down 704x256
    (737,280 weights, plus two norms of 256), a final norm of 256; lm_head 256x2048; 8 heads
    of 32; I + O summed over the seven projections: 4,672."""
    ref = WORKLOADS[0]
    n = 4 * (737_280 + 2 * 256) + 256
    base = 4 * n + 4 * 256 * 2048
    attn = 12 * 8 * 32 * 4 * (128 + 1) / 2
    lora = 6 * 4_672 * 4 * (4 + 8 + 16 + 32) / 4
    want = 16 * 4 * 8 * 128 * (base + attn + lora)
    got = useful_flops(FJ_REF, ref, [4, 8, 16, 32] * 4)
    assert abs(got - want) <= 1e-9 * want
    # Every FLOP class counts: dropping the adapters (rank 0) removes exactly their share.
    assert abs(got - useful_flops(FJ_REF, ref, [0]) - 16 * 4 * 8 * 128 * lora) <= 1e-9 * want


def test_torch_sides_fall_back_to_the_cpu_without_cuda():
    """The pinned torch wheel has no CUDA: even with JAX on an accelerator, PyTorch's side runs
    on the host CPU with every core and with one thread (where there are more)."""
    import os

    import torch

    from experiments.benchmarks.round import _torch_sides

    cores = os.cpu_count()
    want = [(f"torch+peft {t} thr", t, "cpu") for t in sorted({cores, 1})]
    assert _torch_sides(accelerator=False) == want
    if not torch.cuda.is_available():
        assert _torch_sides(accelerator=True) == want
    else:
        assert _torch_sides(accelerator=True) == [("torch+peft cuda", cores, "cuda")]


def test_kernel_timing_dispatches_iters_calls_and_blocks_on_the_last():
    from experiments.benchmarks.kernels import _call

    calls = []
    out = _call(lambda x: calls.append(x) or x + 1, 41, iters=5)
    assert (out, calls) == (42, [41] * 5)
