"""The compiled one-pass kernel against the numpy kernel it replaces.

Both paths ship: the compiled one by default, numpy without numba (or with
``NAPARI_MIXCOEF_KERNEL=numpy``).  The core tests hold the default path to
scipy and to known truths; these hold the two paths to each other, over
the dtypes, masks, bands and error modes the kernel sees.
"""

import dask.array as da
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from napari_mixcoef import _fused, fit_stack

from conftest import make_stack

KEYS = ('coef', 'stderr', 'x', 'x_stderr', 'r2', 'rmse')


@pytest.fixture
def calls(monkeypatch):
    """Count the compiled kernel's calls (it must be the one that ran)."""
    count = []
    inner = _fused.block_sums

    def spy(*args):
        count.append(len(args[0]))
        inner(*args)

    monkeypatch.setattr(_fused, 'block_sums', spy)
    return count


def both_paths(monkeypatch, calls, stack, a, b, **kwargs):
    fused = fit_stack(stack, a, b, **kwargs)
    assert calls, 'the compiled kernel did not run'
    with monkeypatch.context() as m:
        m.setenv('NAPARI_MIXCOEF_KERNEL', 'numpy')
        n_calls = len(calls)
        plain = fit_stack(stack, a, b, **kwargs)
        assert len(calls) == n_calls, 'numpy path called the compiled one'
    return fused, plain


def assert_same(fused, plain, rtol):
    for key in KEYS:
        # robust errors come from a sum that cancels (see core._fit_sums):
        # it keeps a digit less; 1e-4 of an error is far below its own
        # sampling uncertainty.  A coefficient near zero (the offset) is
        # compared with its standard error.
        tol = rtol * 10 if key.endswith('stderr') else rtol
        got, want = getattr(fused, key), getattr(plain, key)
        if key == 'coef':
            err = np.abs(got - want) / plain.stderr
            assert err.max() <= 1e-4, f'coef off by {err.max():.2g} stderr'
        else:
            assert_allclose(got, want, rtol=tol, atol=1e-12, err_msg=key)


# float32 work: the numpy path's SSR (a difference of float32 BLAS sums)
# is good to ~1e-5 relative, the compiled one's to ~2e-6 (see below).
F32 = 3e-5
RTOL = {np.float32: F32, np.uint16: F32, np.uint8: F32, np.float64: 1e-9}


@pytest.mark.parametrize('dtype', list(RTOL))
@pytest.mark.parametrize('stderr', ['auto', 'ols'])
@pytest.mark.parametrize('masked', [False, True])
def test_mix_model_matches_numpy_path(
    monkeypatch, calls, dtype, stderr, masked
):
    stack, a, b, _ = make_stack(lead=(30,), noise=5.0)
    if dtype == np.uint8:  # bring the data into the dtype's range
        a, b, stack = a * 0.4, b * 0.4, stack * 0.4
    stack = np.clip(stack, 0, 255 if dtype == np.uint8 else None)
    stack = stack.astype(dtype)
    mask = None
    if masked:
        mask = np.ones(a.shape, bool)
        mask[:5, 3:9] = False
    fused, plain = both_paths(
        monkeypatch, calls, stack, a, b, stderr=stderr, mask=mask
    )
    assert_same(fused, plain, RTOL[dtype])
    assert_allclose(fused.x, plain.x, atol=1e-4 * np.median(plain.x_stderr))


@pytest.mark.parametrize('model', ['scaled', 'offset'])
def test_other_models_with_textbook_errors(monkeypatch, calls, model):
    stack, a, b, _ = make_stack(lead=(4, 6), noise=5.0)
    fused, plain = both_paths(
        monkeypatch, calls, stack.astype(np.float32), a, b,
        model=model, stderr='ols',
    )  # fmt: skip
    assert_same(fused, plain, F32)


