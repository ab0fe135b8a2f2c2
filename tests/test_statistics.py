"""Noise models and honest errors, checked by seeded Monte-Carlo runs.

Each check simulates thousands of small slices with a known x and compares
the fit with a bound computed independently: the Cramér–Rao bound of the
noise model, or the empirical scatter of x, and the fraction of 95 %
intervals that cover the truth (a binomial standard error of 0.4 % for
3000 slices, so the 93–97 % window is five of them wide).
"""

import itertools

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy import ndimage

from napari_mixcoef import fit_stack, reference_diagnostics
from napari_mixcoef.backends import get_backend
from napari_mixcoef.model.spatial import noise_correlation

N = 3000
SHAPE = (32, 32)


def references(rng, low=20.0, high=400.0):
    """Two positive references with different patterns (photons)."""
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    a = low + (high - low) * np.sin(xx / 4.0) ** 2 * (yy / SHAPE[0])
    b = low + (high - low) * np.cos(yy / 5.0) ** 2 * (1 - xx / SHAPE[1])
    return a + 5 * rng.random(SHAPE), b + 5 * rng.random(SHAPE)


def mixed(rng, a, b, n=N):
    x = rng.uniform(0.4, 0.7, n)
    return x, x[:, None, None] * a + (1 - x[:, None, None]) * b


def coverage(fit, x):
    return np.mean(np.abs(fit.x - x) <= 1.96 * fit.x_stderr)


def spread_ratio(fit, x):
    """Mean reported stderr over the actual scatter of x (1 = honest)."""
    return np.sqrt(np.mean(fit.x_stderr**2)) / np.sqrt(
        np.mean((fit.x - x) ** 2)
    )


def test_white_noise_auto_and_ols_both_cover():
    rng = np.random.default_rng(1)
    a, b = references(rng)
    x, clean = mixed(rng, a, b)
    stack = clean + rng.normal(0, 15.0, clean.shape)
    for mode in ('auto', 'ols'):
        fit = fit_stack(stack, a, b, stderr=mode)
        assert 0.93 <= coverage(fit, x) <= 0.97, mode
        assert abs(spread_ratio(fit, x) - 1) < 0.05, mode
    assert fit.stderr_mode == 'ols'


