"""K references: every model against per-slice float64 ``lstsq``, LAPACK
accuracy on ill-conditioned designs, the constraints against ``nnls`` and
an exact search, honest fractions, and the diagnostics for K."""

import itertools
import warnings

import numpy as np
import pytest
import scipy.linalg
from numpy.testing import assert_allclose, assert_array_equal
from scipy import ndimage, optimize

from napari_mixcoef import (
    CollinearityWarning,
    fit_stack,
    reference_diagnostics,
    residuals,
)
from oracle import assert_matches, lstsq_reference

SHAPE = (24, 20)


def references(k, shape=SHAPE, seed=0):
    """K positive references with different patterns (float64)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = []
    for i in range(k):
        wave = np.sin(xx / (2.0 + i) + i) ** 2 * np.cos(yy / (3.0 + 0.7 * i))
        out.append(200 + 150 * wave + 40 * rng.random(shape))
    return out


def fractions_on_simplex(rng, n, k, low=0.05):
    x = rng.dirichlet(np.full(k, 3.0), n)
    return (x + low) / (1 + k * low)


def stack_of(refs, coef, model, noise, rng):
    """Slices ``Σ w_k R_k (+ c)`` of the model's coefficients, plus noise."""
    refs = np.stack(refs)
    k = len(refs)
    w = coef[:, :k] if model != 'mix' else coef
    clean = np.tensordot(w, refs, axes=(1, 0))
    if model == 'offset':
        clean = clean + coef[:, k][:, None, None]
    return clean + rng.normal(0, noise, clean.shape)


# float32 work: products over a slice in float32 (runs of 512 pixels, then
# float64): coefficients within 3e-4 of their standard errors (seen: 1.5e-4
# for six references with an offset); float64 work to rounding
DTYPES = [(np.float64, 1e-8), (np.float32, 3e-4), (np.uint16, 3e-4)]


MODEL_K = [
    (model, k)
    for model in ('mix', 'scaled', 'offset')
    for k in (1, 2, 3, 4, 6)
    if not (model == 'mix' and k == 1)  # a mix needs two references
]


@pytest.mark.parametrize(('model', 'k'), MODEL_K)
@pytest.mark.parametrize(('dtype', 'rtol'), DTYPES)
@pytest.mark.parametrize('use_mask', [False, True])
def test_matches_per_slice_lstsq(backend, k, model, dtype, rtol, use_mask):
    rng = np.random.default_rng(k)
    refs = references(k, seed=k)
    if model == 'mix':
        coef = fractions_on_simplex(rng, 30, k)
    else:
        coef = rng.uniform(0.2, 1.0, (30, k + (model == 'offset')))
    stack = np.clip(stack_of(refs, coef, model, 4.0, rng), 0, None)
    stack = stack.astype(dtype)
    mask = None
    if use_mask:
        mask = np.ones(SHAPE, bool)
        mask[:5] = False
        mask[:, -3:] = False
    fit = fit_stack(
        stack, *refs, model=model, mask=mask, stderr='ols', backend=backend
    )
    if backend == 'numpy' and rtol > 1e-8:
        # numpy's float32 BLAS sums whole slices in float32; the compiled
        # kernels sum runs of 512 pixels, then in float64
        rtol *= 5
    assert fit.n_references == k
    assert fit.fractions.shape == (30, k)
    assert_matches(fit, lstsq_reference(stack, refs, model, mask), rtol)
    assert_allclose(fit.x, fit.fractions[:, 0])
    assert not fit.at_bound.any()


def test_names_follow_the_contract():
    refs = references(3)
    stack = stack_of(refs, np.full((4, 3), 1 / 3), 'mix', 1.0,
                     np.random.default_rng(0))  # fmt: skip
    names = {
        ('mix', 2): ('x',),
        ('scaled', 2): ('a', 'b'),
        ('offset', 2): ('a', 'b', 'c'),
        ('scaled', 1): ('a',),
        ('offset', 1): ('a', 'c'),
        ('mix', 3): ('x1', 'x2', 'x3'),
        ('scaled', 3): ('a1', 'a2', 'a3'),
        ('offset', 3): ('a1', 'a2', 'a3', 'c'),
    }
    for (model, k), want in names.items():
        fit = fit_stack(stack, *refs[:k], model=model)
        assert fit.names == want
        assert fit.coef.shape == (4, len(want))


