"""Registration: each slice's translation, estimated with its mix.

The drifting stacks are built independently of the package's maths: the
noise-free mixture moved by ``scipy.ndimage.shift`` (the contract's sign
convention), then Poisson and read noise as in the samples.  Tolerances
are stated where they are checked; Monte-Carlo counts are seeded, and
a coverage of 2000 intervals has a binomial standard error of 0.5 %.
"""

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy import ndimage

from napari_mixcoef import fit_stack, residuals
from napari_mixcoef.sample_data import (
    drift_path,
    make_drifting_mixture,
    make_mixture,
    make_three_states,
)

SHAPE = (64, 64)
OFFSET = 100.0


def drifting(n, shape=SHAPE, seed=0, amplitude=3.0):
    """A drifting mixture without the sample's defects."""
    stack, a, b, x, shift = make_drifting_mixture(
        n, shape, amplitude=amplitude, defects=False, seed=seed
    )
    return stack, a, b, x, shift


@pytest.fixture(scope='module')
def small():
    return drifting(40, seed=3)


def crb_x(a, b, x, mask):
    """Cramér–Rao bound of x for Poisson counts plus read noise (3)."""
    d = (a - b)[mask]
    mean = (
        x[:, None] * (a - OFFSET)[mask] + (1 - x[:, None]) * (b - OFFSET)[mask]
    )
    return 1 / np.sqrt(np.sum(d * d / (mean + 9.0), axis=1))


def test_accuracy_precision_and_coverage_at_the_sample_noise():
    # 1000 slices, ±3 px slow sub-pixel drift, the sample's Poisson noise
    stack, a, b, x, truth = drifting(1000, seed=1)
    fit = fit_stack(
        stack,
        a,
        b,
        register='translation',
        noise='poisson',
        camera_offset=OFFSET,
    )
    assert not fit.registration_failed.any()
    error = fit.shift - truth
    rms = np.sqrt(np.mean(error**2, axis=0))
    assert (rms <= 0.05).all(), rms
    shift_cover = np.mean(np.abs(error) <= 1.96 * fit.shift_stderr)
    assert 0.93 <= shift_cover <= 0.97, shift_cover
    x_cover = np.mean(np.abs(fit.x - x) <= 1.96 * fit.x_stderr)
    assert 0.93 <= x_cover <= 0.97, x_cover
    # x as precise as the bound over the fitted pixels allows (10 %), and
    # as a fit of the same stack without drift over those pixels
    # the fit keeps the pixels every slice covers: 64 − 2·(3 + 2) a side
    assert fit.n_pixels == 54 * 54
    registered = np.std(fit.x - x)
    still, a0, b0, x0 = make_mixture(1000, SHAPE, seed=1)
    mask = np.zeros(SHAPE, bool)
    mask[fit._registration.box] = True
    assert mask.sum() == fit.n_pixels
    bound = np.sqrt(np.mean(crb_x(a, b, x, mask) ** 2))
    assert abs(registered / bound - 1) <= 0.10, registered / bound
    ref = fit_stack(
        still[~_defects(1000)],
        a0,
        b0,
        mask=mask,
        noise='poisson',
        camera_offset=OFFSET,
    )
    unshifted = np.std(ref.x - x0[~_defects(1000)])
    assert abs(registered / unshifted - 1) <= 0.10


def _defects(n):
    from napari_mixcoef.sample_data import DEBRIS_SLICES, DEFOCUS_SLICE

    bad = np.zeros(n, bool)
    bad[[*DEBRIS_SLICES, DEFOCUS_SLICE]] = True
    return bad


def test_white_noise_coverage_textbook_and_robust():
    rng = np.random.default_rng(7)
    _, a, b, _, _ = drifting(1, shape=(48, 48))
    n = 1000
    x = rng.uniform(0.4, 0.7, n)
    truth = drift_path(n, 2.5)
    clean = np.stack(
        [
            ndimage.shift(xi * a + (1 - xi) * b, s, mode='nearest')
            for xi, s in zip(x, truth)
        ]
    )
    stack = clean + rng.normal(0, 30.0, clean.shape)
    for mode in ('ols', 'auto'):
        fit = fit_stack(stack, a, b, register='translation', stderr=mode)
        error = fit.shift - truth
        cover = np.mean(np.abs(error) <= 1.96 * fit.shift_stderr)
        assert 0.93 <= cover <= 0.97, (mode, cover)
        x_cover = np.mean(np.abs(fit.x - x) <= 1.96 * fit.x_stderr)
        assert 0.93 <= x_cover <= 0.97, (mode, x_cover)