def test_optics_correlated_noise_needs_auto():
    """Noise smoothed by a 1-pixel Gaussian PSF: OLS errors are too small."""
    rng = np.random.default_rng(2)
    a, b = references(rng)
    x, clean = mixed(rng, a, b)
    pad = 8
    white = rng.normal(0, 40.0, (N, SHAPE[0] + 2 * pad, SHAPE[1] + 2 * pad))
    blurred = ndimage.gaussian_filter(white, sigma=(0, 1.0, 1.0))
    stack = clean + blurred[:, pad:-pad, pad:-pad]
    auto = fit_stack(stack, a, b)
    ols = fit_stack(stack, a, b, stderr='ols')
    assert 0.93 <= coverage(auto, x) <= 0.97
    assert abs(spread_ratio(auto, x) - 1) < 0.06
    assert coverage(ols, x) < 0.75  # the textbook formula is far off
    kernel = auto.noise_kernel
    centre = tuple(s // 2 for s in kernel.shape)
    # correlation of white noise blurred by σ = 1 at one pixel: e^(-1/4)
    assert_allclose(kernel[centre[0], centre[1] + 1], np.exp(-0.25), atol=0.03)


def brute_force_correlation(r, mask, max_lag=4):
    """ρ(h) from every pair of fitted pixels at each lag, one lag at a time.

    The definition :func:`noise_correlation` implements, without its
    padding and offsets (for residuals that its clipping leaves alone).
    """
    shape = r.shape[1:]
    lag = tuple(min(max_lag, s - 1) for s in shape)
    inside = np.ones(shape) if mask is None else mask.astype(float)
    sums = np.zeros(tuple(2 * h + 1 for h in lag))
    pairs = np.zeros_like(sums)
    for h in itertools.product(*(range(-m, m + 1) for m in lag)):
        here = tuple(
            slice(max(0, -d), s - max(0, d)) for d, s in zip(h, shape)
        )
        there = tuple(
            slice(max(0, d), s + min(0, d)) for d, s in zip(h, shape)
        )
        at = tuple(m + d for m, d in zip(lag, h))
        sums[at] = np.sum(r[(slice(None), *here)] * r[(slice(None), *there)])
        pairs[at] = len(r) * np.sum(inside[here] * inside[there])
    rho = sums / pairs / (sums[lag] / pairs[lag])
    rho[np.abs(rho) < 3 / np.sqrt(pairs)] = 0.0
    rho[lag] = 1.0
    return rho


@pytest.mark.parametrize('shape', [(70,), (23, 31), (6, 9, 7)])
@pytest.mark.parametrize('masked', [False, True])
def test_noise_correlation_sums_every_pair_once(backend, shape, masked):
    lags = get_backend(backend).lag_products
    rng = np.random.default_rng(11)
    # uniform noise within ±1, each value averaged with its neighbour
    # along the last axis: within ±1, below the clip at 4 robust sigmas
    # (~1.7), and correlated at one lag
    white = rng.uniform(-1, 1, (5, *shape))
    r = ndimage.uniform_filter1d(white, size=2, axis=-1)
    mask = rng.random(shape) > 0.3 if masked else None
    if masked:
        r[:, ~mask] = 0.0
    want = brute_force_correlation(r, mask)
    assert np.count_nonzero(want) > 1  # the smoothing shows at lag 1
    got = noise_correlation(r, mask, lag_products=lags)
    assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_poisson_counts_cover_with_auto_for_every_estimator():
    rng = np.random.default_rng(3)
    a, b = references(rng, low=10.0, high=600.0)
    gain, offset = 2.0, 100.0
    x, photons = mixed(rng, a, b)
    counts = offset + gain * rng.poisson(photons)
    ref1, ref2 = offset + gain * a, offset + gain * b
    for noise in ('gaussian', 'poisson', 'huber'):
        fit = fit_stack(
            counts, ref1, ref2, noise=noise, gain=gain, camera_offset=offset
        )
        assert 0.93 <= coverage(fit, x) <= 0.97, noise
        assert abs(spread_ratio(fit, x) - 1) < 0.06, noise


def test_poisson_mode_reaches_the_poisson_cramer_rao_bound():
    rng = np.random.default_rng(4)
    a, b = references(rng, low=3.0, high=300.0)
    read = 2.0  # photons rms
    x, photons = mixed(rng, a, b)
    counts = rng.poisson(photons) + rng.normal(0, read, photons.shape)
    fisher = np.sum(((a - b) ** 2)[None] / (photons + read**2), axis=(1, 2))
    bound = np.sqrt(np.mean(1.0 / fisher))
    fit = fit_stack(counts, a, b, noise='poisson', read_noise=read)
    ols = fit_stack(counts, a, b)
    scatter = np.sqrt(np.mean((fit.x - x) ** 2))
    ols_scatter = np.sqrt(np.mean((ols.x - x) ** 2))
    assert abs(scatter / bound - 1) < 0.05
    assert ols_scatter > 1.05 * scatter  # weighting by the model pays off
    assert 0.93 <= coverage(fit, x) <= 0.97


def test_huber_shrugs_off_hot_pixels():
    rng = np.random.default_rng(5)
    a, b = references(rng)
    sigma = 10.0
    x, clean = mixed(rng, a, b)
    stack = clean + rng.normal(0, sigma, clean.shape)
    hot = rng.random(stack.shape) < 0.005
    stack[hot] += rng.uniform(500, 3000, hot.sum())
    bound = sigma / np.linalg.norm(a - b)
    huber = fit_stack(stack, a, b, noise='huber')
    ols = fit_stack(stack, a, b)
    assert abs(np.std(huber.x - x) / bound - 1) < 0.05
    assert np.std(ols.x - x) > 5 * bound
    assert 0.93 <= coverage(huber, x) <= 0.97


def test_estimators_agree_on_clean_gaussian_data():
    rng = np.random.default_rng(6)
    a, b = references(rng)
    x, clean = mixed(rng, a, b, n=200)
    stack = clean + rng.normal(0, 5.0, clean.shape)
    ols = fit_stack(stack, a, b, model='scaled')
    huber = fit_stack(stack, a, b, model='scaled', noise='huber')
    # Huber is 95 % efficient on Gaussian noise: it differs from OLS by
    # about sqrt(1/0.95 - 1) = 0.23 standard errors
    diff = (huber.x - ols.x) / ols.x_stderr
    assert diff.std() < 0.35 and np.abs(diff).max() < 1.2
    assert huber.noise == 'huber'
    # Poisson weights on Gaussian data: another unbiased estimator
    poisson = fit_stack(stack, a, b, model='scaled', noise='poisson')
    diff = poisson.x - ols.x
    assert abs(diff.mean()) < 4 * diff.std() / np.sqrt(diff.size)
    assert np.abs(diff).max() < 3 * np.median(ols.x_stderr)
    # OLS coefficients do not depend on the stderr mode
    assert_allclose(
        fit_stack(stack, a, b, model='scaled', stderr='ols').coef,
        ols.coef,
        rtol=1e-6,
    )


def test_noise_models_on_dask_equal_numpy():
    import dask.array as da

    rng = np.random.default_rng(7)
    a, b = references(rng)
    _, photons = mixed(rng, a, b, n=60)
    counts = rng.poisson(photons).astype(np.uint16)
    for noise in ('poisson', 'huber', 'gaussian'):
        expected = fit_stack(counts, a, b, noise=noise)
        lazy = da.from_array(counts, chunks=(7, 16, 32))
        fit = fit_stack(lazy, a, b, noise=noise)
        assert_allclose(fit.x, expected.x, rtol=1e-6)
        assert_allclose(fit.x_stderr, expected.x_stderr, rtol=1e-4)


@pytest.mark.parametrize(
    ('kwargs', 'message'),
    [
        ({'noise': 'laplace'}, "unknown noise model 'laplace'"),
        ({'stderr': 'hc3'}, "unknown stderr 'hc3'"),
        ({'noise': 'poisson', 'gain': 0.0}, 'gain must be a positive'),
        ({'noise': 'poisson', 'read_noise': -1.0}, 'read_noise must be'),
    ],
)
def test_bad_statistics_arguments(kwargs, message):
    rng = np.random.default_rng(8)
    a, b = references(rng)
    _, stack = mixed(rng, a, b, n=3)
    with pytest.raises(ValueError, match=message):
        fit_stack(stack, a, b, **kwargs)


def test_reference_diagnostics_closed_form():
    rng = np.random.default_rng(9)
    a, b = references(rng)
    mask = np.ones(SHAPE, bool)
    mask[:4] = False
    d = reference_diagnostics(a, b, mask=mask)
    av, bv = a[mask], b[mask]
    assert_allclose(
        d['diff_energy_fraction'],
        np.sum((av - bv) ** 2) / (2 * (np.sum(av**2) + np.sum(bv**2))),
    )
    assert_allclose(d['x_stderr_per_noise'], 1 / np.linalg.norm(av - bv))
    assert_allclose(d['correlation'], np.corrcoef(av, bv)[0, 1])
    assert d['n_pixels'] == mask.sum()
    assert not d['collinear'] and not d['nearly_collinear']
    # the energy split is the seed's avg/diff change of basis
    avg, diff = (av + bv) / np.sqrt(2), (av - bv) / np.sqrt(2)
    assert_allclose(
        d['diff_energy_fraction'],
        np.sum(diff**2) / (np.sum(avg**2) + np.sum(diff**2)),
    )
    same = reference_diagnostics(a, 3 * a)
    assert same['collinear'] and same['nearly_collinear']
    assert_allclose(same['x_stderr_per_noise'], 1 / np.linalg.norm(2 * a))


def test_huber_textbook_errors_are_not_zero():
    # a packed zero bread once made every Huber "ols" error zero
    rng = np.random.default_rng(3)
    a, b = references(rng)
    x, clean = mixed(rng, a, b, n=200)
    stack = clean + rng.normal(0, 15.0, clean.shape)
    huber = fit_stack(stack, a, b, noise='huber', stderr='ols')
    plain = fit_stack(stack, a, b, stderr='ols')
    assert_allclose(huber.x_stderr, plain.x_stderr, rtol=0.1)