def test_too_few_references_say_how_many():
    refs = references(2)
    stack = np.stack(refs)
    with pytest.raises(ValueError, match="'mix' model needs at least 2"):
        fit_stack(stack, refs[0])
    with pytest.raises(ValueError, match='at least one reference'):
        fit_stack(stack)


def test_a_reference_that_combines_others_is_collinear():
    a, b, c = references(3)
    with pytest.raises(ValueError, match='collinear'):
        fit_stack(np.stack([a, b]), a, b, 0.3 * a + 0.7 * b)
    with pytest.raises(ValueError, match='collinear'):
        fit_stack(np.stack([a, b]), a, b, c, 2 * a - b, model='scaled')


def test_a_nearly_redundant_reference_is_named():
    rng = np.random.default_rng(2)
    a, b, c = references(3)
    near = 0.5 * a + 0.5 * b + 0.3 * rng.standard_normal(SHAPE)
    stack = stack_of([a, b, near], np.full((5, 3), 1 / 3), 'mix', 1.0, rng)
    with pytest.warns(CollinearityWarning, match=r'^ref3 is nearly a comb'):
        fit = fit_stack(stack, a, b, near)
    assert np.isfinite(fit.fractions).all()


def test_unknown_constraint():
    a, b = references(2)
    with pytest.raises(ValueError, match="unknown constraint 'positive'"):
        fit_stack(np.stack([a, b]), a, b, constraint='positive')


# -- accuracy by construction ---------------------------------------------

LONGLEY = np.array([
    [60323, 83.0, 234289, 2356, 1590, 107608, 1947],
    [61122, 88.5, 259426, 2325, 1456, 108632, 1948],
    [60171, 88.2, 258054, 3682, 1616, 109773, 1949],
    [61187, 89.5, 284599, 3351, 1650, 110929, 1950],
    [63221, 96.2, 328975, 2099, 3099, 112075, 1951],
    [63639, 98.1, 346999, 1932, 3594, 113270, 1952],
    [64989, 99.0, 365385, 1870, 3547, 115094, 1953],
    [63761, 100.0, 363112, 3578, 3350, 116219, 1954],
    [66019, 101.2, 397469, 2904, 3048, 117388, 1955],
    [67857, 104.6, 419180, 2822, 2857, 118734, 1956],
    [68169, 108.4, 442769, 2936, 2798, 120445, 1957],
    [66513, 110.8, 444546, 4681, 2637, 121950, 1958],
    [68655, 112.6, 482704, 3813, 2552, 123366, 1959],
    [69564, 114.2, 502601, 3931, 2514, 125368, 1960],
    [69331, 115.7, 518173, 4806, 2572, 127852, 1961],
    [70551, 116.9, 554894, 4007, 2827, 130081, 1962],
])  # fmt: skip
#: NIST StRD certified values for Longley: b1 … b6, then the intercept b0,
#: their standard deviations, the residual standard deviation and R².
LONGLEY_COEF = [15.0618722713733, -0.358191792925910e-01, -2.02022980381683,
                -1.03322686717359, -0.511041056535807e-01, 1829.15146461355,
                -3482258.63459582]  # fmt: skip
LONGLEY_SD = [84.9149257747669, 0.334910077722432e-01, 0.488399681651699,
              0.214274163161675, 0.226073200069370, 455.478499142212,
              890420.383607373]  # fmt: skip


def test_longley_to_nists_certified_digits(backend):
    """A design whose Gram matrix has a condition number ~1e9."""
    y, refs = LONGLEY[:, 0], list(LONGLEY[:, 1:].T)
    gram = np.column_stack([*refs, np.ones(16)])
    assert np.linalg.cond(gram.T @ gram) > 1e9
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', CollinearityWarning)
        fit = fit_stack(y, *refs, model='offset', stderr='ols',
                        backend=backend)  # fmt: skip
    assert_allclose(fit.coef, LONGLEY_COEF, rtol=1e-9)
    assert_allclose(fit.stderr, LONGLEY_SD, rtol=1e-9)
    residual_sd = fit.rmse * np.sqrt(16 / (16 - 7))
    assert_allclose(residual_sd, 304.854073561965, rtol=1e-9)
    assert_allclose(fit.r2, 0.995479004577296, rtol=1e-12)


