"""grouped_linear: every backend equals a per-group reference, in value and gradient."""

from __future__ import annotations

import platform

import pytest
import torch

from brickwork.analysis.compute import FlopMeter
from brickwork.kernels import choose_grouped_backend, grouped_linear, grouped_mm_supported, tune_glibc_malloc
from brickwork.kernels.malloc import DEFAULT_MMAP_THRESHOLD, DEFAULT_TRIM_THRESHOLD

BACKENDS = ["split", "bmm"] + (["grouped_mm"] if hasattr(torch, "_grouped_mm") else [])


def _reference(x: torch.Tensor, w: torch.Tensor, counts: list[int], bias: torch.Tensor | None) -> torch.Tensor:
    outs, start = [], 0
    for g, n in enumerate(counts):
        y = x[start : start + n] @ w[g]
        outs.append(y + bias[g] if bias is not None else y)
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_backends_match_reference_values_and_grads(backend: str, transposed: bool, with_bias: bool) -> None:
    torch.manual_seed(0)
    counts = [3, 0, 5, 1]  # includes an empty group
    x = torch.randn(sum(counts), 8, requires_grad=True)
    base = torch.randn(4, 12, 8) if transposed else torch.randn(4, 8, 12)
    base.requires_grad_(True)
    w = base.transpose(1, 2) if transposed else base  # (G, K, M) either way
    bias = torch.randn(4, 12, requires_grad=True) if with_bias else None
    ct = torch.tensor(counts)
    g = torch.randn(sum(counts), 12)

    y = grouped_linear(x, w, ct, bias, backend=backend)  # type: ignore[arg-type]
    ref = _reference(x, w, counts, bias)
    torch.testing.assert_close(y, ref)
    params = [x, base] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(y, params, g)
    ref_grads = torch.autograd.grad(ref, params, g)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_stride_gradient_and_empty_input(backend: str) -> None:
    # y.sum().backward() hands an expanded (zero-stride) gradient, which _grouped_mm's own
    # backward rejects; grouped_linear must accept it.
    w = torch.randn(3, 8, 4, requires_grad=True)
    x = torch.randn(6, 8, requires_grad=True)
    grouped_linear(x, w, torch.tensor([2, 2, 2]), backend=backend).sum().backward()  # type: ignore[arg-type]
    assert x.grad is not None and w.grad is not None
    torch.testing.assert_close(w.grad[0], x[:2].detach().sum(0)[:, None].expand(8, 4))
    empty = grouped_linear(torch.randn(0, 8), w, torch.tensor([0, 0, 0]), backend=backend)  # type: ignore[arg-type]
    assert empty.shape == (0, 4)


def test_auto_backend_choice() -> None:
    x, w = torch.randn(4, 8), torch.randn(2, 8, 12)
    if hasattr(torch, "_grouped_mm"):
        assert choose_grouped_backend(x, w) == "grouped_mm"
    # widths whose rows are not 16-byte multiples, and float64, fall back to the split loop
    assert not grouped_mm_supported(torch.randn(4, 6), torch.randn(2, 6, 12))
    assert choose_grouped_backend(torch.randn(4, 6), torch.randn(2, 6, 12)) == "split"
    assert choose_grouped_backend(x.double(), w.double()) == "split"


def test_input_validation() -> None:
    if hasattr(torch, "_grouped_mm"):
        with pytest.raises(ValueError, match="16-byte"):
            grouped_linear(torch.randn(4, 6), torch.randn(2, 6, 4), torch.tensor([2, 2]), backend="grouped_mm")
    with pytest.raises(ValueError, match="counts"):
        grouped_linear(torch.randn(4, 8), torch.randn(2, 8, 4), torch.tensor([4]))
    with pytest.raises(ValueError, match="does not fit"):
        grouped_linear(torch.randn(4, 6), torch.randn(2, 8, 4), torch.tensor([2, 2]))


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")
def test_grouped_mm_flop_formula_counts_rows_times_k_times_n() -> None:
    # The offsets cover all rows, so the formula 2 * A * K * M is exact: forward once, and
    # the two backward products (input and weight gradients) the same again each.
    counts = torch.tensor([3, 0, 5])
    x = torch.randn(8, 8, requires_grad=True)
    w = torch.randn(3, 8, 12, requires_grad=True)
    meter = FlopMeter()
    with meter:
        y = grouped_linear(x, w, counts, backend="grouped_mm")
    assert meter.total == 2 * 8 * 8 * 12
    meter = FlopMeter()
    with meter:
        grouped_linear(x, w, counts, backend="grouped_mm").backward(torch.randn(8, 12))
    assert meter.total == 3 * 2 * 8 * 8 * 12
    del y


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt is what is tuned")
def test_tune_glibc_malloc_reports_setting() -> None:
    # the values asked for are the values reported (glibc accepts both on Linux)
    assert tune_glibc_malloc(16 << 20, 64 << 20) == "glibc mallopt M_MMAP_THRESHOLD=16777216 M_TRIM_THRESHOLD=67108864"
    text = tune_glibc_malloc()  # back to the defaults, which this process then keeps
    assert text == f"glibc mallopt M_MMAP_THRESHOLD={DEFAULT_MMAP_THRESHOLD} M_TRIM_THRESHOLD={DEFAULT_TRIM_THRESHOLD}"
