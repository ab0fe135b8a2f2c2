"""Each backend's ``fit_block`` against the numpy reference, block by block.

``fit_block`` must give the reference's rows (z, the covariance's pieces,
SSR, Σy_c², Qᵀy_c) for every noise model and error mode.  Blocks are
built as the engine builds them: the design from ``make_design``, the
sandwich terms of a noise kernel, the slices as stored.

Tolerances: float64 work agrees to rounding (1e-12).  float32 work keeps
every per-pixel step in float32 as numpy does, but sums in float64 (from
float32 partial sums of ≤ 1024 pixels) where numpy's BLAS sums in float32,
so the two differ by numpy's float32 summation error: coefficients to
1e-6 relative (z to 1e-3 of its standard error), standard errors to 2e-5.
"""

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy import ndimage

from napari_mixcoef.backends import get_backend
from napari_mixcoef.engine.fit import sandwich_rows
from napari_mixcoef.model.design import make_design, make_view
from napari_mixcoef.model.noise import NoiseSpec, residuals
from napari_mixcoef.model.references import checked_references
from napari_mixcoef.model.spatial import noise_correlation
from napari_mixcoef.model.sums import SliceStats, covariance_z

from conftest import make_refs

SHAPE = (40, 56)
GAIN, OFFSET, READ_NOISE = 2.0, 100.0, 1.5
#: (coef rtol, z atol in standard errors, stderr rtol, sums rtol)
TOL = {
    np.float32: (1e-6, 1e-3, 2e-5, 1e-5),
    np.float64: (1e-12, 1e-9, 1e-10, 1e-12),
}
# a correlation kernel for the sandwich terms: neighbours correlate
RHO = np.zeros((3, 3))
RHO[1] = [0.3, 1.0, 0.3]
RHO[:, 1] = [0.2, 1.0, 0.2]

REFERENCE = get_backend('numpy')


def camera_stack(rng, a, b, n):
    """Photon counts of known mixes through a camera: gain, offset, read."""
    x = rng.uniform(0.4, 0.7, n)
    photons = x[:, None, None] * a + (1 - x[:, None, None]) * b
    counts = rng.poisson(photons) + rng.normal(0, READ_NOISE, photons.shape)
    return OFFSET + GAIN * counts


def block(stack, a, b, mask, dtype, rho):
    """``(y, view, design)`` the way the engine makes them."""
    refs = checked_references([a, b], mask)
    design = make_design(refs, 'mix', np.dtype(dtype))
    terms = None if rho is None else sandwich_rows(design, rho)
    view = make_view(design, terms=terms)
    y = np.ascontiguousarray(stack.astype(dtype).reshape(len(stack), -1))
    return y, view, design


def camera_block(seed, ref_seed, n, mask=None, dtype=np.float32, rho=RHO):
    rng = np.random.default_rng(seed)
    a, b = make_refs(SHAPE, seed=ref_seed)
    stack = camera_stack(rng, a, b, n)
    return block(stack, GAIN * a + OFFSET, GAIN * b + OFFSET, mask, dtype, rho)


def circle(shape):
    yy, xx = np.indices(shape)
    cy, cx = shape[0] / 2, shape[1] / 2
    return (yy - cy) ** 2 + (xx - cx) ** 2 < (0.45 * min(shape)) ** 2


def stderr_of(fit, design):
    stats = SliceStats(
        fit.z, fit.ssr, fit.ssr, fit.meat, fit.bread, fit.sandwich, None
    )
    cov = covariance_z(stats, design.n_pixels)
    return np.sqrt(cov[:, 0, 0]) / abs(design.tri[0, 0])


