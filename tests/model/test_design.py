"""The shared design: orthonormal basis, triangular factor, meat sample."""

import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose

from napari_mixcoef import CollinearityWarning
from napari_mixcoef.engine.fit import sample_terms, sandwich_rows
from napari_mixcoef.model.design import MEAT_PIXELS, make_design, make_view
from napari_mixcoef.model.references import checked_references


def refs_of(k, shape, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.random(shape) * 100 + 50 + 30 * i for i in range(k)]


@pytest.mark.parametrize('model', ['mix', 'scaled', 'offset'])
@pytest.mark.parametrize('k', [2, 3, 5])
def test_basis_is_orthonormal_and_spans_the_design(model, k):
    refs = refs_of(k, (30, 40))
    mask = np.ones((30, 40), bool)
    mask[:4] = False
    with warnings.catch_warnings():  # random patterns: nearly alike
        warnings.simplefilter('ignore', CollinearityWarning)
        design = make_design(
            checked_references(refs, mask), model, np.float64
        )
    q = design.basis[:, mask.reshape(-1)]
    assert_allclose(q @ q.T, np.eye(design.k), atol=1e-13)
    assert not design.basis[:, ~mask.reshape(-1)].any()
    fitted = np.stack(refs)[:, mask]
    columns = design.model.design(fitted)  # (k, n)
    # D = Q_k T with T upper triangular and a positive diagonal
    assert_allclose(design.tri.T @ q, columns, rtol=1e-12, atol=1e-9)
    assert np.all(np.diag(design.tri) > 0)
    assert_allclose(np.triu(design.tri), design.tri)


def test_centred_total_from_two_sums():
    refs = refs_of(3, (20, 20), seed=1)
    design = make_design(checked_references(refs), 'mix', np.float64)
    rng = np.random.default_rng(2)
    y = rng.random((5, 400)) * 300
    yc = y - design.centre
    s, h, yy = yc.sum(1), yc @ design.spread, (yc * yc).sum(1)
    want = ((y - y.mean(1, keepdims=True)) ** 2).sum(1)
    assert_allclose(design.centred_total(s, h, yy), want, rtol=1e-12)


def test_meat_sample_is_calibrated_to_every_pixel():
    # the sample's weighted term sums equal the sums over all fitted pixels
    shape = (128, 160)
    assert shape[0] * shape[1] >= 2 * MEAT_PIXELS
    refs = refs_of(3, shape, seed=3)
    mask = np.ones(shape, bool)
    mask[20:40, 50:90] = False
    design = make_design(checked_references(refs, mask), 'mix', np.float32)
    assert design.meat is not None
    assert not design.meat[~mask.reshape(-1)].any()
    assert abs(design.meat.sum() - MEAT_PIXELS) < 0.2 * MEAT_PIXELS
    rho = np.zeros((3, 3))
    rho[1] = [0.3, 1.0, 0.3]
    view = make_view(design, terms=sandwich_rows(design, rho))
    every = view.terms[:, mask.reshape(-1)].astype(np.float64).sum(axis=1)
    weighted = view.meat_terms.astype(np.float64).sum(axis=1)
    assert_allclose(weighted, every, rtol=1e-5)
    # made from the sample's pixels alone, the same calibrated terms (the
    # full terms are rounded to float32 before they are picked)
    alone = sample_terms(design, rho).astype(np.float64)
    scale = np.abs(view.meat_terms).max()
    assert_allclose(alone, view.meat_terms, rtol=1e-4, atol=1e-6 * scale)
    assert_allclose(alone.sum(axis=1), every, rtol=1e-5)
    # the sample is the same in every fit of this design
    again = make_design(checked_references(refs, mask), 'mix', np.float32)
    assert np.array_equal(again.meat, design.meat)


def test_one_coefficient_and_small_slices_use_every_pixel():
    refs = refs_of(2, (128, 160))
    design = make_design(checked_references(refs), 'mix', np.float32)
    assert design.meat is None and design.meat_scale == 1.0
    small = make_design(
        checked_references(refs_of(3, (64, 64))), 'mix', np.float32
    )
    assert small.meat is None