@pytest.mark.parametrize('dtype', [np.float64, np.float32, np.uint16])
@pytest.mark.parametrize('model', ['scaled', 'offset'])
def test_robust_errors_of_more_coefficients_in_two_passes(
    monkeypatch, calls, dtype, model
):
    # in memory, robust errors for k = 2, 3 come from the one-pass sums and
    # a compiled pass over the residuals; the numpy path fits each slice.
    # Spatially correlated noise (so the sandwich terms have lags), a
    # mask, and bands of rows (slices bigger than a chunk).
    from scipy import ndimage

    rng = np.random.default_rng(7)
    stack, a, b, _ = make_stack(lead=(24,), shape=(40, 36), noise=0.0)
    noise = ndimage.gaussian_filter(rng.normal(0, 40, stack.shape), (0, 1, 1))
    stack = (stack * 1.2 + 30 + noise).astype(dtype)
    mask = np.ones(a.shape, bool)
    mask[:6, 4:15] = False
    passes = []
    inner = _fused.exact_terms
    monkeypatch.setattr(
        _fused, 'exact_terms', lambda *args: passes.append(1) or inner(*args)
    )
    kwargs = dict(model=model, mask=mask, chunk_bytes=2048)
    fused, plain = both_paths(monkeypatch, calls, stack, a, b, **kwargs)
    assert passes, 'the residual pass did not run'
    assert (
        fused.noise_kernel is not None
        and np.count_nonzero(fused.noise_kernel) > 1
    )
    # float32 work: the numpy path squares and weights the residuals in
    # float32 BLAS; the compiled pass sums each run of them in float64
    rtol = 1e-9 if dtype == np.float64 else 2e-5
    assert_same(fused, plain, rtol)
    # progress: both passes, in order, ending at the slice count
    steps = []
    fit_stack(stack, a, b, progress=lambda d, n: steps.append(d), **kwargs)
    assert steps == sorted(steps) and steps[-1] == 24
    assert any(0 < s < 24 for s in steps)


def test_closing_the_fit_during_the_residual_pass():
    # the widget cancels by closing the fit's generator between steps: in
    # the second pass too, and the next fit is unaffected
    from napari_mixcoef.core import iter_fit

    stack, a, b, _ = make_stack(lead=(40,), shape=(40, 36), noise=5.0)
    stack = stack.astype(np.float32)
    steps = iter_fit(stack, a, b, model='scaled', chunk_bytes=4096)
    closed_at = None
    for done, total in steps:
        if done > total // 2:  # inside the residual pass
            steps.close()
            closed_at = done
            break
    assert closed_at is not None and closed_at < 40, 'no step to stop at'
    fit = fit_stack(stack, a, b, model='scaled')
    assert np.isfinite(fit.x_stderr).all()


def test_bands_and_views(monkeypatch, calls):
    # slices bigger than a chunk are cut into bands along Y; a strided
    # view is read through a copy of each piece
    stack, a, b, _ = make_stack(lead=(20,), shape=(64, 40), noise=5.0)
    view = stack.astype(np.float32)[::2]
    fused, plain = both_paths(monkeypatch, calls, view, a, b, chunk_bytes=2048)
    assert_same(fused, plain, F32)
    assert max(calls) <= 1  # one slice (or band) per call


def test_dask_and_zarr_pieces(monkeypatch, calls, tmp_path):
    zarr = pytest.importorskip('zarr')
    stack, a, b, _ = make_stack(lead=(25,), noise=5.0)
    stack = stack.astype(np.uint16)
    z = zarr.create_array(
        store=str(tmp_path / 's.zarr'), shape=stack.shape,
        chunks=(4, 24, 20), dtype=stack.dtype,
    )  # fmt: skip
    z[:] = stack
    fused, plain = both_paths(monkeypatch, calls, z, a, b, stderr='ols')
    assert_same(fused, plain, F32)
    # a dask stack is reduced by dask's own tasks, in numpy, and agrees
    lazy = fit_stack(da.from_array(stack, chunks=(6, 24, 20)), a, b)
    reference = fit_stack(stack, a, b)
    assert_same(lazy, reference, F32)


def test_float32_sums_hold_float64_accuracy(calls):
    # against a float64 least-squares fit of the same uint16 data
    stack, a, b, _ = make_stack(lead=(25,), shape=(96, 80), noise=5.0)
    stack = stack.astype(np.uint16)
    fit = fit_stack(stack, a, b, stderr='ols')
    assert calls
    y = stack.reshape(len(stack), -1) - b.reshape(-1)
    d = (a - b).reshape(-1)
    x = y @ d / (d @ d)
    rmse = np.sqrt(np.mean((y - x[:, None] * d) ** 2, axis=1))
    assert_allclose(fit.x, x, rtol=0, atol=1e-5 * np.median(fit.x_stderr))
    assert_allclose(fit.rmse, rmse, rtol=5e-6)


def test_nan_outside_the_mask_is_ignored_inside_reported(calls):
    stack, a, b, _ = make_stack(lead=(10,), noise=5.0)
    stack = stack.astype(np.float32)
    mask = np.ones(a.shape, bool)
    mask[2, 3] = False
    stack[4, 2, 3] = np.nan
    fit = fit_stack(stack, a, b, mask=mask)
    assert np.isfinite(fit.x).all()
    stack[7, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r'slice \(7,\)'):
        fit_stack(stack, a, b, mask=mask)


