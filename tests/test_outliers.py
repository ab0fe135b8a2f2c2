import numpy as np
import pytest

from napari_mixcoef import fit_stack
from napari_mixcoef.outliers import find_outliers


def _smooth(n, seed=0, noise=0.003):
    """A smooth x curve with noise, its stderr and a typical R²."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, n)
    x = 0.5 + 0.3 * np.sin(2 * np.pi * 1.5 * t) + rng.normal(0, noise, n)
    x_stderr = np.full(n, noise)
    r2 = 0.998 + rng.normal(0, 3e-4, n)
    return x, x_stderr, r2


def test_clean_series_has_no_outliers():
    # 20 × 2000 noisy slices on a smooth curve: none beyond 5 robust SDs.
    flags = [find_outliers(*_smooth(2000, seed)) for seed in range(20)]
    assert np.count_nonzero(flags) == 0


def test_jump_in_x_and_low_r2_are_flagged():
    x, x_stderr, r2 = _smooth(300)
    x[100] += 0.05  # ~17 standard errors
    r2[200] = 0.95  # far below 0.998 ± 0.0003
    flags = find_outliers(x, x_stderr, r2)
    np.testing.assert_array_equal(np.flatnonzero(flags), [100, 200])
    assert flags.dtype == np.bool_
    assert flags.shape == (300,)


def test_adjacent_outliers_do_not_hide_each_other():
    x, x_stderr, r2 = _smooth(300)
    x[150:152] += 0.05
    flags = find_outliers(x, x_stderr, r2)
    np.testing.assert_array_equal(np.flatnonzero(flags), [150, 151])


def test_steep_drift_does_not_flag_the_ends():
    # A steady drift of 10 standard errors per slice: the running median of
    # the neighbours is detrended, so neither end is flagged.
    rng = np.random.default_rng(1)
    n = 30
    x = np.linspace(0.0, 0.9, n) + rng.normal(0, 0.003, n)
    assert not find_outliers(x, np.full(n, 0.003), np.full(n, 0.99)).any()


def test_ends_are_checked_too():
    x, x_stderr, r2 = _smooth(100)
    x[0] -= 0.05
    x[-1] += 0.05
    flags = find_outliers(x, x_stderr, r2)
    np.testing.assert_array_equal(np.flatnonzero(flags), [0, 99])


def test_large_stderr_protects_a_noisy_slice():
    x, x_stderr, r2 = _smooth(300)
    x[100] += 0.05
    x_stderr[100] = 0.05  # the fit knows this slice is uncertain
    assert not find_outliers(x, x_stderr, r2)[100]


def test_noise_free_data_does_not_flag_rounding():
    n = 50
    x = np.linspace(0.1, 0.9, n)
    flags = find_outliers(x, np.zeros(n), np.ones(n))
    assert not flags.any()


@pytest.mark.parametrize('window', [5, 7, 11])
def test_window(window):
    x, x_stderr, r2 = _smooth(200)
    x[50] += 0.05
    flags = find_outliers(x, x_stderr, r2, window=window)
    np.testing.assert_array_equal(np.flatnonzero(flags), [50])


def test_thresholds():
    x, x_stderr, r2 = _smooth(300)
    x[100] += 0.02  # ~6.7 standard errors
    assert find_outliers(x, x_stderr, r2, z=5)[100]
    assert not find_outliers(x, x_stderr, r2, z=10)[100]
    r2[200] = 0.996  # ~6.7 robust SDs below the median
    assert find_outliers(x, x_stderr, r2, r2_drop=5)[200]
    assert not find_outliers(x, x_stderr, r2, r2_drop=10)[200]


def test_non_finite_slices_are_flagged_and_ignored():
    x, x_stderr, r2 = _smooth(100)
    x[10] = np.nan
    x[20] = np.inf
    r2[30] = np.nan
    x_stderr[40] = np.nan  # no stderr: only the MAD scale applies
    x_stderr[50] = np.inf
    x[50] += 1.0  # infinitely uncertain: not an outlier
    flags = find_outliers(x, x_stderr, r2)
    np.testing.assert_array_equal(np.flatnonzero(flags), [10, 20, 30])


@pytest.mark.parametrize('n', [0, 1, 2])
def test_tiny_inputs(n):
    x = np.arange(n) * 10.0
    flags = find_outliers(x, np.zeros(n), np.linspace(0, 1, n))
    assert flags.shape == (n,)
    assert not flags.any()


def test_tiny_input_flags_only_non_finite():
    flags = find_outliers([0.5, np.nan], [0.01, 0.01], [0.9, 0.9])
    np.testing.assert_array_equal(flags, [False, True])


def test_three_slices():
    flags = find_outliers([0.5, 0.5, 0.5], [0.01] * 3, [0.99] * 3)
    np.testing.assert_array_equal(flags, [False, False, False])


def test_accepts_lists_and_integer_input():
    flags = find_outliers([1, 1, 1, 9, 1, 1, 1], [0] * 7, [1] * 7)
    np.testing.assert_array_equal(np.flatnonzero(flags), [3])


def test_inputs_are_not_modified():
    x, x_stderr, r2 = _smooth(50)
    x[5] = np.nan
    copies = [a.copy() for a in (x, x_stderr, r2)]
    find_outliers(x, x_stderr, r2)
    for a, b in zip((x, x_stderr, r2), copies):
        np.testing.assert_array_equal(a, b)


def test_real_fit_with_injected_outliers():
    rng = np.random.default_rng(0)
    a, b = rng.random((2, 32, 32))
    xs = 0.5 + 0.3 * np.sin(np.linspace(0, 2 * np.pi, 300))
    stack = xs[:, None, None] * a + (1 - xs[:, None, None]) * b
    stack += rng.normal(0, 0.02, stack.shape)
    stack[100] = 0.2 * a + 0.8 * b + rng.normal(0, 0.02, (32, 32))
    stack[200] += rng.normal(0, 0.3, (32, 32))
    fit = fit_stack(stack, a, b)
    flags = find_outliers(fit.x, fit.x_stderr, fit.r2)
    np.testing.assert_array_equal(np.flatnonzero(flags), [100, 200])


@pytest.mark.parametrize(
    ('args', 'match'),
    [
        (([1.0, 2.0], [0.0], [1.0, 1.0]), 'shapes'),
        ((np.zeros((3, 3)),) * 3, '1-D arrays'),
    ],
)
def test_bad_shapes(args, match):
    with pytest.raises(ValueError, match=match):
        find_outliers(*args)


@pytest.mark.parametrize('window', [1, 3, 6, 7.0, True, None])
def test_bad_window(window):
    with pytest.raises(ValueError, match='odd integer >= 5'):
        find_outliers(*_smooth(20), window=window)


@pytest.mark.parametrize('name', ['r2_drop', 'z'])
@pytest.mark.parametrize('value', [0, -1.0, np.nan])
def test_bad_thresholds(name, value):
    with pytest.raises(ValueError, match=f'{name} is'):
        find_outliers(*_smooth(20), **{name: value})
