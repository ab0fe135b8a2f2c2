"""Every backend against the numpy reference and per-slice float64 fits.

The numpy backend is the reference; every backend that is installed runs
each test (the ``backend`` fixture), so the compiled one is held to the
same results over the dtypes, masks, bands and error modes it sees.  The
core tests hold the default backend to scipy and to known truths.
"""

import dask.array as da
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from napari_mixcoef import fit_stack, iter_fit, warm_up
from napari_mixcoef.backends import get_backend, select
from napari_mixcoef.model.design import make_design, make_view, runs_of
from napari_mixcoef.model.noise import NoiseSpec
from napari_mixcoef.model.references import checked_references

from conftest import make_stack

KEYS = ('coef', 'stderr', 'x', 'x_stderr', 'r2', 'rmse')


def reference_fit(stack, *references, **kwargs):
    return fit_stack(stack, *references, backend='numpy', **kwargs)


def assert_same(got, want, rtol):
    for key in KEYS:
        # robust errors come from sums that cancel: they keep a digit
        # less; 1e-4 of an error is far below its own sampling uncertainty.
        # A coefficient near zero (the offset) is compared with its error.
        tol = rtol * 10 if key.endswith('stderr') else rtol
        g, w = getattr(got, key), getattr(want, key)
        if key == 'coef':
            err = np.abs(g - w) / want.stderr
            assert err.max() <= 1e-4, f'coef off by {err.max():.2g} stderr'
        else:
            assert_allclose(g, w, rtol=tol, atol=1e-12, err_msg=key)


# float32 work: the numpy path's SSR (a difference of float32 BLAS sums)
# is good to ~1e-5 relative, the compiled one's to ~2e-6.
F32 = 3e-5
RTOL = {np.float32: F32, np.uint16: F32, np.uint8: F32, np.float64: 1e-9}


@pytest.mark.parametrize('dtype', list(RTOL))
@pytest.mark.parametrize('stderr', ['auto', 'ols'])
@pytest.mark.parametrize('masked', [False, True])
def test_mix_model_matches_the_reference(backend, dtype, stderr, masked):
    stack, a, b, _ = make_stack(lead=(30,), noise=5.0)
    if dtype == np.uint8:  # bring the data into the dtype's range
        a, b, stack = a * 0.4, b * 0.4, stack * 0.4
    stack = np.clip(stack, 0, 255 if dtype == np.uint8 else None)
    stack = stack.astype(dtype)
    mask = None
    if masked:
        mask = np.ones(a.shape, bool)
        mask[:5, 3:9] = False
    got = fit_stack(stack, a, b, stderr=stderr, mask=mask, backend=backend)
    want = reference_fit(stack, a, b, stderr=stderr, mask=mask)
    assert_same(got, want, RTOL[dtype])
    assert_allclose(got.x, want.x, atol=1e-4 * np.median(want.x_stderr))


@pytest.mark.parametrize('model', ['scaled', 'offset'])
def test_other_models_with_textbook_errors(backend, model):
    stack, a, b, _ = make_stack(lead=(4, 6), noise=5.0)
    stack = stack.astype(np.float32)
    kwargs = dict(model=model, stderr='ols')
    got = fit_stack(stack, a, b, backend=backend, **kwargs)
    assert_same(got, reference_fit(stack, a, b, **kwargs), F32)


@pytest.mark.parametrize('dtype', [np.float64, np.float32, np.uint16])
@pytest.mark.parametrize('model', ['scaled', 'offset'])
def test_robust_errors_of_more_coefficients(backend, dtype, model):
    # robust errors for k = 2, 3 pass over each block twice (sums, then
    # residuals).  Spatially correlated noise (so the sandwich terms have
    # lags), a mask, and small blocks.
    from scipy import ndimage

    rng = np.random.default_rng(7)
    stack, a, b, _ = make_stack(lead=(24,), shape=(40, 36), noise=0.0)
    noise = ndimage.gaussian_filter(rng.normal(0, 40, stack.shape), (0, 1, 1))
    stack = (stack * 1.2 + 30 + noise).astype(dtype)
    mask = np.ones(a.shape, bool)
    mask[:6, 4:15] = False
    kwargs = dict(model=model, mask=mask, chunk_bytes=2048)
    got = fit_stack(stack, a, b, backend=backend, **kwargs)
    assert got.noise_kernel is not None
    assert np.count_nonzero(got.noise_kernel) > 1
    # float32 work: numpy squares and weights the residuals in float32
    # BLAS; the compiled pass sums each run of them in float64
    rtol = 1e-9 if dtype == np.float64 else 2e-5
    assert_same(got, reference_fit(stack, a, b, **kwargs), rtol)
    # progress in order, ending at the slice count
    steps = []
    fit_stack(
        stack, a, b, backend=backend, progress=lambda d, n: steps.append(d),
        **kwargs,
    )  # fmt: skip
    assert steps == sorted(steps) and steps[-1] == 24
    assert any(0 < s < 24 for s in steps)