def test_dtypes_it_cannot_read_fall_back():
    assert _fused.available(np.dtype('<u2'))
    assert not _fused.available(np.dtype(np.float16))
    assert not _fused.available(np.dtype('>f4'))
    stack, a, b, x = make_stack(lead=(10,), noise=2.0)
    fit = fit_stack(stack.astype('>f4'), a, b)
    assert np.all(np.abs(fit.x - x) < 5 * fit.x_stderr)


def test_without_numba_the_numpy_kernel_fits(monkeypatch):
    import sys

    monkeypatch.setattr(_fused, '_JITTED', {})
    monkeypatch.setitem(sys.modules, 'numba', None)  # import fails
    assert not _fused.available(np.dtype(np.float32))
    stack, a, b, x = make_stack(lead=(10,), noise=2.0)
    fit = fit_stack(stack.astype(np.float32), a, b, noise='huber')
    assert np.all(np.abs(fit.x - x) < 5 * fit.x_stderr)


def test_environment_switch(monkeypatch):
    monkeypatch.setenv('NAPARI_MIXCOEF_KERNEL', 'numpy')
    assert not _fused.available(np.dtype(np.float32))


@pytest.mark.parametrize('noise', ['poisson', 'huber'])
@pytest.mark.parametrize('dtype', [np.uint16, np.float32])
def test_robust_fits_read_the_stored_slices(monkeypatch, noise, dtype):
    # the compiled IRLS casts and centres the stored slices itself; it must
    # agree with numpy's cast-and-centre followed by the numpy fit
    from napari_mixcoef import core

    raw_calls = []
    inner = core.fit_block_fused

    def spy(y, *args, **kwargs):
        raw_calls.append(y.dtype)
        return inner(y, *args, **kwargs)

    monkeypatch.setattr(core, 'fit_block_fused', spy)
    stack, a, b, _ = make_stack(lead=(12,), noise=5.0)
    stack = np.clip(stack, 0, None).astype(dtype)
    stack[3, 4, 5] = 4000  # a hot pixel
    mask = np.ones(a.shape, bool)
    mask[:4, :6] = False
    kwargs = dict(noise=noise, mask=mask, camera_offset=50.0, gain=2.0)
    fused = fit_stack(stack, a, b, **kwargs)
    assert raw_calls and set(raw_calls) == {np.dtype(dtype)}
    with monkeypatch.context() as m:
        m.setenv('NAPARI_MIXCOEF_KERNEL', 'numpy')
        plain = fit_stack(stack, a, b, **kwargs)
    assert_same(fused, plain, F32)


@pytest.mark.parametrize('dtype', [np.uint16, np.float32, np.float64])
@pytest.mark.parametrize('stderr', ['auto', 'ols'])
def test_noise_free_slices_take_the_guard_alike(monkeypatch, dtype, stderr):
    # R² ≈ 1: the one-pass SSR cancels and both paths recompute it from
    # explicit residuals (compiled: on the pool; numpy: in numpy), here in
    # bands and with a mask
    stack, a, b, _ = make_stack(lead=(8,), shape=(40, 24), noise=0.0)
    stack = stack.astype(dtype)
    mask = np.ones(a.shape, bool)
    mask[3:9, 2:5] = False
    kwargs = dict(stderr=stderr, mask=mask, chunk_bytes=1500)
    fused = fit_stack(stack, a, b, **kwargs)
    with monkeypatch.context() as m:
        m.setenv('NAPARI_MIXCOEF_KERNEL', 'numpy')
        plain = fit_stack(stack, a, b, **kwargs)
    assert_allclose(
        fused.x, plain.x, rtol=1e-9 if dtype == np.float64 else 1e-6
    )
    # residuals of rounding only: their sums agree to a few per cent
    assert_allclose(fused.rmse, plain.rmse, rtol=0.05, atol=1e-9)
    assert np.all(fused.r2 > 0.999)


def test_numpy_kernel_bands_with_a_mask(monkeypatch):
    # bands of one shape differ in which pixels they fit: the numpy
    # kernel's per-thread buffers must not carry one band's pixels into
    # another (they did, before buffers were kept per band)
    monkeypatch.setenv('NAPARI_MIXCOEF_KERNEL', 'numpy')
    stack, a, b, _ = make_stack(lead=(10,), shape=(40, 24), noise=3.0)
    stack = stack.astype(np.float32)
    mask = np.ones(a.shape, bool)
    mask[3:9, 2:5] = False
    whole = fit_stack(stack, a, b, mask=mask, stderr='ols')
    bands = fit_stack(stack, a, b, mask=mask, stderr='ols', chunk_bytes=1500)
    assert_same(bands, whole, F32)