def test_sign_convention_of_the_contract():
    _, a, b, _, _ = drifting(1)
    model = 0.6 * a + 0.4 * b
    shifts = np.array([[1.3, -2.7], [-0.45, 0.2], [0.0, 0.0], [2.5, 2.5]])
    stack = np.stack([ndimage.shift(model, s) for s in shifts])
    fit = fit_stack(stack, a, b, register='translation', stderr='ols')
    assert_allclose(fit.shift, shifts, atol=2e-3)
    assert_allclose(fit.x, 0.6, atol=1e-4)
    assert fit.register == 'translation'
    assert fit.shift.shape == (4, 2) and fit.shift_stderr.shape == (4, 2)
    assert fit.registration_failed.dtype == bool


def test_pure_noise_and_too_far_are_flagged_not_raised():
    stack, a, b, x, truth = drifting(30, seed=2)
    stack = stack.copy()
    rng = np.random.default_rng(0)
    stack[4] = rng.poisson(600.0, SHAPE)
    far = 0.5 * a + 0.5 * b
    stack[9] = np.clip(ndimage.shift(far, (6.0, 0.0), mode='nearest'), 0, None)
    fit = fit_stack(stack, a, b, register='translation', max_shift=4)
    assert np.flatnonzero(fit.registration_failed).tolist() == [4, 9]
    assert np.isnan(fit.shift[[4, 9]]).all()
    assert np.isnan(fit.shift_stderr[[4, 9]]).all()
    # their coefficients are those of the unregistered slice: finite
    assert np.isfinite(fit.x).all()
    ok = ~fit.registration_failed
    assert np.abs(fit.shift[ok] - truth[ok]).max() < 0.05


@pytest.mark.parametrize('model', ['mix', 'scaled', 'offset'])
@pytest.mark.parametrize('noise', ['gaussian', 'poisson', 'huber'])
def test_every_model_and_noise(small, model, noise):
    stack, a, b, x, truth = small
    fit = fit_stack(
        stack,
        a,
        b,
        model=model,
        noise=noise,
        camera_offset=OFFSET if noise == 'poisson' else 0.0,
        register='translation',
    )
    assert not fit.registration_failed.any()
    assert np.abs(fit.shift - truth).max() < 0.05
    assert np.abs(fit.x - x).max() < 6 * fit.x_stderr.max()
    assert np.isfinite(fit.shift_stderr).all()
    assert (fit.r2 > 0.9).all()


def test_three_references_and_constraint():
    stack, refs, truth = make_three_states(30, SHAPE, seed=1)
    moves = drift_path(30, 2.0)
    moved = np.stack(
        [
            ndimage.shift(s.astype(float), m, mode='nearest')
            for s, m in zip(stack, moves)
        ]
    )
    for constraint in (None, 'nonneg'):
        fit = fit_stack(
            moved, *refs, register='translation', constraint=constraint
        )
        # the noisy data were moved too (smoothing them): shifts to 0.05
        assert np.abs(fit.shift - moves).max() < 0.05
        assert np.abs(fit.fractions - truth).max() < 0.03


def test_dask_zarr_and_numpy_agree_and_stack_is_untouched(small, tmp_path):
    da = pytest.importorskip('dask.array')
    zarr = pytest.importorskip('zarr')
    stack, a, b, _, _ = small
    before = stack.copy()
    ref = fit_stack(stack, a, b, register='translation')
    assert np.array_equal(stack, before)
    z = zarr.create_array(
        store=str(tmp_path / 's.zarr'),
        shape=stack.shape,
        chunks=(7, *SHAPE),
        dtype=stack.dtype,
    )
    z[:] = stack
    lazy = da.from_array(stack, chunks=(9, 32, 32))
    for other in (z, lazy):
        fit = fit_stack(other, a, b, register='translation')
        assert_allclose(fit.shift, ref.shift, rtol=0, atol=1e-9)
        assert_allclose(fit.x, ref.x, rtol=0, atol=1e-9)
        assert_allclose(fit.shift_stderr, ref.shift_stderr, rtol=1e-9)
    res = np.asarray(residuals(lazy, a, b, ref)[3])
    assert_allclose(res, np.asarray(ref.residuals(stack)[3]), atol=1e-3)