def test_closing_the_fit_midway(backend):
    # the widget cancels by closing the fit's generator between steps;
    # the next fit is unaffected
    stack, a, b, _ = make_stack(lead=(40,), shape=(40, 36), noise=5.0)
    stack = stack.astype(np.float32)
    steps = iter_fit(
        stack, a, b, model='scaled', chunk_bytes=4096, backend=backend
    )
    closed_at = None
    for done, total in steps:
        if done > total // 2:
            steps.close()
            closed_at = done
            break
    assert closed_at is not None and closed_at < 40, 'no step to stop at'
    fit = fit_stack(stack, a, b, model='scaled', backend=backend)
    assert np.isfinite(fit.x_stderr).all()


def test_bands_and_views(backend):
    # slices bigger than a chunk are cut into bands along Y; a strided
    # view is read through a copy of each piece
    stack, a, b, _ = make_stack(lead=(20,), shape=(64, 40), noise=5.0)
    view = stack.astype(np.float32)[::2]
    got = fit_stack(view, a, b, chunk_bytes=2048, backend=backend)
    assert_same(got, reference_fit(np.ascontiguousarray(view), a, b), F32)


def test_dask_and_zarr_pieces(backend, tmp_path):
    zarr = pytest.importorskip('zarr')
    stack, a, b, _ = make_stack(lead=(25,), noise=5.0)
    stack = stack.astype(np.uint16)
    z = zarr.create_array(
        store=str(tmp_path / 's.zarr'), shape=stack.shape,
        chunks=(4, 24, 20), dtype=stack.dtype,
    )  # fmt: skip
    z[:] = stack
    reference = reference_fit(stack, a, b)
    assert_same(fit_stack(z, a, b, stderr='ols', backend=backend),
                reference_fit(stack, a, b, stderr='ols'), F32)  # fmt: skip
    # a dask stack is reduced by dask's own tasks, with the same backend
    lazy = fit_stack(
        da.from_array(stack, chunks=(6, 12, 20)), a, b, backend=backend
    )
    assert_same(lazy, reference, F32)


def test_float32_sums_hold_float64_accuracy(backend):
    # against a float64 least-squares fit of the same uint16 data
    stack, a, b, _ = make_stack(lead=(25,), shape=(96, 80), noise=5.0)
    stack = stack.astype(np.uint16)
    fit = fit_stack(stack, a, b, stderr='ols', backend=backend)
    y = stack.reshape(len(stack), -1) - b.reshape(-1)
    d = (a - b).reshape(-1)
    x = y @ d / (d @ d)
    rmse = np.sqrt(np.mean((y - x[:, None] * d) ** 2, axis=1))
    # float32 partial sums over runs of 512 pixels: errors up to ~1e-5 of the
    # stderr over seeds 0-7 (seed 0 the worst), 2e-5 leaves a margin
    atol = 2e-5 * np.median(fit.x_stderr)
    if backend == 'numpy':  # float32 BLAS sums whole slices in float32
        atol *= 5
    assert_allclose(fit.x, x, rtol=0, atol=atol)
    assert_allclose(fit.rmse, rmse, rtol=5e-6 if backend != 'numpy' else 2e-5)


def test_nan_outside_the_mask_is_ignored_inside_reported(backend):
    stack, a, b, _ = make_stack(lead=(10,), noise=5.0)
    stack = stack.astype(np.float32)
    mask = np.ones(a.shape, bool)
    mask[2, 3] = False
    stack[4, 2, 3] = np.nan
    fit = fit_stack(stack, a, b, mask=mask, backend=backend)
    assert np.isfinite(fit.x).all()
    stack[7, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r'slice \(7,\)'):
        fit_stack(stack, a, b, mask=mask, backend=backend)


