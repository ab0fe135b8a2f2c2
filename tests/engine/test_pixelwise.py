"""Spectral unmixing: slices of a few pixels, fitted one by one.

The **pixels** route (:mod:`napari_mixcoef.model.pixelwise`) against the
generic per-slice path of the same fit and against per-slice
``scipy.linalg.lstsq``, on channel-last images with 1-D references.
"""

import numpy as np
import pytest
import scipy.linalg
from numpy.testing import assert_allclose

from napari_mixcoef import fit_stack
from napari_mixcoef.engine import fit as engine_fit

FIELDS = ('coef', 'stderr', 'fractions', 'fractions_stderr', 'x',
          'x_stderr', 'r2', 'rmse')  # fmt: skip
#: Relative agreement of the two paths: float32 sums of the generic path
#: keep ~6 digits; float64 agrees to rounding.
RTOL = {np.float32: 2e-4, np.float64: 1e-9}


def spectra(c=8, k=3, seed=0):
    """K smooth overlapping spectra of C channels (K, C)."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(0, 1, c)
    centres = np.linspace(0.2, 0.8, k) + rng.normal(0, 0.02, k)
    return np.exp(-0.5 * ((grid - centres[:, None]) / 0.2) ** 2) + 0.1


def image(refs, shape=(12, 10), noise=0.5, offset=0.0, seed=1):
    """A channel-last image of random abundances (``shape + (C,)``)."""
    rng = np.random.default_rng(seed)
    coef = rng.uniform(20, 60, shape + (len(refs),))
    clean = coef @ refs + offset
    return clean + rng.normal(0, noise, clean.shape)


def generic(monkeypatch, *args, **kwargs):
    """The same fit through the generic per-slice path."""
    with monkeypatch.context() as patch:
        patch.setattr(engine_fit, 'PIXEL_SLICE', 0)
        return fit_stack(*args, **kwargs)


def assert_same(fit, other, rtol, atol=0.0):
    for name in FIELDS:
        a, b = getattr(fit, name), getattr(other, name)
        assert a.shape == b.shape, name
        scale = np.nanmax(np.abs(b)) if np.isfinite(b).any() else 1.0
        assert_allclose(a, b, rtol=rtol, atol=atol + rtol * scale,
                        err_msg=name)  # fmt: skip


def lstsq_fit(y, refs, model, mask=None):
    """Per-slice float64 ``scipy.linalg.lstsq``: coef and SSR."""
    flat = y.reshape(-1, refs.shape[1]).astype(np.float64)
    fitted = np.ones(refs.shape[1], bool) if mask is None else mask
    design = refs.T[fitted]
    target = flat[:, fitted]
    if model == 'mix':  # x_k of the first K−1, the last 1 − Σ
        target = target - design[:, -1]
        design = design[:, :-1] - design[:, -1:]
    elif model == 'offset':
        design = np.column_stack([design, np.ones(len(design))])
    coef = np.array([scipy.linalg.lstsq(design, t)[0] for t in target])
    ssr = ((target - coef @ design.T) ** 2).sum(axis=1)
    if model == 'mix':
        coef = np.column_stack([coef, 1 - coef.sum(axis=1)])
        if len(refs) == 2:
            coef = coef[:, :1]
    return coef, ssr


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
@pytest.mark.parametrize('model', ['mix', 'scaled', 'offset'])
@pytest.mark.parametrize('k', [2, 4])
@pytest.mark.parametrize('masked', [False, True])
def test_matches_per_pixel_lstsq(backend, dtype, model, k, masked):
    refs = spectra(c=10, k=k)
    mask = None
    if masked:
        mask = np.ones(10, bool)
        mask[[1, 6]] = False
    y = image(refs, offset=5.0 * (model == 'offset')).astype(dtype)
    fit = fit_stack(y, *refs, model=model, mask=mask, backend=backend)
    coef, ssr = lstsq_fit(y, refs, model, mask)
    n = 10 - 2 * masked
    assert fit.coef.shape == (12, 10, coef.shape[1])
    tol = 1e-4 if dtype == np.float32 else 1e-9
    scale = np.abs(coef).max()
    assert_allclose(fit.coef.reshape(coef.shape), coef, atol=tol * scale)
    assert_allclose(fit.rmse.reshape(-1), np.sqrt(ssr / n),
                    rtol=10 * tol, atol=tol)  # fmt: skip


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
@pytest.mark.parametrize('model', ['mix', 'scaled', 'offset'])
@pytest.mark.parametrize('stderr', ['auto', 'ols'])
@pytest.mark.parametrize('k', [2, 3])
def test_same_as_generic_path(backend, monkeypatch, dtype, model, stderr, k):
    refs = spectra(c=8, k=k)
    y = image(refs, offset=3.0).astype(dtype)
    kwargs = dict(model=model, stderr=stderr, backend=backend)
    fit = fit_stack(y, *refs, **kwargs)
    assert_same(fit, generic(monkeypatch, y, *refs, **kwargs), RTOL[dtype])
    assert fit.coef.dtype == np.float64
    assert not fit.at_bound.any()


@pytest.mark.parametrize('noise', ['gaussian', 'poisson', 'huber'])
@pytest.mark.parametrize('masked', [False, True])
def test_every_noise_model_and_mask(backend, monkeypatch, noise, masked):
    # Poisson and Huber keep the generic path: both must agree anyway
    refs = spectra(c=12, k=3)
    mask = None if not masked else np.arange(12) % 4 != 1
    y = np.round(image(refs, noise=2.0)).astype(np.uint16)
    kwargs = dict(model='scaled', noise=noise, mask=mask, backend=backend)
    fit = fit_stack(y, *refs, **kwargs)
    assert_same(fit, generic(monkeypatch, y, *refs, **kwargs), 2e-4)


def test_numba_matches_numpy_reference():
    pytest.importorskip('numba')
    refs = np.random.default_rng(3).random((5, 16)) + 0.2
    y = image(refs, shape=(37, 11)).astype(np.float32)  # 407: short tail
    for model in ('mix', 'scaled', 'offset'):
        a = fit_stack(y, *refs, model=model, backend='numba')
        b = fit_stack(y, *refs, model=model, backend='numpy')
        assert_same(a, b, 2e-5)  # float32 sums, float64 reference


@pytest.mark.parametrize(
    'model, k, c',
    [('scaled', 4, 4), ('offset', 3, 4), ('mix', 3, 2), ('mix', 2, 1)],
)
def test_exact_fit_has_nan_errors(backend, model, k, c):
    # as many pixels as coefficients: no degrees of freedom for errors
    refs = 2.0 * np.eye(k, c) + 0.3
    if c == 1:
        refs = np.array([[2.0], [1.0]])
    if c == 2:
        refs = np.array([[3.0, 1.0], [1.0, 2.0], [2.0, 2.5]])
    y = image(refs, shape=(5, 3), noise=0.0)
    for stderr in ('auto', 'ols'):
        fit = fit_stack(y, *refs, model=model, stderr=stderr,
                        backend=backend)  # fmt: skip
        assert np.isfinite(fit.coef).all()
        assert np.isnan(fit.stderr).all() and np.isnan(fit.x_stderr).all()
        assert np.isnan(fit.fractions_stderr).all()
        assert_allclose(fit.rmse, 0.0, atol=1e-9 * np.abs(y).max())
    w, _ = fit._design.model.weights(fit.coef)
    offset = fit.coef[..., -1:] if model == 'offset' else 0.0
    assert_allclose(w @ refs + offset, y, rtol=1e-9, atol=1e-9)


def test_fewer_pixels_than_coefficients_raise():
    refs = spectra(c=3, k=4)
    with pytest.raises(ValueError, match='needs at least 4 fitted pixels'):
        fit_stack(image(refs), *refs, model='scaled')


def test_nan_policy(backend):
    refs = spectra(c=8, k=3)
    y = image(refs)
    y[2, 3, 5] = np.nan
    with pytest.raises(ValueError, match=r'slice \(2, 3\)'):
        fit_stack(y, *refs, model='scaled', backend=backend)
    fit = fit_stack(y, *refs, model='scaled', nan_policy='omit',
                    backend=backend)  # fmt: skip
    assert fit.n_omitted[2, 3] == 1 and fit.n_omitted.sum() == 1
    keep = np.arange(8) != 5
    coef, _ = lstsq_fit(y[2, 3], refs, 'scaled', keep)
    assert_allclose(fit.coef[2, 3], coef[0], rtol=1e-9)
    assert np.isfinite(fit.stderr).all()


@pytest.mark.parametrize('lead', [(), (7,), (3, 4, 5)])
def test_any_leading_shape(backend, monkeypatch, lead):
    refs = spectra(c=8, k=3)
    y = image(refs, shape=lead) if lead else image(refs, shape=(1,))[0]
    fit = fit_stack(y, *refs, model='offset', backend=backend)
    assert fit.x.shape == lead and fit.coef.shape == lead + (4,)
    assert_same(fit, generic(monkeypatch, y, *refs, model='offset',
                             backend=backend), 1e-9)  # fmt: skip
