"""The registration's products over a moved box, every backend.

Held to an independent per-slice float64 loop: the slice cut at its
offset with ``numpy`` slicing over the box, masked, times its bin's
columns.
"""

import numpy as np
import pytest
from numpy.testing import assert_allclose

from napari_mixcoef.backends import get_backend
from napari_mixcoef.model.shifts import ShiftedDesigns, correction_rows
from napari_mixcoef.model.windows import (
    base_of,
    run_positions,
    window_runs,
)

SHAPE = (23, 19)
BOX = (slice(3, 19), slice(2, 16))


def _case(dtype, masked, work=np.float64):
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    refs = np.stack(
        [
            100 + 50 * np.exp(-((yy - 11) ** 2 + (xx - 8) ** 2) / 20.0),
            100 + 40 * np.sin(xx / 3.0) + yy,
        ]
    )
    mask = None
    if masked:
        mask = rng.random(SHAPE) > 0.2
    designs = ShiftedDesigns(refs, BOX, mask, work)
    n = 40
    offset = rng.integers(-2, 3, (n, 2))
    keys = [(0, 0), (1, -3), (-4, 2)]
    which = rng.integers(0, len(keys), n).astype(np.int64)
    stack = rng.integers(0, 250, (n, *SHAPE)).astype(dtype)
    return designs, offset, keys, which, stack


def _products(backend, designs, offset, which, stack, runs, tables):
    """The backend's finished products ``b`` and ``yy`` of the case."""
    b = np.zeros((len(stack), designs.width))
    yy = np.zeros(len(stack))
    get_backend(backend).window_products(
        stack.reshape(len(stack), -1),
        base_of(offset, SHAPE),
        which,
        runs,
        tables.centre,
        tables.columns,
        b,
        yy,
    )
    tables.finish(which, b, yy)
    return b, yy


def _window(y, offset, fitted):
    """Slice ``y`` cut at ``offset`` over the box, at pixels ``fitted``."""
    cut = tuple(slice(p.start + o, p.stop + o) for p, o in zip(BOX, offset))
    return y[cut].reshape(-1)[fitted]


@pytest.mark.parametrize(
    'dtype', [np.uint8, np.uint16, np.float32, np.float64]
)
@pytest.mark.parametrize('masked', [False, True])
def test_window_products_match_a_per_slice_loop(backend, dtype, masked):
    work = np.float64 if dtype == np.float64 else np.float32
    designs, offset, keys, which, stack = _case(dtype, masked, work)
    which = designs.slots(keys)[which]  # the bins' slots in the tables
    tables, _ = designs.tables()
    runs = window_runs(designs.box, SHAPE, designs.fitted)
    b, yy = _products(backend, designs, offset, which, stack, runs, tables)
    for i, y in enumerate(stack.astype(np.float64)):
        window = _window(y, offset[i], designs.fitted)
        columns = designs.columns[which[i]][:, designs.fitted]
        # float32 sums: good to ~1e-6 of the terms' scale, ‖column‖·‖y‖
        tol = 1e-12 if dtype == np.float64 else 2e-6
        scale = np.linalg.norm(columns, axis=1) * np.linalg.norm(window)
        err = np.abs(b[i] - columns @ window) / scale
        assert err.max() <= tol, f'slice {i}: off by {err.max():.2g}'
        assert_allclose(yy[i], window @ window, rtol=tol)


