"""The compiled per-slice IRLS fits against the numpy ``fit_block``.

``fit_block_fused`` must return ``fit_block``'s rows (δ, covariance, SSR,
Σy_c², Σy_c, u2ᵀy_c) for every noise model and error mode it covers.  The
blocks are built as ``core._fit_slices`` builds them: the design from
``_design.prepare``, ``core._block_design`` (with sandwich terms for
``stderr="auto"``), slices centred on M and zero outside the mask.

Tolerances: float64 work agrees to rounding (1e-12).  float32 work keeps
every per-pixel step in float32 as numpy does, but sums in float64 (from
float32 partial sums of ≤ 1024 pixels) where numpy's BLAS sums in float32,
so the two differ by numpy's float32 summation error: coefficients to
1e-6 relative (δ to 1e-3 of its standard error), standard errors to 2e-5
(seen: 8e-8, 1.1e-5 and 1.4e-6).
"""

import importlib.util
import sys

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy import ndimage

from napari_mixcoef import _fused
from napari_mixcoef._design import prepare
from napari_mixcoef._estimators import NoiseSpec, fit_block_numpy, split_output
from napari_mixcoef._fused_irls import fit_block_fused
from napari_mixcoef._spatial import noise_correlation
from napari_mixcoef.core import _block_design

from conftest import make_refs

needs_numba = pytest.mark.skipif(
    importlib.util.find_spec('numba') is None, reason='needs numba'
)

SHAPE = (40, 56)
GAIN, OFFSET, READ_NOISE = 2.0, 100.0, 1.5
#: (coef rtol, δ atol in standard errors, stderr rtol, sums rtol)
TOL = {
    np.float32: (1e-6, 1e-3, 2e-5, 1e-5),
    np.float64: (1e-12, 1e-9, 1e-10, 1e-12),
}
# a correlation kernel for the sandwich terms: neighbours correlate
RHO = np.zeros((3, 3))
RHO[1] = [0.3, 1.0, 0.3]
RHO[:, 1] = [0.2, 1.0, 0.2]


def camera_stack(rng, a, b, n):
    """Photon counts of known mixes through a camera: gain, offset, read."""
    x = rng.uniform(0.4, 0.7, n)
    photons = x[:, None, None] * a + (1 - x[:, None, None]) * b
    counts = rng.poisson(photons) + rng.normal(0, READ_NOISE, photons.shape)
    return OFFSET + GAIN * counts


def camera_block(seed, ref_seed, n, mask=None, dtype=np.float32, rho=RHO):
    """:func:`block` of ``n`` camera slices of references ``ref_seed``."""
    rng = np.random.default_rng(seed)
    a, b = make_refs(SHAPE, seed=ref_seed)
    stack = camera_stack(rng, a, b, n)
    return block(stack, GAIN * a + OFFSET, GAIN * b + OFFSET, mask, dtype, rho)


def block(stack, a, b, mask, dtype, rho):
    """``(yc, bd, design)`` the way ``core._fit_slices`` makes them."""
    design = prepare(a, b, mask, 'mix', np.dtype(dtype))
    bd = _block_design(design, a.shape, rho)
    yc = stack.astype(dtype) - design.centre
    if mask is not None:
        yc[:, ~mask] = 0
    return yc.reshape(len(stack), -1), bd, design


def circle(shape):
    yy, xx = np.indices(shape)
    cy, cx = shape[0] / 2, shape[1] / 2
    return (yy - cy) ** 2 + (xx - cx) ** 2 < (0.45 * min(shape)) ** 2


def assert_same_rows(fused, plain, design, dtype):
    coef_tol, delta_tol, stderr_tol, sums_tol = TOL[dtype]
    assert fused.shape == plain.shape and fused.dtype == np.float64
    df, cf, ssr_f, q_f, s_f, h_f = split_output(fused, 1)
    dp, cp, ssr_p, q_p, s_p, h_p = split_output(plain, 1)
    stderr_p = np.sqrt(cp[:, 0, 0])
    assert_allclose(
        design.coef0 + df[:, 0], design.coef0 + dp[:, 0], rtol=coef_tol
    )
    assert_allclose(df, dp, rtol=0, atol=delta_tol * stderr_p.min())
    assert_allclose(np.sqrt(cf[:, 0, 0]), stderr_p, rtol=stderr_tol)
    assert_allclose(ssr_f, ssr_p, rtol=sums_tol)
    assert_allclose(q_f, q_p, rtol=sums_tol)
    # Σy_c and u2ᵀy_c cancel: compare with the size of their terms
    n = design.n_pixels
    u2 = design.basis[1].astype(np.float64)
    assert_allclose(s_f, s_p, rtol=0, atol=sums_tol * np.sqrt(n * q_p).max())
    bound = sums_tol * np.sqrt(u2 @ u2 * q_p).max()
    assert_allclose(h_f, h_p, rtol=0, atol=bound)