def test_polynomial_references_at_lapack_accuracy(backend):
    """x, x², …, x⁵ on 21 points: normal equations lose half the digits."""
    rng = np.random.default_rng(5)
    t = np.linspace(1.0, 3.0, 21)
    refs = [t**p for p in range(1, 6)]
    truth = rng.normal(0, 1, (40, 6))
    design = np.column_stack([*refs, np.ones(21)])
    stack = truth @ design.T + rng.normal(0, 1e-3, (40, 21))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', CollinearityWarning)
        fit = fit_stack(stack, *refs, model='offset', stderr='ols',
                        backend=backend)  # fmt: skip
    want = np.stack([scipy.linalg.lstsq(design, y)[0] for y in stack])
    normal = np.linalg.solve(design.T @ design, design.T @ stack.T).T
    err = np.abs(fit.coef - want).max() / np.abs(want).max()
    err_normal = np.abs(normal - want).max() / np.abs(want).max()
    cond = np.linalg.cond(design)
    assert cond > 1e5
    # within a few ulps of cond(D) of lstsq; the normal equations are off
    # by ~cond(D)² ulps
    assert err < 100 * np.finfo(float).eps * cond, err
    assert err_normal > 100 * err


# -- constraints -------------------------------------------------------------


def exact_fcls(design, target, k):
    """Fully constrained least squares by visiting every face (independent).

    Minimise ‖target − design @ x‖ over x ≥ 0, Σx = 1 (design: K columns).
    """
    best, best_x = np.inf, None
    for size in range(1, k + 1):
        for face in itertools.combinations(range(k), size):
            cols = design[:, face]
            # x on the face: equality-constrained least squares via the
            # last column eliminated
            if size == 1:
                x_face = np.ones(1)
            else:
                d = cols[:, :-1] - cols[:, -1:]
                th, *_ = np.linalg.lstsq(d, target - cols[:, -1], rcond=None)
                x_face = np.append(th, 1 - th.sum())
            if (x_face < -1e-12).any():
                continue
            r = target - cols @ x_face
            if r @ r < best:
                best = r @ r
                best_x = np.zeros(k)
                best_x[list(face)] = x_face
    return best_x


def test_nonneg_scaled_is_nnls(backend):
    rng = np.random.default_rng(6)
    refs = references(4, seed=3)
    coef = rng.uniform(-0.3, 1.0, (60, 4))  # many below zero
    stack = stack_of(refs, coef, 'scaled', 3.0, rng)
    fit = fit_stack(stack, *refs, model='scaled', constraint='nonneg',
                    stderr='ols', backend=backend)  # fmt: skip
    design = np.stack(refs).reshape(4, -1).T
    want = np.stack([optimize.nnls(design, y.reshape(-1))[0] for y in stack])
    assert_allclose(fit.coef, want, rtol=1e-7, atol=1e-9)
    # the same constraints active, and exactly zero there
    assert_array_equal(fit.coef == 0, want == 0)
    assert_array_equal(fit.at_bound, (want == 0).any(axis=1))
    assert np.isnan(fit.stderr[want == 0]).all()
    assert np.isfinite(fit.stderr[want > 0]).all()
    assert fit.at_bound.any() and not fit.at_bound.all()


def test_fully_constrained_mix_is_exact(backend):
    rng = np.random.default_rng(7)
    refs = references(4, seed=4)
    x = rng.dirichlet(np.ones(4) * 0.8, 50)  # fractions near the faces
    x[:10, 2] = 0.0
    x[:10] /= x[:10].sum(1, keepdims=True)
    stack = stack_of(refs, x, 'mix', 6.0, rng)
    fit = fit_stack(stack, *refs, constraint='nonneg', stderr='ols',
                    backend=backend)  # fmt: skip
    design = np.stack(refs).reshape(4, -1).T
    want = np.stack([exact_fcls(design, y.reshape(-1), 4) for y in stack])
    assert_allclose(fit.fractions, want, rtol=0, atol=1e-9)
    assert_array_equal(fit.fractions == 0, want == 0)
    assert_allclose(fit.fractions.sum(axis=1), 1.0, rtol=1e-12)
    # nnls with a heavily weighted sum-to-one row agrees too
    heavy = 1e6 * np.abs(design).max()
    for y, f in zip(stack[:5], fit.fractions[:5]):
        aug = np.vstack([design, heavy * np.ones(4)])
        got, _ = optimize.nnls(aug, np.append(y.reshape(-1), heavy))
        assert_allclose(got, f, atol=1e-6)
    held = fit.fractions == 0
    assert held.any()
    assert np.isnan(fit.fractions_stderr[held]).all()
    assert np.isfinite(fit.fractions_stderr[~held]).all()
    # unconstrained fits carry at_bound too, all False
    free = fit_stack(stack, *refs, backend=backend)
    assert free.at_bound.dtype == bool and not free.at_bound.any()
    assert (free.fractions < 0).any()