def test_dtypes_the_compiled_backend_cannot_read_fall_back():
    numba = get_backend('numba')
    if numba is None:
        pytest.skip('numba is not installed')
    spec = NoiseSpec()
    assert numba.supports(np.dtype('<u2'), 1, spec, False)
    assert not numba.supports(np.dtype(np.float16), 1, spec, False)
    assert not numba.supports(np.dtype('>f4'), 1, spec, False)
    assert select(None, np.dtype('>f4'), 1, spec, False).name == 'numpy'
    assert select('numba', np.dtype('<f4'), 1, spec, False).name == 'numba'
    # Poisson and Huber fits of several coefficients: numpy
    poisson = NoiseSpec('poisson')
    assert select('numba', np.dtype('<f4'), 2, poisson, False).name == (
        'numpy'
    )
    stack, a, b, x = make_stack(lead=(10,), noise=2.0)
    fit = fit_stack(stack.astype('>f4'), a, b)
    assert np.all(np.abs(fit.x - x) < 5 * fit.x_stderr)


def test_unknown_or_missing_backend_says_so():
    stack, a, b, _ = make_stack(lead=(3,))
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        fit_stack(stack, a, b, backend='gpu')


def test_environment_switch_picks_the_backend():
    import subprocess
    import sys

    code = (
        'import numpy as np, napari_mixcoef as m; '
        'rng = np.random.default_rng(0); a, b = rng.random((2, 8, 8)); '
        'f = m.fit_stack(rng.random((3, 8, 8)), a, b + 1); '
        'print(f.provenance()["backend"])'
    )
    for value, want in (('numpy', 'numpy'), ('', 'numba')):
        env = dict(__import__('os').environ, NAPARI_MIXCOEF_BACKEND=value)
        if want == 'numba' and get_backend('numba') is None:
            want = 'numpy'
        out = subprocess.run(
            [sys.executable, '-c', code],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert out.stdout.strip() == want, out.stderr


@pytest.mark.parametrize('noise', ['poisson', 'huber'])
@pytest.mark.parametrize('dtype', [np.uint16, np.float32])
def test_robust_fits_of_the_stored_slices(backend, noise, dtype):
    # each backend casts and centres the stored slices itself
    stack, a, b, _ = make_stack(lead=(12,), noise=5.0)
    stack = np.clip(stack, 0, None).astype(dtype)
    stack[3, 4, 5] = 4000  # a hot pixel
    mask = np.ones(a.shape, bool)
    mask[:4, :6] = False
    kwargs = dict(noise=noise, mask=mask, camera_offset=50.0, gain=2.0)
    got = fit_stack(stack, a, b, backend=backend, **kwargs)
    assert got.provenance()['backend'] == backend
    assert_same(got, reference_fit(stack, a, b, **kwargs), F32)


@pytest.mark.parametrize('dtype', [np.uint16, np.float32, np.float64])
@pytest.mark.parametrize('stderr', ['auto', 'ols'])
def test_noise_free_slices_take_the_guard_alike(backend, dtype, stderr):
    # R² ≈ 1: the one-pass SSR cancels and every backend recomputes it
    # from explicit residuals, here in bands and with a mask
    stack, a, b, _ = make_stack(lead=(8,), shape=(40, 24), noise=0.0)
    stack = stack.astype(dtype)
    mask = np.ones(a.shape, bool)
    mask[3:9, 2:5] = False
    kwargs = dict(stderr=stderr, mask=mask, chunk_bytes=1500)
    got = fit_stack(stack, a, b, backend=backend, **kwargs)
    want = reference_fit(stack, a, b, **kwargs)
    rtol = 1e-9 if dtype == np.float64 else 1e-6
    assert_allclose(got.x, want.x, rtol=rtol)
    # residuals of rounding only: their sums agree to a few per cent
    assert_allclose(got.rmse, want.rmse, rtol=0.05, atol=1e-9)
    assert np.all(got.r2 > 0.999)


def test_bands_with_a_mask(backend):
    # bands of one shape differ in which pixels they fit: per-thread
    # buffers must not carry one band's pixels into another
    stack, a, b, _ = make_stack(lead=(10,), shape=(40, 24), noise=3.0)
    stack = stack.astype(np.float32)
    mask = np.ones(a.shape, bool)
    mask[3:9, 2:5] = False
    kwargs = dict(mask=mask, stderr='ols', backend=backend)
    whole = fit_stack(stack, a, b, **kwargs)
    bands = fit_stack(stack, a, b, chunk_bytes=1500, **kwargs)
    assert_same(bands, whole, F32)


@pytest.mark.parametrize('kind', ['all', 'none', 'random', 'edges'])
@pytest.mark.parametrize('n_px', [0, 1, 511, 512, 513, 1500])
def test_runs_are_the_fitted_pixels(kind, n_px):
    # every fitted pixel in exactly one run, none crossing a multiple of
    # the run length, none masked
    rng = np.random.default_rng(n_px)
    mask = {
        'all': np.ones(n_px, bool),
        'none': np.zeros(n_px, bool),
        'random': rng.random(n_px) > 0.3,
        'edges': np.arange(n_px) % 512 != 511,
    }[kind]
    runs = runs_of(mask, n_px, 512)
    assert runs.dtype == np.int64 and runs.shape[1] == 2
    covered = np.zeros(n_px, int)
    for a, b in runs:
        assert a < b and a // 512 == (b - 1) // 512
        covered[a:b] += 1
    assert_array_equal(covered, mask.astype(int))


def _view(n_px, model, n_refs, wt, hac, rng):
    """A design view over ``n_px`` pixels, a tenth of them masked."""
    mask = rng.random(n_px) > 0.1
    refs = rng.random((n_refs, n_px)) * 100 + 50
    design = make_design(
        checked_references(list(refs), mask), model, np.dtype(wt)
    )
    t = (rng.random(n_px) + 0.5) if hac else None
    return design, make_view(design, hac=t)


@pytest.mark.parametrize('dtype', [np.float64, np.float32, np.uint16])
@pytest.mark.parametrize(
    ('model', 'n_refs', 'hac'),
    [('mix', 2, False), ('mix', 2, True), ('offset', 3, False)],
)
def test_block_sums_of_any_row_count(backend, dtype, model, n_refs, hac):
    # rows four or three at a time: every remainder, against float64
    # numpy sums of the same centred data; masked pixels (NaN here) are
    # never read.  One basis vector (the fused kernel) and four.
    from napari_mixcoef.model.sums import SumsLayout

    rng = np.random.default_rng(3)
    n_px = 1500  # runs of 512 and a short last one
    wt = np.float64 if dtype == np.float64 else np.float32
    design, view = _view(n_px, model, n_refs, dtype, hac, rng)
    mask = view.fitted
    layout = SumsLayout(design.k, hac=hac)
    impl = get_backend(backend)
    for rows in range(1, 9):
        y = (rng.random((rows, n_px)) * 200).astype(dtype)
        if dtype != np.uint16:
            y[:, ~mask] = np.nan
        sums = layout.empty(rows)
        impl.block_sums(y, view, sums)
        v = y[:, mask].astype(np.float64) - view.centre[mask]
        q = view.basis[:, mask].astype(np.float64)
        u2 = view.spread[mask].astype(np.float64)
        want = {
            'g': v @ q.T,
            's': v.sum(1),
            'h': v @ u2,
            'yy': (v * v).sum(1),
        }
        if hac:
            tm = view.hac[mask].astype(np.float64)
            want['hy'] = (v * v) @ tm
            want['hq'] = v @ (q[0] * tm)
        rtol = 1e-12 if wt == np.float64 else 2e-5
        for name, w in want.items():
            got = getattr(sums, name)
            scale = np.abs(v).sum(1).max() * max(np.abs(q).max(), 1)
            if name == 'h':
                scale *= np.abs(u2).max()
            assert_allclose(got, w, rtol=rtol, atol=rtol * scale,
                            err_msg=f'{rows}/{name}')  # fmt: skip


@pytest.mark.parametrize('dtype', [np.float64, np.float32, np.uint16])
def test_residual_sums_of_any_row_count(backend, dtype):
    rng = np.random.default_rng(4)
    n_px = 1300
    design, view = _view(n_px, 'offset', 3, dtype, False, rng)
    mask = view.fitted
    terms = (rng.random((3, n_px)) + 0.5).astype(view.dtype)
    impl = get_backend(backend)
    for rows in range(1, 7):
        y = (rng.random((rows, n_px)) * 200).astype(dtype)
        z = rng.normal(0, 30, (rows, design.k))
        out = np.zeros((rows, 4))
        impl.residual_sums(y, view, z, terms, out)
        v = y[:, mask].astype(np.float64) - view.centre[mask]
        r = v - z @ view.basis[:, mask].astype(np.float64)
        want = np.column_stack(
            [(r * r).sum(1), (r * r) @ terms[:, mask].T.astype(float)]
        )
        rtol = 1e-11 if dtype == np.float64 else 2e-5
        assert_allclose(out, want, rtol=rtol)


def test_warm_up_leaves_nothing_to_compile():
    """After the widget's warm-up no fit it offers compiles a kernel.

    numba holds the GIL while it compiles: a kernel first compiled by a fit
    freezes the window for seconds (13 s for the first Poisson fit after
    installing, when the warm-up skipped the per-slice kernel).
    """
    if get_backend('numba') is None:
        pytest.skip('numba is not installed')
    from napari_mixcoef.backends.numba import irls, kernels

    warm_up()
    dispatchers = [
        kernels.sums_one,
        kernels.sums_single,
        kernels.sums_many,
        kernels.residual_sums,
        kernels.sampled_meat,
        kernels.lag_products,
        kernels.correlate_rows,
        irls.fit_rows,
    ]

    def signatures():
        return {d.py_func.__name__: len(d.signatures) for d in dispatchers}

    assert any(signatures().values()), 'numba compiled nothing'
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
                        name: n - before[name]
                        for name, n in signatures().items()
                        if n != before[name]
                    }
                    assert not new, (dtype, model, noise, stderr, new)