@pytest.mark.parametrize('masked', [False, True])
def test_window_products_over_some_runs(backend, masked):
    # a subsampled pass: every other run, the tables' sums over those
    work = np.float32
    designs, offset, keys, which, stack = _case(np.uint16, masked, work)
    which = designs.slots(keys)[which]
    runs = window_runs(designs.box, SHAPE, designs.fitted)[::2]
    pixels = run_positions(runs)
    tables, grams = designs.tables(pixels)
    b, yy = _products(backend, designs, offset, which, stack, runs, tables)
    for i, y in enumerate(stack.astype(np.float64)):
        window = _window(y, offset[i], designs.fitted)[pixels]
        columns = designs.columns[which[i]][:, designs.fitted][:, pixels]
        columns = columns.astype(np.float64)
        assert_allclose(grams[which[i]], columns @ columns.T, rtol=1e-12)
        scale = np.linalg.norm(columns, axis=1) * np.linalg.norm(window)
        err = np.abs(b[i] - columns @ window) / scale
        assert err.max() <= 2e-6, f'slice {i}: off by {err.max():.2g}'
        assert_allclose(yy[i], window @ window, rtol=2e-6)


@pytest.mark.parametrize(
    'dtype', [np.uint8, np.uint16, np.float32, np.float64]
)
def test_window_fill_matches_a_per_slice_loop(backend, dtype):
    designs, offset, keys, which, stack = _case(dtype, False)
    work = np.float64 if dtype == np.float64 else np.float32
    rows = np.stack([correction_rows(designs.get(k)) for k in keys])
    n_box = rows.shape[-1]
    runs = window_runs(designs.box, SHAPE, np.arange(n_box))
    coef = np.random.default_rng(3).normal(size=(len(stack), len(rows[0])))
    out = np.zeros((len(stack), n_box), work)
    get_backend(backend).window_fill(
        stack.reshape(len(stack), -1),
        base_of(offset, SHAPE),
        which,
        runs,
        coef.astype(work),
        rows.astype(work),
        out,
    )
    for i, y in enumerate(stack.astype(np.float64)):
        window = _window(y, offset[i], slice(None))
        want = window + coef[i] @ rows[which[i]]
        tol = 1e-12 if dtype == np.float64 else 1e-6
        assert_allclose(out[i], want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize('dtype', [np.uint16, np.float64])
def test_window_meat_matches_a_per_slice_loop(backend, dtype):
    designs, offset, keys, which, stack = _case(dtype, True)
    work = np.float64 if dtype == np.float64 else np.float32
    picked = designs.fitted[::3]
    columns = np.stack([designs.get(k).columns[:, picked] for k in keys])
    rng = np.random.default_rng(5)
    terms = rng.random((2, 6, len(picked)))
    twhich = rng.integers(0, 2, len(stack)).astype(np.int64)
    v = rng.normal(size=(len(stack), designs.width)) * 0.05
    out = np.zeros((len(stack), 6))
    get_backend(backend).window_meat(
        stack.reshape(len(stack), -1),
        base_of(offset, SHAPE),
        which,
        window_runs(designs.box, SHAPE, picked),
        np.ascontiguousarray(v, work),
        np.ascontiguousarray(columns, work),
        twhich,
        np.ascontiguousarray(terms, work),
        out,
    )
    for i, y in enumerate(stack.astype(np.float64)):
        window = _window(y, offset[i], picked)
        r = window - v[i] @ columns[which[i]]
        want = terms[twhich[i]] @ (r * r)
        assert_allclose(
            out[i], want, rtol=1e-12 if work == np.float64 else 1e-4
        )


@pytest.mark.parametrize(
    'shape, factor',
    [((130, 129), 4), ((50,), 5), ((21, 18, 16), 3), ((12, 12), 1)],
)
def test_block_means_match_a_reshaped_mean(backend, shape, factor):
    rng = np.random.default_rng(11)
    y = rng.integers(0, 4000, (6, *shape)).astype(np.uint16)
    small = tuple(s // factor for s in shape)
    out = np.empty((6, *small), np.float32)
    get_backend(backend).block_means(y, factor, out)
    cut = y[(Ellipsis, *[slice(0, s * factor) for s in small])]
    split = sum(((s, factor) for s in small), ())
    axes = tuple(2 + 2 * j for j in range(len(shape)))
    want = cut.astype(np.float64).reshape((6, *split)).mean(axis=axes)
    assert_allclose(out, want, rtol=1e-6)