@pytest.mark.parametrize('noise', ['poisson', 'huber'])
def test_constraints_inside_the_irls(backend, noise):
    rng = np.random.default_rng(8)
    refs = references(3, seed=5)
    x = rng.dirichlet(np.ones(3), 30)
    x[:8, 1] = 0.0
    x[:8] /= x[:8].sum(1, keepdims=True)
    photons = np.tensordot(x, np.stack(refs), axes=(1, 0))
    stack = rng.poisson(photons).astype(np.float64)
    fit = fit_stack(stack, *refs, constraint='nonneg', noise=noise,
                    backend=backend)  # fmt: skip
    assert (fit.fractions >= 0).all()
    assert_allclose(fit.fractions.sum(1), 1.0, rtol=1e-12)
    assert fit.at_bound[:8].mean() > 0.5
    free = fit_stack(stack, *refs, noise=noise, backend=backend)
    inside = ~fit.at_bound
    # where no constraint is active the constrained fit is the free one
    assert_allclose(fit.fractions[inside], free.fractions[inside],
                    rtol=1e-6, atol=1e-9)  # fmt: skip


# -- honest fractions ---------------------------------------------------------


def coverage(fit, x):
    return np.mean(np.abs(fit.fractions - x) <= 1.96 * fit.fractions_stderr)


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['white', 'poisson', 'correlated'])
def test_three_fractions_cover_their_truth(kind):
    seed = {'white': 1, 'poisson': 2, 'correlated': 3}[kind]
    rng = np.random.default_rng(seed)
    shape = (32, 32)
    refs = references(3, shape=shape, seed=9)
    x = fractions_on_simplex(rng, 3000, 3, low=0.1)
    clean = np.tensordot(x, np.stack(refs), axes=(1, 0))
    if kind == 'white':
        stack = clean + rng.normal(0, 12.0, clean.shape)
    elif kind == 'poisson':
        stack = rng.poisson(clean).astype(np.float64)
    else:
        pad = 8
        white = rng.normal(0, 30.0, (len(x), shape[0] + 2 * pad,
                                     shape[1] + 2 * pad))  # fmt: skip
        blurred = ndimage.gaussian_filter(white, sigma=(0, 1.0, 1.0))
        stack = clean + blurred[:, pad:-pad, pad:-pad]
    fit = fit_stack(stack, *refs)
    assert 0.93 <= coverage(fit, x) <= 0.97, coverage(fit, x)


# -- tables, residuals, diagnostics -------------------------------------------


def test_csv_columns_for_three_references(tmp_path):
    rng = np.random.default_rng(10)
    refs = references(3)
    stack = stack_of(refs, fractions_on_simplex(rng, 6, 3), 'mix', 1.0, rng)
    fit = fit_stack(stack, *refs, constraint='nonneg')
    header = fit.table().keys()
    assert list(header) == [
        'index_0', 'x1', 'x1_stderr', 'x2', 'x2_stderr', 'x3', 'x3_stderr',
        'r2', 'rmse', 'at_bound',
    ]  # fmt: skip
    scaled = fit_stack(stack, *refs, model='offset')
    assert list(scaled.table().keys()) == [
        'index_0', 'x1', 'x1_stderr', 'x2', 'x2_stderr', 'x3', 'x3_stderr',
        'a1', 'a1_stderr', 'a2', 'a2_stderr', 'a3', 'a3_stderr',
        'c', 'c_stderr', 'r2', 'rmse',
    ]  # fmt: skip
    path = tmp_path / 'k3.csv'
    scaled.to_csv(path)
    table = np.loadtxt(path, delimiter=',', skiprows=1)
    assert_allclose(table[:, 1], scaled.fractions[:, 0], rtol=1e-9)


