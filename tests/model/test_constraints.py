"""The constrained quadratic programs against an exhaustive search."""

import itertools

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy import optimize

from napari_mixcoef.model.constraints import solve


def brute_force(b, bread, c, d):
    """Minimise ½zᵀBz − bᵀz with Cz ≥ d: every face, scipy's SLSQP-free."""
    k = len(b)
    best, best_z = np.inf, None
    for size in range(len(d) + 1):
        for face in itertools.combinations(range(len(d)), size):
            ca, da = c[list(face)], d[list(face)]
            kkt = np.block([[bread, -ca.T], [ca, np.zeros((size, size))]])
            rhs = np.concatenate([b, da])
            try:
                sol = np.linalg.solve(kkt, rhs)
            except np.linalg.LinAlgError:
                continue
            z = sol[:k]
            if np.all(c @ z >= d - 1e-9):
                value = 0.5 * z @ bread @ z - b @ z
                if value < best - 1e-12:
                    best, best_z = value, z
    return best_z


@pytest.mark.parametrize('k', [1, 2, 3, 4])
@pytest.mark.parametrize('weighted', [False, True])
def test_matches_an_exhaustive_search(k, weighted):
    rng = np.random.default_rng(k + 10 * weighted)
    n_con = k + 1
    c = rng.normal(size=(n_con, k))
    d = rng.normal(size=n_con) - 0.5
    b = rng.normal(size=(200, k)) * 2
    bread = None
    if weighted:
        m = rng.normal(size=(200, k, k))
        bread = m @ np.swapaxes(m, 1, 2) + 0.5 * np.eye(k)
    z, active = solve(b, c, d, bread)
    for i in range(len(b)):
        bi = np.eye(k) if bread is None else bread[i]
        want = brute_force(b[i], bi, c, d)
        assert_allclose(z[i], want, atol=1e-9)
        slack = c @ z[i] - d
        assert_allclose(slack[active[i]], 0.0, atol=1e-9)
        assert np.all(slack[~active[i]] > -1e-9)


def test_nonneg_least_squares_is_nnls():
    rng = np.random.default_rng(3)
    design = rng.random((40, 4))
    q, tri = np.linalg.qr(design)
    y = rng.normal(size=(50, 40))
    g = y @ q  # the basis coordinates of each y
    # a = T⁻¹ z ≥ 0  ⇔  C z ≥ 0 with C = T⁻¹
    z, active = solve(g, np.linalg.inv(tri), np.zeros(4))
    a = np.linalg.solve(tri, z.T).T
    want = np.stack([optimize.nnls(design, yi)[0] for yi in y])
    assert_allclose(a, want, atol=1e-10)
    assert np.array_equal(active, want == 0)


def test_non_finite_rows_stay_nan():
    z, active = solve(
        np.array([[np.nan, 1.0], [0.5, 0.5]]), np.eye(2), np.zeros(2)
    )
    assert np.isnan(z[0]).all() and not active[0].any()
    assert_allclose(z[1], [0.5, 0.5])
