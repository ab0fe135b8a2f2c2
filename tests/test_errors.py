"""Bad input raises, says what is wrong and what to do, and changes nothing."""

import warnings

import numpy as np
import pytest

from napari_mixcoef import CollinearityWarning, fit_stack

from conftest import make_stack


@pytest.fixture
def data():
    stack, a, b, _ = make_stack(lead=(6,))
    return stack, a, b


def check_untouched(call, *arrays):
    before = [np.array(v, copy=True) for v in arrays]
    with pytest.raises(Exception) as info:
        call()
    for old, new in zip(before, arrays):
        assert old.tobytes() == np.asarray(new).tobytes()
    return info


def test_stack_shape_mismatch_shows_shapes(data):
    stack, a, b = data
    with pytest.raises(ValueError, match=r'\(6, 24, 20\).*\(20, 24\)'):
        fit_stack(stack, a.T, b.T)
    with pytest.raises(ValueError, match='last 2 axes'):
        fit_stack(stack[0, 0], a, b)


def test_reference_shapes_differ(data):
    stack, a, b = data
    with pytest.raises(ValueError, match=r'\(24, 20\).*\(24, 19\)'):
        fit_stack(stack, a, b[:, :19])


def test_mask_shape(data):
    stack, a, b = data
    with pytest.raises(ValueError, match='mask has shape'):
        fit_stack(stack, a, b, mask=np.ones((3, 3), bool))


@pytest.mark.parametrize('model', ['mix', 'scaled', 'offset'])
@pytest.mark.parametrize('kind', ['identical', 'multiple', 'zero'])
def test_collinear_references(data, model, kind):
    stack, a, b = data
    other = {
        'identical': a.copy(),
        'multiple': 2.5 * a,
        'zero': np.zeros_like(a),
    }[kind]
    info = check_untouched(
        lambda: fit_stack(stack, a, other, model=model), stack, a, other
    )
    assert info.type is ValueError
    assert 'collinear' in str(info.value)


def test_offset_model_rejects_references_differing_by_a_constant(data):
    stack, a, b = data
    with pytest.raises(ValueError, match='collinear.*model="scaled"'):
        fit_stack(stack, a, 0.5 * a + 100, model='offset')
    # the scaled model can still tell them apart (by the offset), but says
    # that they are nearly collinear
    with pytest.warns(CollinearityWarning, match='nearly collinear'):
        fit = fit_stack(stack, a, 0.5 * a + 100, model='scaled')
    assert np.isfinite(fit.x).all()


@pytest.mark.parametrize('where', ['ref1', 'ref2', 'stack'])
@pytest.mark.parametrize('value', [np.nan, np.inf, -np.inf])
def test_nan_or_inf(data, where, value):
    stack, a, b = data
    arrays = {'stack': stack.copy(), 'ref1': a.copy(), 'ref2': b.copy()}
    arrays[where][..., 3, 4] = value
    info = check_untouched(
        lambda: fit_stack(arrays['stack'], arrays['ref1'], arrays['ref2']),
        *arrays.values(),
    )
    assert info.type is ValueError
    assert 'NaN' in str(info.value)
    assert 'mask' in str(info.value)
    if where == 'stack':
        assert '(0,)' in str(info.value)  # names the slice


def test_nan_outside_the_mask_is_fine(data):
    stack, a, b = data
    stack, a = stack.copy(), a.copy()
    stack[2, 0, 0] = np.nan
    a[0, 0] = np.inf
    mask = np.ones(a.shape, bool)
    mask[0, 0] = False
    fit = fit_stack(stack, a, b, mask=mask)
    assert np.isfinite(fit.x).all()


def test_nan_in_a_later_chunk_names_that_slice(data):
    stack, a, b = data
    stack = stack.copy()
    stack[4, 10, 10] = np.nan
    with pytest.raises(ValueError, match=r'slice \(4,\) contains NaN'):
        fit_stack(stack, a, b, chunk_bytes=a.nbytes)


@pytest.mark.parametrize(
    ('model', 'n_true'), [('mix', 0), ('scaled', 0), ('scaled', 1),
                          ('offset', 2)],
)  # fmt: skip
def test_mask_with_too_few_pixels(data, model, n_true):
    stack, a, b = data
    mask = np.zeros(a.shape, bool)
    mask.flat[:n_true] = True
    with pytest.raises(ValueError, match='mask'):
        fit_stack(stack, a, b, model=model, mask=mask)


@pytest.mark.parametrize('noise', ['gaussian', 'poisson', 'huber'])
@pytest.mark.parametrize('stderr', ['auto', 'ols'])
@pytest.mark.parametrize(('model', 'k'), [('mix', 1), ('scaled', 2),
                                          ('offset', 3)])  # fmt: skip
def test_as_many_pixels_as_coefficients_is_an_exact_fit(
    data, model, k, noise, stderr
):
    # no degrees of freedom left: the fit is exact, its errors NaN
    stack, a, b = data
    mask = np.zeros(a.shape, bool)
    mask.flat[[5, 77, 200][:k]] = True
    with warnings.catch_warnings():  # two or three pixels: nearly alike
        warnings.simplefilter('ignore', CollinearityWarning)
        fit = fit_stack(
            stack, a, b, model=model, mask=mask, noise=noise, stderr=stderr
        )
    assert np.isfinite(fit.coef).all()
    assert np.isnan(fit.stderr).all() and np.isnan(fit.x_stderr).all()
    assert np.allclose(fit.rmse, 0, atol=1e-6 * np.abs(stack).max())


def test_empty_mask_says_mask(data):
    stack, a, b = data
    with pytest.raises(ValueError, match='mask selects no pixel'):
        fit_stack(stack, a, b, mask=np.zeros(a.shape, bool))


def test_unknown_model(data):
    stack, a, b = data
    with pytest.raises(ValueError, match="unknown model 'linear'.*'mix'"):
        fit_stack(stack, a, b, model='linear')


@pytest.mark.parametrize('dtype', [np.complex64, bool, object])
@pytest.mark.parametrize('where', ['stack', 'ref1'])
def test_bad_dtypes(data, dtype, where):
    stack, a, b = data
    arrays = {'stack': stack, 'ref1': a}
    arrays[where] = arrays[where].astype(dtype)
    with pytest.raises(TypeError, match=f'{where} has .*dtype'):
        fit_stack(arrays['stack'], arrays['ref1'], b)
