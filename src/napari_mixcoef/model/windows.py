"""Slices read over a moved box, laid out for the backends' products.

A slice read at an integer offset ``n`` over the box is a pure re-index
of the stored slice: pixel ``p`` of the box is stored pixel ``p + n``.
Flattened, the fitted pixels of the box fall in *runs* of consecutive
stored pixels (along the last axis), and moving the box by ``n`` adds
one flat ``base = n · strides`` to every run: a backend reads each run as
one contiguous stretch, whatever the number of axes or the mask.

The bins' tables stack, over the fitted pixels, each bin's centre (its
mean shifted reference) and its columns in the working dtype, so that a
block of slices from many bins is one call (``window_products``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ['WindowTables', 'base_of', 'run_positions', 'window_runs']


def window_runs(box, shape, fitted: NDArray) -> NDArray[np.int64]:
    """Return the runs of the box's fitted pixels, ``(g, 3)``.

    Each row is ``(stored start, fitted start, length)``: fitted pixels
    ``f … f + length − 1`` are stored pixels ``s … s + length − 1`` of a
    slice read with no offset.
    """
    box_shape = tuple(part.stop - part.start for part in box)
    coords = np.unravel_index(np.asarray(fitted, np.intp), box_shape)
    stored = np.ravel_multi_index(
        tuple(c + part.start for c, part in zip(coords, box)), tuple(shape)
    ).astype(np.int64)
    if stored.size == 0:
        return np.zeros((0, 3), np.int64)
    breaks = np.flatnonzero(np.diff(stored) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [stored.size]])
    return np.stack([stored[starts], starts, stops - starts], axis=1).astype(
        np.int64
    )


def run_positions(runs: NDArray) -> NDArray[np.intp]:
    """Return the fitted positions the runs cover, in their order."""
    return _spans(runs, 1)


def _spans(runs: NDArray, column: int) -> NDArray[np.intp]:
    """Every index of the runs' spans from ``runs[:, column]``, in order."""
    if len(runs) == 0:
        return np.zeros(0, np.intp)
    return np.concatenate(
        [np.arange(a, a + n) for a, n in runs[:, [column, 2]].tolist()]
    ).astype(np.intp)


def base_of(offset: NDArray, shape) -> NDArray[np.int64]:
    """Flat stored offsets ``n · strides`` of integer offsets ``(m, d)``."""
    strides = np.cumprod((1, *tuple(shape)[:0:-1]))[::-1].astype(np.int64)
    return np.asarray(offset, np.int64) @ strides


@dataclass(frozen=True)
class WindowTables:
    """The bins of one pass, stacked over the fitted pixels.

    Attributes
    ----------
    keys : list of tuple of int
        The bins, in the order of the tables.
    centre : (n_bins, n_fit) ndarray
        Each bin's mean shifted reference, in the working dtype: slices
        are centred on it before the products (as the engine's sums are).
    columns : (n_bins, P, n_fit) ndarray
        Each bin's columns, in the working dtype.
    b_centre : (n_bins, P) ndarray of float64
        The columns' products with the centre.
    norm2 : (n_bins,) ndarray of float64
        ``‖centre‖²``.
    k : int
        References (the centre is the mean of the first ``k`` columns).
    """

    keys: list
    centre: NDArray
    columns: NDArray
    b_centre: NDArray[np.float64]
    norm2: NDArray[np.float64]
    k: int

    def finish(self, which: NDArray, b: NDArray, yy: NDArray) -> None:
        """Turn centred products into the slices' own, in place.

        ``Bᵀy = Bᵀy_c + Bᵀc`` and ``Σy² = Σy_c² + 2 c·y_c + ‖c‖²``, with
        ``c·y_c`` the mean of the first ``k`` columns' products.
        """
        yy += 2 * b[:, : self.k].mean(axis=1) + self.norm2[which]
        b += self.b_centre[which]


def _gathered(runs: NDArray) -> NDArray[np.intp]:
    """Return the stored pixels of the runs, in their fitted order."""
    return _spans(runs, 0)


def numpy_window_fill(y, base, which, runs, coef, rows, out):
    """Write the slices as ``window_fill`` does (the reference)."""
    index = _gathered(runs)
    for j in np.unique(which):
        at = np.flatnonzero(which == j)
        data = y[at[:, None], base[at, None] + index]
        fix = np.dot(coef[at].astype(out.dtype), rows[j])
        out[at] = np.add(data, fix, dtype=out.dtype)


def numpy_window_products(y, base, which, runs, centre, columns, b, yy):
    """Add the products as ``window_products`` does (the reference)."""
    index = _gathered(runs)
    wt = centre.dtype
    at = run_positions(runs)  # a subsampled pass reads some of the tables
    for j in np.unique(which):
        rows = np.flatnonzero(which == j)
        data = y[rows[:, None], base[rows, None] + index]
        yc = np.subtract(data, centre[j, at], dtype=wt)
        b[rows] += np.dot(yc, columns[j][:, at].T).astype(np.float64)
        yy[rows] += np.einsum('mp,mp->m', yc, yc, dtype=np.float64)


def numpy_window_meat(y, base, which, runs, v, columns, twhich, terms, out):
    """Add the sums as ``window_meat`` does (the reference)."""
    index = _gathered(runs)
    wt = columns.dtype
    for j, t in {(a, b) for a, b in zip(which.tolist(), twhich.tolist())}:
        at = np.flatnonzero((which == j) & (twhich == t))
        data = y[at[:, None], base[at, None] + index].astype(wt)
        r = data - np.dot(v[at].astype(wt), columns[j])
        out[at] += np.dot(r * r, terms[t].T).astype(np.float64)
