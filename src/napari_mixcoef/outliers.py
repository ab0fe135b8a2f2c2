"""Flag slices whose fit looks wrong: robust, numpy only."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ['find_outliers']

# MAD × this is the standard deviation of normally distributed data.
_MAD_TO_SD = 1.482602218505602


def _robust_sd(values: NDArray[np.float64]) -> float:
    """Normal-consistent MAD of the finite `values` (0 if there are none)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0
    return _MAD_TO_SD * float(np.median(np.abs(finite - np.median(finite))))


def _nanmedian_last(a: NDArray[np.float64]) -> NDArray[np.float64]:
    """Median of the finite values along the last axis; NaN if none.

    Unlike `numpy.nanmedian`, it does not warn on all-NaN rows.
    """
    shape = a.shape[:-1]
    a = a.reshape(-1, a.shape[-1])
    finite = np.isfinite(a)
    ordered = np.sort(np.where(finite, a, np.nan), axis=1)  # NaN last
    count = finite.sum(axis=1)
    rows = np.arange(a.shape[0])
    lo = ordered[rows, np.maximum(count - 1, 0) // 2]
    hi = ordered[rows, np.maximum(count, 1) // 2]
    return np.where(count > 0, 0.5 * (lo + hi), np.nan).reshape(shape)


def _neighbour_prediction(
    x: NDArray[np.float64], half: int
) -> NDArray[np.float64]:
    """Robust value of each ``x[i]`` predicted from its neighbours alone.

    The neighbours are the ``2 · half`` slices nearest to ``i`` (the window
    is shifted inwards at the ends, so every slice has as many); ``x[i]``
    itself is left out.  Their repeated-median slope (Siegel: the median
    over neighbours of each one's median slope to the others, robust to
    almost half of them being outliers) removes a steady drift, and the
    prediction is the median of the detrended neighbours: the running
    median of the neighbours, exact for linear trends and unbiased at the
    ends.  NaNs are ignored; a slice without a finite neighbour gets NaN.
    """
    n = x.size
    m = min(2 * half, n - 1)
    i = np.arange(n)
    start = np.clip(i - half, 0, n - 1 - m)
    window = start[:, None] + np.arange(m + 1)
    neighbours = window[window != i[:, None]].reshape(n, m)
    offset = (neighbours - i[:, None]).astype(np.float64)
    values = x[neighbours]
    dt = offset[:, None, :] - offset[:, :, None]
    with np.errstate(invalid='ignore', divide='ignore'):
        # (n, m, m); the diagonal is 0 / 0 = NaN, which the medians skip.
        slopes = (values[:, None, :] - values[:, :, None]) / dt
    slope = _nanmedian_last(_nanmedian_last(slopes))
    slope = np.nan_to_num(slope, nan=0.0)
    return _nanmedian_last(values - slope[:, None] * offset)


def find_outliers(
    x: ArrayLike,
    x_stderr: ArrayLike,
    r2: ArrayLike,
    *,
    window: int = 7,
    r2_drop: float = 5.0,
    z: float = 5.0,
) -> NDArray[np.bool_]:
    """Flag slices with a poor fit or a mixing coefficient out of line.

    Two robust tests are combined; a slice is flagged if either fires.

    * **Low R².**  ``r2[i] < median(r2) − r2_drop · s_r2`` where ``s_r2``
      is the normal-consistent median absolute deviation (MAD) of `r2`.
      So that nearly identical values (noise-free data) do not flag
      rounding, ``s_r2`` is at least ``0.05 · (1 − median(r2))``: with the
      default `r2_drop` a slice must leave at least 1.25 times the typical
      unexplained variance.
    * **Jump in x.**  ``|x[i] − m[i]| > z · max(x_stderr[i], s_d)``.
      ``m[i]`` is the running median of the ``window − 1`` nearest other
      slices, after removing their robust (repeated-median) slope so that
      a steady drift is not mistaken for a jump (the window is shifted
      inwards at the ends, where ``m`` extrapolates).  ``s_d`` is the MAD of
      ``d = x − m`` over all slices: how much x really scatters around its
      running median (noise, fast drifts).  The slice's own standard error
      keeps a slice that is merely noisy, and knows it, from being
      flagged.

    Parameters
    ----------
    x, x_stderr, r2 : (n,) array_like of float
        Per-slice mixing coefficient, its standard error and R², as in
        :class:`napari_mixcoef.core.MixFit` along one leading axis.
    window : int, optional
        Odd number of slices, at least 5: each slice is compared with the
        ``window − 1`` slices nearest to it, of which fewer than half may
        be outliers themselves.
    r2_drop : float, optional
        How many robust standard deviations below the median R² a slice
        must fall to be flagged.
    z : float, optional
        How many robust standard deviations from the running median of its
        neighbours x must lie to be flagged.

    Returns
    -------
    (n,) ndarray of bool
        True for flagged slices.

    Raises
    ------
    ValueError
        If the inputs are not 1-D arrays of one length, `window` is not an
        odd integer >= 5, or `r2_drop` or `z` is not positive.

    Notes
    -----
    A slice whose `x` or `r2` is NaN or infinite is always flagged: its
    fit is undefined (e.g. a blank slice, ``a + b = 0``), which is what one
    scans for.  Such slices are left out of every median, MAD and running
    median of the others.  A NaN `x_stderr` counts as 0 (only ``s_d``
    applies); an infinite one means the slice is never flagged by the
    x test.  With fewer than 3 finite slices there is nothing to compare
    against, and only the non-finite slices are flagged.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.linspace(0.2, 0.8, 50)
    >>> x[20] += 0.1
    >>> r2 = np.full(50, 0.99)
    >>> r2[35] = 0.5
    >>> np.flatnonzero(find_outliers(x, np.full(50, 0.001), r2))
    array([20, 35])
    """
    arrays = [np.asarray(a, dtype=np.float64) for a in (x, x_stderr, r2)]
    x, x_stderr, r2 = arrays
    if any(a.ndim != 1 for a in arrays) or not (
        x.shape == x_stderr.shape == r2.shape
    ):
        raise ValueError(
            f'x, x_stderr and r2 have shapes {x.shape}, {x_stderr.shape} '
            f'and {r2.shape}; pass three 1-D arrays of one length (one '
            'leading axis of a fit, e.g. fit.x[:, j])'
        )
    if (
        isinstance(window, bool)
        or not isinstance(window, (int, np.integer))
        or window < 5
        or window % 2 == 0
    ):
        raise ValueError(
            f'window is {window!r}; pass an odd integer >= 5, e.g. 7'
        )
    for name, value in (('r2_drop', r2_drop), ('z', z)):
        if not value > 0:
            raise ValueError(
                f'{name} is {value!r}; pass a positive number of robust '
                'standard deviations, e.g. 5'
            )

    bad = ~(np.isfinite(x) & np.isfinite(r2))
    flagged = bad.copy()
    if np.count_nonzero(~bad) < 3:
        return flagged
    x = np.where(bad, np.nan, x)
    r2 = np.where(bad, np.nan, r2)

    # Low R², against the global median.
    r2_median = float(np.nanmedian(r2))
    r2_scale = max(
        _robust_sd(r2), 0.05 * (1.0 - r2_median), 1e-12 * abs(r2_median)
    )
    flagged |= r2 < r2_median - r2_drop * r2_scale

    # x against the running median of its neighbours.
    d = x - _neighbour_prediction(x, window // 2)
    x_scale = np.maximum(
        np.nan_to_num(np.abs(x_stderr), nan=0.0, posinf=np.inf),
        _robust_sd(d),
    )
    # Floor: exact data would otherwise flag rounding errors.
    floor = 64 * np.finfo(np.float64).eps * max(1.0, np.nanmax(np.abs(x)))
    x_scale = np.maximum(x_scale, floor)
    with np.errstate(invalid='ignore'):
        flagged |= np.abs(d) > z * x_scale
    return flagged