@needs_numba
@pytest.mark.parametrize('dtype', [np.float32, np.float64])
@pytest.mark.parametrize('masked', [False, True])
@pytest.mark.parametrize('stderr', ['ols', 'auto'])
@pytest.mark.parametrize('noise', ['poisson', 'huber', 'gaussian'])
def test_matches_fit_block(noise, stderr, masked, dtype):
    rng = np.random.default_rng(7)
    a, b = make_refs(SHAPE, seed=3)
    stack = camera_stack(rng, a, b, 12)
    mask = circle(SHAPE) if masked else None
    rho = RHO if stderr == 'auto' else None
    yc, bd, design = block(stack, GAIN * a + OFFSET, GAIN * b + OFFSET, mask,
                           dtype, rho)  # fmt: skip
    spec = NoiseSpec(noise, stderr, GAIN, OFFSET, READ_NOISE)
    fused = fit_block_fused(yc, bd, spec)
    assert fused is not None
    assert_same_rows(fused, fit_block_numpy(yc, bd, spec), design, dtype)


@needs_numba
@pytest.mark.parametrize('iterations', [1, 2, 5])
@pytest.mark.parametrize('noise', ['poisson', 'huber'])
def test_any_number_of_iterations(noise, iterations):
    yc, bd, design = camera_block(8, 4, 6)
    spec = NoiseSpec(noise, 'auto', GAIN, OFFSET, READ_NOISE, iterations)
    fused = fit_block_fused(yc, bd, spec)
    assert_same_rows(fused, fit_block_numpy(yc, bd, spec), design, np.float32)


@needs_numba
@pytest.mark.parametrize('noise', ['poisson', 'huber'])
def test_realistic_data_with_hot_pixels(noise):
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
    design = prepare(*refs, mask, 'mix', frames.dtype)
    assert design.dtype == np.float32
    # the correlation kernel as core estimates it: from a robust fit
    yc0, bd0, _ = block(frames[:4], *refs, mask, np.float32, None)
    ols = NoiseSpec('huber', 'ols')
    delta = fit_block_numpy(yc0, bd0, ols)[:, :1]
    resid = yc0 - delta.astype(np.float32) * bd0.design_t
    rho = noise_correlation(resid.reshape((4, *shape)), mask)
    assert rho.size > 1  # the blur is seen
    yc, bd, design = block(frames, *refs, mask, np.float32, rho)
    spec = NoiseSpec(noise, 'auto', GAIN, OFFSET, READ_NOISE)
    fused = fit_block_fused(yc, bd, spec)
    plain = fit_block_numpy(yc, bd, spec)
    assert_same_rows(fused, plain, design, np.float32)
    if noise == 'huber':  # robust: x within a few standard errors
        fit_x = design.coef0[0] + fused[:, 0]
        assert np.all(np.abs(fit_x - x) < 5 * np.sqrt(fused[:, 1]))


@needs_numba
def test_ties_in_the_robust_scale():
    """Integer residuals: the MAD's middle value is one of many equal ones.

    References with an odd-symmetric difference and slices with an even one
    make ``Dᵀy`` exactly 0, so the first residuals are the slices
    themselves: small integers, ties everywhere.
    """
    rng = np.random.default_rng(5)
    half = rng.integers(0, 60, (12, 15)).astype(float)
    diff = np.concatenate([half, -half[:, ::-1]], axis=1)
    base = 200 + rng.integers(0, 50, diff.shape).astype(float)
    a, b = base + diff, base - diff
    even = rng.integers(-6, 7, (5, 12, 15)).astype(float)
    even[:, 3, 4] = 500  # a hot pixel, mirrored
    yc_images = np.concatenate([even, even[:, :, ::-1]], axis=2)
    for dtype in (np.float32, np.float64):
        design = prepare(a, b, None, 'mix', np.dtype(dtype))
        bd = _block_design(design, a.shape, RHO)
        yc = yc_images.reshape(5, -1).astype(dtype)
        assert np.all(yc @ bd.design_t[0] == 0)
        for stderr in ('ols', 'auto'):
            spec = NoiseSpec('huber', stderr)
            fused = fit_block_fused(yc, bd, spec)
            # a scale off by one tied step would move the errors by ~10 %
            assert_same_rows(
                fused, fit_block_numpy(yc, bd, spec), design, dtype
            )