def assert_same_fits(got, want, design, dtype):
    coef_tol, z_tol, stderr_tol, sums_tol = TOL[np.dtype(dtype).type]
    coef_g, _ = design.to_model(got.z)
    coef_w, _ = design.to_model(want.z)
    assert_allclose(coef_g, coef_w, rtol=coef_tol)
    se_w = stderr_of(want, design)
    assert_allclose(
        got.z, want.z, rtol=0, atol=z_tol * se_w.min() * design.tri[0, 0]
    )
    assert_allclose(stderr_of(got, design), se_w, rtol=stderr_tol)
    assert_allclose(got.ssr, want.ssr, rtol=sums_tol)
    assert_allclose(got.yy, want.yy, rtol=sums_tol)
    # Σy_c and u2ᵀy_c cancel: compare with the size of their terms
    n = design.n_pixels
    assert_allclose(
        got.s, want.s, rtol=0, atol=sums_tol * np.sqrt(n * want.yy).max()
    )
    u2 = design.spread.astype(np.float64)
    bound = sums_tol * np.sqrt(u2 @ u2 * want.yy).max()
    assert_allclose(got.h, want.h, rtol=0, atol=bound)


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
@pytest.mark.parametrize('masked', [False, True])
@pytest.mark.parametrize('stderr', ['ols', 'auto'])
@pytest.mark.parametrize('noise', ['poisson', 'huber', 'gaussian'])
def test_matches_the_reference(backend, noise, stderr, masked, dtype):
    rng = np.random.default_rng(7)
    a, b = make_refs(SHAPE, seed=3)
    stack = camera_stack(rng, a, b, 12)
    mask = circle(SHAPE) if masked else None
    rho = RHO if stderr == 'auto' else None
    y, view, design = block(stack, GAIN * a + OFFSET, GAIN * b + OFFSET,
                            mask, dtype, rho)  # fmt: skip
    spec = NoiseSpec(noise, stderr, GAIN, OFFSET, READ_NOISE)
    got = get_backend(backend).fit_block(y, view, spec, None)
    want = REFERENCE.fit_block(y, view, spec, None)
    assert_same_fits(got, want, design, dtype)


@pytest.mark.parametrize('iterations', [1, 2, 5])
@pytest.mark.parametrize('noise', ['poisson', 'huber'])
def test_any_number_of_iterations(backend, noise, iterations):
    y, view, design = camera_block(8, 4, 6)
    spec = NoiseSpec(noise, 'auto', GAIN, OFFSET, READ_NOISE, iterations)
    got = get_backend(backend).fit_block(y, view, spec, None)
    want = REFERENCE.fit_block(y, view, spec, None)
    assert_same_fits(got, want, design, np.float32)


@pytest.mark.parametrize('noise', ['poisson', 'huber'])
def test_realistic_data_with_hot_pixels(backend, noise):
    """16-bit camera frames: blurred optics, hot and dead pixels, a mask."""
    rng = np.random.default_rng(11)
    shape = (96, 128)
    yy, xx = np.indices(shape)
    a = 40 + 900 * np.sin(xx / 7.0) ** 2 * np.exp(-(((yy - 40) / 30.0) ** 2))
    b = 40 + 900 * np.cos(yy / 9.0) ** 2 * np.exp(-(((xx - 70) / 40.0) ** 2))
    x = rng.uniform(0.3, 0.8, 16)
    photons = x[:, None, None] * a + (1 - x[:, None, None]) * b
    counts = rng.poisson(photons).astype(float)
    # optics blur the shot noise a little: spatially correlated residuals
    noise_image = ndimage.gaussian_filter(
        counts - photons, sigma=(0, 0.7, 0.7)
    )
    counts = photons + 1.6 * noise_image
    frames = OFFSET + GAIN * (counts + rng.normal(0, READ_NOISE, counts.shape))
    hot = rng.random(frames.shape) < 2e-3  # cosmic rays, hot pixels
    frames[hot] += rng.uniform(500, 20000, hot.sum())
    frames[:, 10, 20:23] = 0  # a dead column piece in every frame
    frames = np.clip(np.round(frames), 0, 65535).astype(np.uint16)
    mask = np.ones(shape, bool)
    mask[:, :6] = False  # a vignetted edge
    mask[80:, 100:] = False
    refs = (GAIN * a + OFFSET, GAIN * b + OFFSET)
    # the correlation kernel as the engine estimates it: from a robust fit
    y0, view0, design = block(frames[:4], *refs, mask, np.uint16, None)
    assert design.dtype == np.float32
    ols = NoiseSpec('huber', 'ols')
    z0 = REFERENCE.fit_block(y0, view0, ols, None).z
    from napari_mixcoef.backends.numpy import centred

    resid = residuals(centred(y0, view0), view0.basis[:1], z0)
    rho = noise_correlation(resid.reshape((4, *shape)), mask)
    assert rho.size > 1  # the blur is seen
    y, view, design = block(frames, *refs, mask, np.uint16, rho)
    spec = NoiseSpec(noise, 'auto', GAIN, OFFSET, READ_NOISE)
    got = get_backend(backend).fit_block(y, view, spec, None)
    want = REFERENCE.fit_block(y, view, spec, None)
    assert_same_fits(got, want, design, np.float32)
    if noise == 'huber':  # robust: x within a few standard errors
        coef, _ = design.to_model(got.z)
        assert np.all(np.abs(coef[:, 0] - x) < 5 * stderr_of(got, design))