@pytest.mark.parametrize('kind', ['all', 'none', 'random', 'edges'])
@pytest.mark.parametrize('n_px', [0, 1, 511, 512, 513, 1500])
def test_segments_are_the_fitted_pixels_in_runs(kind, n_px):
    # every fitted pixel in exactly one run, none crossing a multiple of the
    # run length, none masked; the all-fitted case comes from a cache
    rng = np.random.default_rng(n_px)
    mask = {
        'all': np.ones(n_px, bool),
        'none': np.zeros(n_px, bool),
        'random': rng.random(n_px) > 0.3,
        'edges': np.arange(n_px) % 512 != 511,
    }[kind]
    for _ in range(2):  # the second call of a size is the cached one
        segs = _fused.segments(mask, 512)
        assert segs.dtype == np.int64 and segs.shape[1] == 2
        covered = np.zeros(n_px, int)
        for a, b in segs:
            assert a < b and a // 512 == (b - 1) // 512
            covered[a:b] += 1
        assert_array_equal(covered, mask.astype(int))
        segs[:] = 0  # a caller's changes do not reach the cache


@pytest.mark.parametrize('dtype', [np.float64, np.float32, np.uint16])
@pytest.mark.parametrize('hac', [False, True])
def test_block_sums_of_any_row_count(dtype, hac):
    # the kernel takes slices four or three at a time: every remainder,
    # against float64 numpy sums of the same centred data, masked pixels
    # (NaN here) never read
    rng = np.random.default_rng(3)
    n_px = 1500  # runs of 512 and a short last one
    wt = np.float64 if dtype == np.float64 else np.float32
    centre = (rng.random(n_px) * 100 + 50).astype(wt)
    u1 = rng.standard_normal(n_px).astype(wt)
    t = (rng.random(n_px) + 0.5).astype(wt) if hac else None
    mask = rng.random(n_px) > 0.1
    mean = wt(centre[mask].astype(np.float64).mean())
    segs = _fused.segments(mask)
    for rows in range(1, 9):
        y = (rng.random((rows, n_px)) * 200).astype(dtype)
        if dtype != np.uint16:
            y[:, ~mask] = np.nan
        out = np.zeros((rows, 8))
        _fused.block_sums(y, centre, mean, u1, t, segs, out)
        v = y[:, mask].astype(np.float64) - centre[mask]
        u, c2 = u1[mask].astype(np.float64), centre[mask] - float(mean)
        want = {0: v @ u, 1: v @ c2, 2: v.sum(1), 4: (v * v).sum(1)}
        if hac:
            tm = t[mask].astype(np.float64)
            want.update({5: (v * v) @ tm, 6: v @ (u * tm)})
        rtol = 1e-12 if dtype == np.float64 else 2e-5
        for col, w in want.items():
            assert_allclose(out[:, col], w, rtol=rtol, err_msg=f'{rows}/{col}')
        # the columns the kernel does not own stay untouched
        left = [c for c in range(8) if c not in want]
        assert not out[:, left].any()


def test_warm_up_leaves_nothing_to_compile():
    """After the widget's warm-up no fit it offers compiles a kernel.

    numba holds the GIL while it compiles: a kernel first compiled by a fit
    freezes the window for seconds (13 s for the first Poisson fit after
    installing, when the warm-up skipped the per-slice kernel).
    """
    _fused.warm_up()

    def signatures():
        jitted = _fused._JITTED.values()
        return {f.py_func: len(f.signatures) for f in jitted if f is not None}

    assert signatures(), 'numba compiled nothing'
    rng = np.random.default_rng(3)
    a, b = rng.random((2, 20, 24)) * 100 + 100
    for dtype in (np.uint16, np.float32):
        stack = (rng.random((6, 20, 24)) * 100 + 50).astype(dtype)
        for model in ('mix', 'scaled', 'offset'):
            for noise in ('gaussian', 'poisson', 'huber'):
                for stderr in ('auto', 'ols'):
                    before = signatures()
                    fit_stack(
                        stack, a, b, model=model, noise=noise, stderr=stderr
                    )
                    new = {
                        f.__name__: n - before.get(f, 0)
                        for f, n in signatures().items()
                        if n != before.get(f, 0)
                    }
                    assert not new, (dtype, model, noise, stderr, new)
