"""The compiled bfloat16 kernels of the all-reduce give torch's results, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from daskdl.collectives import kernels


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.uint16).numpy()


def _values(n: int, seed: int) -> np.ndarray:
    """float32 values over the whole range, with the edge cases of rounding to bfloat16."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n).astype(np.float32) * np.float32(10.0) ** rng.integers(-40, 38, n)
    edges = np.array(
        [
            0.0,
            -0.0,
            np.inf,
            -np.inf,
            np.finfo(np.float32).max,  # rounds up to inf in bfloat16
            np.finfo(np.float32).tiny,
            1e-41,  # denormal
            1.0 + 2.0**-8,  # a tie: rounds to even (1.0)
            1.0 + 3 * 2.0**-8,  # a tie: rounds to even (1.0 + 2**-6)
            -(1.0 + 2.0**-8 + 2.0**-20),  # just above a tie: rounds away
        ],
        dtype=np.float32,
    )
    x[: edges.size] = edges
    return x


@pytest.mark.integration
@pytest.mark.parametrize("divide_by", [1, 2, 3, 8])
def test_add_divide_round_is_torchs_add_divide_round(divide_by):
    n = 100_003
    acc, other = _values(n, 0), _values(n, 1)
    other = torch.from_numpy(other).to(torch.bfloat16)
    incoming = _bits(other).copy()
    incoming.setflags(write=False)  # received messages are read-only

    expected = torch.from_numpy(acc.copy()).add_(other)
    expected = expected.div_(divide_by).to(torch.bfloat16)

    wire = np.empty(n, dtype=np.uint16)
    finished = acc.copy()
    kernels.add_divide_round(finished, incoming, wire, divide_by)
    np.testing.assert_array_equal(wire, _bits(expected))
    # The finishing rank keeps the very values its peers receive.
    np.testing.assert_array_equal(finished, expected.float().numpy())


def test_add_round_passes_partial_sums_on_untouched():
    n = 100_003
    acc, other = _values(n, 2), _values(n, 3)
    other = torch.from_numpy(other).to(torch.bfloat16)
    incoming = _bits(other)
    expected = torch.from_numpy(acc.copy()).add_(other)

    wire = np.empty(n, dtype=np.uint16)
    before = acc.copy()
    kernels.add_round(acc, incoming, wire)
    np.testing.assert_array_equal(wire, _bits(expected.to(torch.bfloat16)))
    np.testing.assert_array_equal(acc, before)


def test_a_nan_stays_a_nan():
    acc = np.array([np.nan, 1.0, -np.nan, np.inf, np.inf], dtype=np.float32)
    other = np.array([1.0, np.nan, 0.0, -np.inf, 1.0], dtype=np.float32)
    incoming = _bits(torch.from_numpy(other).to(torch.bfloat16))
    wire = np.empty(acc.size, dtype=np.uint16)
    kernels.add_divide_round(acc, incoming, wire, 2)
    received = torch.from_numpy(wire).view(torch.bfloat16).float().numpy()
    for values in (acc, received):
        assert np.isnan(values[:4]).all(), values  # inf - inf is a NaN too
        assert values[4] == np.inf
