"""NaN pixels, tiny masks and detector settings, as users meet them."""

import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose

from napari_mixcoef import DetectorWarning, fit_stack

from conftest import make_stack


@pytest.mark.parametrize('noise', ['gaussian', 'poisson', 'huber'])
@pytest.mark.parametrize('stderr', ['auto', 'ols'])
@pytest.mark.parametrize('model', ['mix', 'offset'])
def test_omit_fits_each_slice_on_its_finite_pixels(
    backend, noise, stderr, model
):
    stack, a, b, _ = make_stack(lead=(12,), noise=5.0)
    stack = stack.astype(np.float32)
    holes = stack.copy()
    holes[3, 2:5, 7] = np.nan
    holes[8, 0, 0] = np.inf
    holes[8, 10, 11] = -np.inf
    kwargs = dict(model=model, noise=noise, stderr=stderr, backend=backend)
    with pytest.raises(ValueError, match=r'slice \(3,\) contains NaN'):
        fit_stack(holes, a, b, **kwargs)
    fit = fit_stack(holes, a, b, nan_policy='omit', **kwargs)
    assert fit.nan_policy == 'omit'
    assert fit.n_omitted.tolist() == [0, 0, 0, 3, 0, 0, 0, 0, 2, 0, 0, 0]
    assert fit.n_pixels == a.size
    # a slice with holes: its fit on the other pixels, as a mask gives it
    for i, bad in ((3, np.isfinite(holes[3])), (8, np.isfinite(holes[8]))):
        if stderr == 'auto':
            continue  # its errors use the whole stack's noise kernel
        alone = fit_stack(stack[i : i + 1], a, b, mask=bad, **kwargs)
        assert_allclose(fit.coef[i], alone.coef[0], rtol=1e-5)
        assert_allclose(fit.stderr[i], alone.stderr[0], rtol=1e-4)
        assert_allclose(fit.rmse[i], alone.rmse[0], rtol=1e-4)
    # the others as without holes
    whole = fit_stack(stack, a, b, **kwargs)
    keep = [i for i in range(12) if i not in (3, 8)]
    assert_allclose(fit.coef[keep], whole.coef[keep], rtol=1e-6)
    info = fit.provenance()
    assert info['omitted_pixels'] == 5
    assert info['slices_with_omitted_pixels'] == 2


def test_omit_a_slice_left_without_pixels_gives_nan():
    stack, a, b, _ = make_stack(lead=(4,))
    stack[2] = np.nan
    fit = fit_stack(stack, a, b, nan_policy='omit')
    assert np.isnan(fit.x[2]) and np.isnan(fit.r2[2])
    assert np.isfinite(fit.x[[0, 1, 3]]).all()
    assert fit.n_omitted[2] == a.size


def test_unknown_nan_policy():
    stack, a, b, _ = make_stack(lead=(2,))
    with pytest.raises(ValueError, match="unknown nan_policy 'skip'"):
        fit_stack(stack, a, b, nan_policy='skip')


@pytest.mark.parametrize('n_pixels', [2, 5, 16, 40])
@pytest.mark.parametrize('noise', ['gaussian', 'poisson', 'huber'])
@pytest.mark.parametrize('stderr', ['auto', 'ols'])
def test_tiny_masks_fit_with_every_noise_model(n_pixels, noise, stderr):
    # the noise correlation cannot be estimated from a few pixels: the fit
    # assumes independent noise and says so
    stack, a, b, x = make_stack(lead=(20,), noise=2.0)
    rng = np.random.default_rng(n_pixels)
    mask = np.zeros(a.shape, bool)
    mask.flat[rng.choice(a.size, n_pixels, replace=False)] = True
    fit = fit_stack(stack, a, b, mask=mask, noise=noise, stderr=stderr)
    assert np.isfinite(fit.x).all() and np.isfinite(fit.x_stderr).all()
    if stderr == 'auto':
        assert any('independent noise' in note for note in fit.notes)
        assert np.count_nonzero(fit.noise_kernel) == 1
        assert str(n_pixels) in fit.notes[0]
    # x within 8 of its Cramér–Rao standard deviations (noise 2)
    bound = 2.0 / np.linalg.norm((a - b)[mask])
    assert np.all(np.abs(fit.x - x) < 8 * bound)


def test_a_camera_offset_above_the_data_warns_with_the_numbers():
    stack, a, b, _ = make_stack(lead=(5,), noise=2.0)
    with pytest.warns(DetectorWarning, match=r'camera_offset 5000 is at or '
                      r'above 100 % of the fitted pixels'):  # fmt: skip
        fit_stack(stack, a, b, noise='poisson', camera_offset=5000.0)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        fit_stack(stack, a, b, noise='poisson', camera_offset=10.0)
        fit_stack(stack, a, b, camera_offset=5000.0)  # not Poisson: unused