@needs_numba
@pytest.mark.parametrize('noise', ['poisson', 'huber'])
def test_bad_values_stay_in_their_slice(noise):
    """NaN or inf reach Σy_c² (the caller's check) and only that row.

    (numpy's Huber fit raises LinAlgError on such a block instead: a NaN
    residual is no inlier, so the robust bread is singular.)
    """
    rng = np.random.default_rng(9)
    a, b = make_refs(SHAPE, seed=1)
    stack = camera_stack(rng, a, b, 6)
    stack[1, 4, 5] = np.nan
    stack[4, 0, 0] = np.inf
    yc, bd, design = block(stack, GAIN * a + OFFSET, GAIN * b + OFFSET,
                           None, np.float32, RHO)  # fmt: skip
    spec = NoiseSpec(noise, 'auto', GAIN, OFFSET, READ_NOISE)
    fused = fit_block_fused(yc, bd, spec)
    q = fused[:, 3]
    assert not np.isfinite(q[1]) and not np.isfinite(q[4])
    good = [0, 2, 3, 5]
    assert np.isfinite(fused[good]).all()
    plain = fit_block_numpy(yc[good], bd, spec)
    assert_same_rows(fused[good], plain, design, np.float32)


@needs_numba
def test_layout_and_block_split_do_not_matter():
    yc, bd, _ = camera_block(2, 2, 8, circle(SHAPE))
    spec = NoiseSpec('huber', 'auto')
    whole = fit_block_fused(yc, bd, spec)
    rows = np.concatenate([fit_block_fused(yc[i : i + 1], bd, spec)
                           for i in range(len(yc))])  # fmt: skip
    assert_allclose(rows, whole, rtol=0, atol=0)
    strided = np.zeros((len(yc), 2 * yc.shape[1]), yc.dtype)[:, ::2]
    strided[...] = yc
    assert_allclose(fit_block_fused(strided, bd, spec), whole, rtol=0)
    assert fit_block_fused(yc[:0], bd, spec).shape == (0, bd.n_out)


@needs_numba
def test_two_threads_at_once():
    from concurrent.futures import ThreadPoolExecutor

    yc, bd, _ = camera_block(4, 4, 16)
    spec = NoiseSpec('huber', 'auto')
    alone = fit_block_fused(yc, bd, spec)
    with ThreadPoolExecutor(2) as pool:
        parts = pool.map(
            lambda i: fit_block_fused(yc[i : i + 4], bd, spec),
            range(0, 16, 4),
        )
        assert_allclose(np.concatenate(list(parts)), alone, rtol=0)


def test_returns_none_where_not_covered(monkeypatch):
    a, b = make_refs(SHAPE, seed=0)
    stack = make_refs(SHAPE, seed=1)[0][None] * np.ones((2, 1, 1))
    spec = NoiseSpec('poisson', 'auto')
    design = prepare(a, b, None, 'scaled', np.dtype(np.float32))
    bd = _block_design(design, SHAPE, RHO)
    yc = (stack - design.centre).reshape(2, -1).astype(np.float32)
    assert fit_block_fused(yc, bd, spec) is None  # two coefficients
    yc, bd, _ = block(stack, a, b, None, np.float32, None)
    assert fit_block_fused(yc, bd, spec) is None  # no sandwich terms
    yc, bd, _ = block(stack, a, b, None, np.float32, RHO)
    assert fit_block_fused(yc.astype(np.float64), bd, spec) is None
    monkeypatch.setenv('NAPARI_MIXCOEF_KERNEL', 'numpy')
    assert fit_block_fused(yc, bd, spec) is None


def test_without_numba_returns_none(monkeypatch):
    monkeypatch.setattr(_fused, '_JITTED', {})
    monkeypatch.setitem(sys.modules, 'numba', None)
    a, b = make_refs(SHAPE, seed=0)
    yc, bd, _ = block(a[None] * 1.1, a, b, None, np.float32, RHO)
    assert fit_block_fused(yc, bd, NoiseSpec('huber')) is None