@pytest.mark.parametrize('dtype', [np.float64, np.float32, np.uint16])
@pytest.mark.parametrize('masked', [False, True])
def test_spectra_pixel_by_pixel(backend, dtype, masked):
    # a channel-last image fitted with 1-D references: millions of slices
    # of a few pixels go side by side in the compiled kernels
    rng = np.random.default_rng(21)
    lam = np.linspace(0, 1, 9)
    spectra = [
        200 * np.exp(-(((lam - c) / 0.3) ** 2)) + 20 for c in (0.1, 0.5, 0.9)
    ]
    x = rng.dirichlet(np.ones(3), (37, 23))
    image = x @ np.stack(spectra) + rng.normal(0, 2.0, (37, 23, 9))
    image = np.clip(image, 0, None).astype(dtype)
    mask = None
    if masked:
        mask = np.ones(9, bool)
        mask[4] = False
    for stderr in ('auto', 'ols'):
        got = fit_stack(image, *spectra, mask=mask, stderr=stderr,
                        backend=backend)  # fmt: skip
        want = reference_fit(image, spectra[0], spectra[1], spectra[2],
                             mask=mask, stderr=stderr)  # fmt: skip
        assert got.x.shape == (37, 23)
        rtol = 1e-9 if dtype == np.float64 else 2e-5
        atol = 1e-4 * np.nanmedian(want.fractions_stderr)
        assert_allclose(got.fractions, want.fractions, rtol=rtol, atol=atol)
        assert_allclose(
            got.fractions_stderr, want.fractions_stderr, rtol=10 * rtol
        )
        assert_allclose(got.rmse, want.rmse, rtol=10 * rtol)


@pytest.mark.parametrize(
    ('shape', 'window'),
    [
        ((40, 33), (9, 9)),
        ((5, 7), (9, 9)),  # a kernel wider than the image
        ((2, 30), (3, 9)),
        ((21,), (9,)),
        ((3,), (3,)),
        ((6, 5, 4), (3, 3, 3)),
    ],
)
def test_correlate_matches_scipy(backend, shape, window):
    # the sandwich terms' smoothing: every backend gives scipy's images
    from napari_mixcoef.model.spatial import numpy_correlate

    rng = np.random.default_rng(8)
    images = rng.standard_normal((3, *shape))
    kernel = rng.standard_normal(window)
    kernel.flat[0] = 0.0  # a zero tap is skipped, not misread
    copy = images.copy()
    got = get_backend(backend).correlate(images, kernel)
    assert_allclose(got, numpy_correlate(images, kernel), atol=1e-12)
    assert_array_equal(images, copy)