def test_residuals_are_the_registered_fits():
    stack, a, b, _, _ = drifting(6, seed=4)
    fit = fit_stack(stack, a, b, register='translation', stderr='ols')
    res = np.asarray(fit.residuals(stack))
    assert res.shape == stack.shape and res.dtype == np.float32
    # no edge dipoles: the residual is the noise (√(photons + read²))
    inner = res[:, 8:-8, 8:-8]
    plain = np.asarray(fit_stack(stack, a, b).residuals(stack))[:, 8:-8, 8:-8]
    assert inner.std() < 0.7 * plain.std()
    assert_allclose(
        np.sqrt(np.mean(inner**2, axis=(1, 2))), fit.rmse, rtol=0.1
    )


def test_csv_and_lead_shapes(tmp_path):
    stack, a, b, _, truth = drifting(12, seed=5)
    fit = fit_stack(stack.reshape(3, 4, *SHAPE), a, b, register='translation')
    assert fit.shift.shape == (3, 4, 2)
    assert fit.registration_failed.shape == (3, 4)
    assert_allclose(fit.shift.reshape(12, 2), truth, atol=0.05)
    fit.to_csv(tmp_path / 'f.csv')
    header = (tmp_path / 'f.csv').read_text().splitlines()[0].split(',')
    for name in ('shift_0', 'shift_0_stderr', 'shift_1', 'shift_1_stderr'):
        assert name in header
    assert fit_stack(stack, a, b).shift is None


@pytest.mark.parametrize(
    'kwargs, match',
    [
        ({'register': 'affine'}, 'translation'),
        ({'register': 'translation', 'max_shift': 0}, 'max_shift'),
        ({'register': 'translation', 'max_shift': -2.0}, 'max_shift'),
        ({'register': 'translation', 'max_shift': np.nan}, 'max_shift'),
    ],
)
def test_bad_options(small, kwargs, match):
    stack, a, b, _, _ = small
    with pytest.raises(ValueError, match=match):
        fit_stack(stack, a, b, **kwargs)


def test_volumes_and_omitted_pixels():
    rng = np.random.default_rng(0)
    a = ndimage.gaussian_filter(rng.random((24, 24, 24)) * 1000, 2) + 100
    b = ndimage.gaussian_filter(rng.random((24, 24, 24)) * 1000, 2) + 100
    moves = rng.uniform(-1.5, 1.5, (6, 3))
    clean = [
        ndimage.shift(0.3 * a + 0.7 * b, m, mode='nearest') for m in moves
    ]
    stack = np.stack(clean) + rng.normal(0, 1.0, (6, 24, 24, 24))
    with pytest.warns(UserWarning, match='collinear'):
        fit = fit_stack(stack, a, b, register='translation')
    assert fit.shift.shape == (6, 3)
    assert np.abs(fit.shift - moves).max() < 0.02
    # a slice with a NaN pixel is fitted on the others, unregistered
    stack, a, b, _, truth = drifting(8, seed=1)
    stack = stack.astype(np.float32)
    stack[2, 10, 10] = np.nan
    fit = fit_stack(stack, a, b, register='translation', nan_policy='omit')
    assert np.flatnonzero(fit.registration_failed).tolist() == [2]
    assert fit.n_omitted[2] == 1 and np.isfinite(fit.x[2])
    keep = ~fit.registration_failed
    assert np.abs(fit.shift[keep] - truth[keep]).max() < 0.05


@pytest.mark.parametrize('masked', [False, True])
def test_large_images_first_pass_on_a_quarter_of_the_rows(masked):
    # 128 × 128: the first joint pass reads every 4th row of the box
    stack, a, b, x, truth = drifting(40, shape=(128, 128), seed=6)
    mask = None
    if masked:
        yy, xx = np.mgrid[:128, :128]
        mask = (yy - 64) ** 2 + (xx - 60) ** 2 < 55**2
    fit = fit_stack(stack, a, b, register='translation', mask=mask)
    assert not fit.registration_failed.any()
    assert np.abs(fit.shift - truth).max() < 0.02
    assert np.abs(fit.x - x).max() < 6 * fit.x_stderr.max()
    cover = np.mean(np.abs(fit.shift - truth) <= 3 * fit.shift_stderr)
    assert cover >= 0.95
