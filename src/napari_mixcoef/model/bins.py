"""The bins' designs: the references shifted by a bin's fraction.

Each bin of fractional shifts ``f0 = key / BINS`` has one design shared
by all its slices (:mod:`.shifts`): the references shifted by ``f0`` and
their derivatives with respect to the shift, evaluated over the box from
the references' cubic spline coefficients (5 separable taps per axis),
and its Gram over the fitted pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from .spatial import sandwich_terms, smoothed
from .windows import WindowTables

__all__ = ['BINS', 'BinDesign', 'ShiftedDesigns']

#: Bins per pixel of the fractional shift (see :mod:`.shifts`).
BINS = 8


@dataclass(frozen=True, eq=False)
class BinDesign:
    """The shared columns of one bin of fractional shifts.

    Attributes
    ----------
    f0 : (d,) ndarray
        The bin's fractional shift (pixels).
    columns : (P, n_box) ndarray
        ``[R_k^{f0}, ∂_1R_k^{f0}, …, ∂_dR_k^{f0}, 1]`` over every pixel of
        the box, ``P = K(1 + d) + 1``, in the designs' working dtype (a
        view of their table).
    fitted : (n_fit,) ndarray of intp
        The fitted pixels of the box (flat indices).
    gram : (P, P) ndarray of float64
        ``BᵀB`` over the fitted pixels, of ``columns`` as stored.
    plain : (K, n_box) ndarray of float64
        The references over the box, unshifted.
    """

    f0: NDArray[np.float64]
    columns: NDArray
    fitted: NDArray[np.intp]
    gram: NDArray[np.float64]
    plain: NDArray[np.float64]

    def terms(
        self, rho: NDArray, box_shape, where: NDArray | None = None
    ) -> NDArray[np.float64]:
        """Sandwich terms of the columns, ``(P(P+1)/2, n)``.

        The spatial HAC terms of :mod:`.spatial` for the noise kernel
        ``rho``: ``Ω_B = Σ_p r_p² terms[:, p]``; at the fitted pixels
        ``where`` (positions among them) only, when given.
        """
        cached = self.__dict__.get('_terms')
        if cached is None or cached[0] is not rho or cached[1] is not where:
            images = np.zeros(self.columns.shape)
            images[:, self.fitted] = self.columns[:, self.fitted]
            smooth = smoothed(images.reshape((-1, *box_shape)), rho)
            smooth = smooth.reshape(len(images), -1)
            at = self.fitted if where is None else self.fitted[where]
            terms = sandwich_terms(images[:, at], smooth[:, at])
            cached = (rho, where, terms)
            object.__setattr__(self, '_terms', cached)
        return cached[2]


class ShiftedDesigns:
    """The bins' designs over a box of the references, made on first use.

    Every bin's columns sit in one table in the working dtype, which the
    passes' products read as it is (no copy per bin or per pass).

    Parameters
    ----------
    images : (K, *shape) ndarray of float64
        The references.
    box : tuple of slice
        The part of the reference grid that every registered slice covers.
    mask : (*shape) ndarray of bool or None
        The fitted pixels (None: all).
    dtype : dtype, optional
        Working float type of the columns (the products').
    mapper : callable, optional
        ``map(function, items)`` that runs independent parts of making the
        designs (e.g. a thread pool's); the builtin ``map`` by default.
    """

    def __init__(
        self,
        images: NDArray,
        box: tuple,
        mask,
        dtype=np.float64,
        mapper: Callable = map,
    ) -> None:
        self._map = mapper
        self.k = images.shape[0]
        self.ndim = images.ndim - 1
        self.box = box
        self.full_shape = tuple(images.shape[1:])
        self.dtype = np.dtype(dtype)
        # the spline coefficients once, mirrored by the taps' reach; each
        # bin evaluates them (and their derivatives) with separable taps
        self._coef = [
            np.pad(
                ndimage.spline_filter(im, order=3, mode='mirror'), 2, 'reflect'
            )
            for im in images
        ]
        self._plain = np.stack([im[box] for im in images]).reshape(self.k, -1)
        inside = np.ones(self._plain.shape[1], bool)
        if mask is not None:
            inside = np.asarray(mask, bool)[box].reshape(-1)
        self.fitted = np.flatnonzero(inside)
        self._slot: dict[tuple[int, ...], int] = {}
        self._columns = np.empty((0, self.width, self._plain.shape[1]), dtype)
        self._gram = np.empty((0, self.width, self.width))
        self._centre = np.empty((0, len(self.fitted)), dtype)
        self._b_centre = np.empty((0, self.width))
        self._norm2 = np.empty(0)
        self._fitted_columns = None
        self._cache: dict[tuple[int, ...], BinDesign] = {}

    @property
    def box_shape(self) -> tuple[int, ...]:
        """Shape of the box."""
        return tuple(s.stop - s.start for s in self.box)

    @property
    def width(self) -> int:
        """Shared columns per bin, ``P = K(1 + d) + 1``."""
        return self.k * (1 + self.ndim) + 1

    def _evaluate(self, r: int, coef: NDArray, keys: list) -> None:
        """Write ``R_r(p − f0)`` and its derivatives of every bin's slot.

        The cubic spline's 5 taps per axis: values ``β₃(−f − t)``, and
        ``−β₃'(−f − t)`` along the axis being differentiated.  An axis at
        a time, every bin that shares the axes before it in one product
        of the tap weights with the 5 shifted images (a GEMM, not a pass
        per bin); the last axis's products go straight to the table.
        """
        level = {(): {None: coef}}
        taps = np.arange(-2, 3)
        last = self.ndim - 1
        for axis, part in enumerate(self.box):
            done: dict = {}
            for prefix, parts in level.items():
                steps = sorted({k[axis] for k in keys if k[:axis] == prefix})
                u = -np.asarray(steps, np.float64)[:, None] / BINS - taps
                weight, slope = _bspline3(u), -_bspline3_slope(u)
                for which, values in parts.items():
                    moved = _shifted(values, axis, part)
                    flat = moved.reshape(len(taps), -1)
                    made = [(which, weight)]
                    if which is None:
                        made.append((axis, slope))
                    for name, w in made:
                        out = np.dot(w, flat)
                        if axis < last:
                            out = out.reshape((-1, *moved.shape[1:]))
                            for step, image in zip(steps, out):
                                at = done.setdefault((*prefix, step), {})
                                at[name] = image
                            continue
                        # rows: R_k, then ∂_1 R_k for every k, …
                        row = r if name is None else (1 + name) * self.k + r
                        for step, image in zip(steps, out):
                            at = self._slot[(*prefix, step)]
                            self._columns[at, row] = image
            level = done

    def get(self, key: tuple[int, ...]) -> BinDesign:
        """Return the design of bin ``key`` (``f0 = key / BINS``)."""
        return self.get_many([key])[0]

    def get_many(self, keys: list) -> list[BinDesign]:
        """Return the designs of bins ``keys``, making the missing together."""
        self.slots(keys)
        return [self._cache[tuple(k)] for k in keys]

    @property
    def columns(self) -> NDArray:
        """Every made bin's columns over the box, ``(slots, P, n_box)``."""
        return self._columns[: len(self._slot)]

    @property
    def grams(self) -> NDArray[np.float64]:
        """Every made bin's Gram, ``(slots, P, P)``."""
        return self._gram[: len(self._slot)]

    def tables(
        self, pixels: NDArray | None = None
    ) -> tuple[WindowTables, NDArray[np.float64]]:
        """Every made bin's tables over the fitted pixels, and its Gram.

        Parameters
        ----------
        pixels : (n,) ndarray of intp, optional
            Positions among the fitted pixels that a pass reads: the
            centred products' corrections and the Grams are summed over
            those (the tables themselves stay whole).

        Returns
        -------
        tables : WindowTables
            By slot (:meth:`slots`).
        grams : (slots, P, P) ndarray of float64
        """
        count = len(self._slot)
        columns = self.columns
        if len(self.fitted) != columns.shape[2]:
            if (
                self._fitted_columns is None
                or len(self._fitted_columns) != count
            ):
                self._fitted_columns = np.ascontiguousarray(
                    columns[:, :, self.fitted]
                )
            columns = self._fitted_columns
        centre = self._centre[:count]
        b_centre, norm2 = self._b_centre[:count], self._norm2[:count]
        grams = self.grams
        if pixels is not None:
            b_centre = np.empty_like(b_centre)
            norm2 = np.empty_like(norm2)
            grams = np.empty_like(grams)
            for slot in range(count):
                norm2[slot] = _moments(
                    columns[slot][:, pixels].astype(np.float64),
                    centre[slot, pixels].astype(np.float64),
                    grams[slot],
                    b_centre[slot],
                )
        keys = sorted(self._slot, key=self._slot.get)
        tables = WindowTables(keys, centre, columns, b_centre, norm2, self.k)
        return tables, grams

    def slots(self, keys: list) -> NDArray[np.int64]:
        """Return the table's slot of each of ``keys``, making the missing."""
        missing = sorted({tuple(k) for k in keys} - set(self._slot))
        if missing:
            self._make(missing)
        return np.array([self._slot[tuple(k)] for k in keys], np.int64)

    def _make(self, missing: list) -> None:
        count = len(self._slot)
        need = count + len(missing)
        grown = need > len(self._columns)
        if grown:
            # room for the next pass's few new bins without a copy
            room = max(min(2 * need, BINS**self.ndim), need)
            self._columns = _grown(self._columns, room, count)
            self._gram = _grown(self._gram, room, count)
            self._centre = _grown(self._centre, room, count)
            self._b_centre = _grown(self._b_centre, room, count)
            self._norm2 = _grown(self._norm2, room, count)
        for i, key in enumerate(missing):
            self._slot[key] = count + i
        self._columns[count:need, -1] = 1.0
        # each reference's rows, then each share of the new slots' sums:
        # independent work (numpy and BLAS release the GIL)
        list(
            self._map(
                lambda r: self._evaluate(r, self._coef[r], missing),
                range(self.k),
            )
        )
        shares = np.array_split(np.arange(count, need), 2)
        list(self._map(self._sums, [sh for sh in shares if len(sh)]))
        if grown:  # the designs are views of the table: of the new one
            self._cache.clear()
        for key, slot in self._slot.items():
            if key not in self._cache:
                self._cache[key] = BinDesign(
                    f0=np.asarray(key, np.float64) / BINS,
                    columns=self._columns[slot],
                    fitted=self.fitted,
                    gram=self._gram[slot],
                    plain=self._plain,
                )

    def _sums(self, slots: NDArray) -> None:
        """Write the Gram and centre of the columns of ``slots``.

        Of the columns as stored (the products read those), summed in
        float64.
        """
        everything = len(self.fitted) == self._columns.shape[2]
        # one float64 copy of a bin at a time, reused (it stays in cache)
        part = np.empty((self.width, len(self.fitted)))
        centre = np.empty(len(self.fitted))
        for slot in slots:
            stored = self._columns[slot]
            part[...] = stored if everything else stored[:, self.fitted]
            # slices are centred on the mean shifted reference
            self._centre[slot] = part[: self.k].mean(axis=0)
            centre[...] = self._centre[slot]
            self._norm2[slot] = _moments(
                part, centre, self._gram[slot], self._b_centre[slot]
            )


def _moments(part: NDArray, centre: NDArray, gram: NDArray, b: NDArray):
    """Write ``BBᵀ`` into ``gram`` and ``Bc`` into ``b``; return ``‖c‖²``.

    ``part`` (P, n) the columns and ``centre`` (n,) at the pixels summed
    over, in float64.
    """
    np.dot(part, part.T, out=gram)
    np.dot(part, centre, out=b)
    return float(centre @ centre)


def _grown(table: NDArray, room: int, count: int) -> NDArray:
    """Return ``table`` with ``room`` rows, its first ``count`` kept."""
    out = np.empty((room, *table.shape[1:]), table.dtype)
    out[:count] = table[:count]
    return out


def _bspline3(u: NDArray) -> NDArray:
    """Return the cubic B-spline at ``u``."""
    a = np.abs(u)
    return np.where(
        a < 1,
        2 / 3 - a * a + a**3 / 2,
        np.where(a < 2, (2 - a) ** 3 / 6, 0.0),
    )


def _bspline3_slope(u: NDArray) -> NDArray:
    """Return the cubic B-spline's derivative at ``u``."""
    a = np.abs(u)
    inner = -2 * a + 1.5 * a * a
    outer = -((2 - a) ** 2) / 2
    return np.sign(u) * np.where(a < 1, inner, np.where(a < 2, outer, 0.0))


def _shifted(values: NDArray, axis: int, part: slice) -> NDArray:
    """``c[p + t]`` along ``axis`` for ``p`` in ``part``, ``t = −2 … 2``.

    ``values`` is padded by 2 along the axes not yet evaluated; the
    result stacks the 5 taps first.
    """
    index = [slice(None)] * values.ndim
    out = []
    for t in range(-2, 3):
        index[axis] = slice(part.start + 2 + t, part.stop + 2 + t)
        out.append(values[tuple(index)])
    return np.stack(out)