def test_ties_in_the_robust_scale(backend):
    """Integer residuals: the MAD's middle value is one of many equal ones.

    References with an odd-symmetric difference and slices with an even one
    make ``q₀ᵀy_c`` exactly 0, so the first residuals are the slices
    themselves: small integers, ties everywhere.
    """
    rng = np.random.default_rng(5)
    half = rng.integers(0, 60, (12, 15)).astype(float)
    diff = np.concatenate([half, -half[:, ::-1]], axis=1)
    base = 200 + rng.integers(0, 50, diff.shape).astype(float)
    a, b = base + diff, base - diff
    even = rng.integers(-6, 7, (5, 12, 15)).astype(float)
    even[:, 3, 4] = 500  # a hot pixel, mirrored
    images = np.concatenate([even, even[:, :, ::-1]], axis=2)
    for dtype in (np.float32, np.float64):
        y, view, design = block(images + (a + b) / 2, a, b, None, dtype, RHO)
        for stderr in ('ols', 'auto'):
            spec = NoiseSpec('huber', stderr)
            got = get_backend(backend).fit_block(y, view, spec, None)
            # a scale off by one tied step would move the errors by ~10 %
            want = REFERENCE.fit_block(y, view, spec, None)
            assert_same_fits(got, want, design, dtype)


@pytest.mark.parametrize('noise', ['poisson', 'huber'])
def test_bad_values_stay_in_their_slice(backend, noise):
    """NaN or inf reach Σy_c² (the engine's check) and only that row."""
    rng = np.random.default_rng(9)
    a, b = make_refs(SHAPE, seed=1)
    stack = camera_stack(rng, a, b, 6)
    stack[1, 4, 5] = np.nan
    stack[4, 0, 0] = np.inf
    y, view, design = block(stack, GAIN * a + OFFSET, GAIN * b + OFFSET,
                            None, np.float32, RHO)  # fmt: skip
    spec = NoiseSpec(noise, 'auto', GAIN, OFFSET, READ_NOISE)
    impl = get_backend(backend)
    with np.errstate(invalid='ignore'):
        got = impl.fit_block(y, view, spec, None)
    assert not np.isfinite(got.yy[1]) and not np.isfinite(got.yy[4])
    good = [0, 2, 3, 5]
    assert np.isfinite(got.z[good]).all() and np.isfinite(got.ssr[good]).all()
    want = REFERENCE.fit_block(np.ascontiguousarray(y[good]), view, spec, None)
    picked = type(got)(
        got.z[good], got.meat[good],
        None if got.bread is None else got.bread[good],
        got.sandwich, got.ssr[good], got.yy[good], got.s[good], got.h[good],
    )  # fmt: skip
    assert_same_fits(picked, want, design, np.float32)


def test_block_split_does_not_matter(backend):
    # compiled: bit for bit; numpy's BLAS sums in an order of its own per
    # block shape
    y, view, _ = camera_block(2, 2, 8, circle(SHAPE))
    spec = NoiseSpec('huber', 'auto')
    impl = get_backend(backend)
    rtol = 1e-6 if backend == 'numpy' else 0
    whole = impl.fit_block(y, view, spec, None)
    parts = [impl.fit_block(y[i : i + 1], view, spec, None) for i in range(8)]
    assert_allclose(np.concatenate([p.z for p in parts]), whole.z, rtol=rtol)
    got = np.concatenate([p.ssr for p in parts])
    assert_allclose(got, whole.ssr, rtol=rtol)
    assert impl.fit_block(y[:0], view, spec, None).z.shape == (0, 1)


def test_two_threads_at_once(backend):
    from concurrent.futures import ThreadPoolExecutor

    y, view, _ = camera_block(4, 4, 16)
    spec = NoiseSpec('huber', 'auto')
    impl = get_backend(backend)
    alone = impl.fit_block(y, view, spec, None)
    with ThreadPoolExecutor(2) as pool:
        parts = pool.map(
            lambda i: impl.fit_block(y[i : i + 4], view, spec, None),
            range(0, 16, 4),
        )
        got = np.concatenate([p.z for p in parts])
    assert_allclose(got, alone.z, rtol=0)
