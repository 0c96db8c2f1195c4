"""Error measures shared by the parity tests: relative error against a float64 truth."""

import torch


def relative_error(out: torch.Tensor, truth: torch.Tensor, scale: float = 0.0) -> float:
    """``max |out - truth| / max(max |truth|, scale)`` in float64 (0 for empty tensors).

    One measure for every output: errors relative to the largest true value, so that
    entries near zero do not blow up the ratio. NaN in ``out`` gives NaN.
    """
    if truth.numel() == 0:
        return 0.0
    error = (out.double() - truth.double()).abs().max().item()
    return error / max(truth.double().abs().max().item(), scale, 1e-30)


def worst(out: torch.Tensor, truth: torch.Tensor) -> str:
    """Where ``out`` is furthest from ``truth``, for failure messages."""
    diff = (out.double() - truth.double()).abs()
    index = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    return f"worst at {index}: got {out[index].item():.6g}, want {truth[index].item():.6g}"


def assert_close_rel(out: torch.Tensor, truth: torch.Tensor, tol: float, what: str) -> float:
    """Assert ``relative_error(out, truth) <= tol`` and return the error; the message says
    where and by how much it is exceeded."""
    assert out.shape == truth.shape, f"{what}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    error = relative_error(out, truth)
    if not error <= tol:  # `not <=` also catches NaN
        raise AssertionError(f"{what}: relative error {error:.3g} > {tol:.3g}; {worst(out, truth)}")
    return error