def test_residuals_with_the_fit_last(backend):
    rng = np.random.default_rng(11)
    refs = references(3)
    stack = stack_of(refs, fractions_on_simplex(rng, 5, 3), 'mix', 2.0, rng)
    fit = fit_stack(stack, *refs, backend=backend)
    res = np.asarray(residuals(stack, *refs, fit))
    model = np.tensordot(fit.fractions, np.stack(refs), axes=(1, 0))
    assert_allclose(res, stack - model, atol=1e-6)
    assert_allclose(np.asarray(fit.residuals(stack)), res)
    with pytest.raises(ValueError, match='references differ'):
        residuals(stack, *refs[:2], fit)


def test_diagnostics_for_k_references():
    a, b, c = references(3)
    d = reference_diagnostics(a, b, c)
    flat = np.stack([a, b, c]).reshape(3, -1)
    for i in range(3):
        others = np.delete(flat, i, 0)
        base = others[-1]
        diffs = (others[:-1] - base).T
        coef, *_ = np.linalg.lstsq(diffs, flat[i] - base, rcond=None)
        dist = np.linalg.norm(flat[i] - base - diffs @ coef)
        spread = np.linalg.norm(flat[i] - others.mean(0))
        assert_allclose(d['unique_energy_fraction'][i], (dist / spread) ** 2)
        assert_allclose(d['fraction_stderr_per_noise'][i], 1 / dist)
    unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    assert_allclose(d['condition_number'], np.linalg.cond(unit.T))
    assert d['condition_number'] >= 1 and np.isfinite(d['condition_number'])
    two = reference_diagnostics(a, b)
    assert_allclose(two['unique_energy_fraction'], [1.0, 1.0])
    assert_allclose(two['fraction_stderr_per_noise'][0],
                    two['x_stderr_per_noise'])  # fmt: skip
    near = reference_diagnostics(a, b, 0.5 * a + 0.5 * b + 1e-3 * c)
    assert near['unique_energy_fraction'].min() < 1e-4
    assert near['nearly_collinear']


def test_three_states_sample():
    from napari_mixcoef.sample_data import make_three_states

    stack, refs, truth = make_three_states()
    assert stack.dtype == np.uint16 and stack.shape == (300, 128, 128)
    assert len(refs) == 3 and truth.shape == (300, 3)
    assert_allclose(truth.sum(1), 1.0)
    assert (truth == 0).any(axis=0).all()  # each state vanishes somewhere
    assert np.abs(np.diff(truth, axis=0)).max() < 0.05  # smoothly
    fit = fit_stack(stack, *refs, noise='poisson', camera_offset=100.0,
                    constraint='nonneg')  # fmt: skip
    assert np.all(np.abs(fit.fractions - truth) < 0.01)
    assert fit.at_bound.any()


@pytest.mark.slow
def test_sampled_meat_keeps_errors_honest():
    # slices of 96 × 96: robust errors of two or more coefficients sum the
    # meat over a sample of the pixels; under correlated noise the
    # intervals of every fraction still cover
    from napari_mixcoef.model.design import MEAT_PIXELS

    rng = np.random.default_rng(12)
    shape = (96, 96)
    assert shape[0] * shape[1] >= 2 * MEAT_PIXELS
    refs = references(3, shape=shape, seed=13)
    x = fractions_on_simplex(rng, 1500, 3, low=0.1)
    clean = np.tensordot(x, np.stack(refs), axes=(1, 0))
    pad = 6
    size = (len(x), shape[0] + 2 * pad, shape[1] + 2 * pad)
    white = rng.normal(0, 60.0, size).astype(np.float32)
    blurred = ndimage.gaussian_filter(white, sigma=(0, 1.0, 1.0))
    stack = (clean + blurred[:, pad:-pad, pad:-pad]).astype(np.float32)
    fit = fit_stack(stack, *refs)
    assert fit._design.meat is not None  # the sample was used
    assert 0.93 <= coverage(fit, x) <= 0.97, coverage(fit, x)
    # within a few per cent of the errors from every pixel (numpy, one
    # slice at a time: the sample is drawn for whole images only)
    spread = np.std(fit.fractions - x, axis=0)
    reported = np.sqrt(np.mean(fit.fractions_stderr**2, axis=0))
    assert_allclose(reported, spread, rtol=0.06)
