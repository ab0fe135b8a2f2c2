"""The bins' designs: the references shifted by a bin's fraction.

Each bin of fractional shifts ``f0 = key / BINS`` has one design shared
by all its slices (:mod:`.shifts`): the references shifted by ``f0`` and
their derivatives with respect to the shift, evaluated over the box from
the references' cubic spline coefficients (5 separable taps per axis),
and its Gram over the fitted pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from .spatial import sandwich_terms, smoothed

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
    columns : (P, n_box) ndarray of float64
        ``[R_k^{f0}, ∂_1R_k^{f0}, …, ∂_dR_k^{f0}, 1]`` over every pixel of
        the box, ``P = K(1 + d) + 1``.
    fitted : (n_fit,) ndarray of intp
        The fitted pixels of the box (flat indices).
    gram : (P, P) ndarray of float64
        ``BᵀB`` over the fitted pixels.
    moved : (K, n_box) ndarray of float64
        ``R_k − R_k^{f0}``: what the bin's shift does to each reference.
    """

    f0: NDArray[np.float64]
    columns: NDArray[np.float64]
    fitted: NDArray[np.intp]
    gram: NDArray[np.float64]
    moved: NDArray[np.float64]
    _ndim: int = 2

    def products(self, data: NDArray, dtype) -> tuple[NDArray, NDArray]:
        """``Bᵀy`` and ``Σy²`` of slices over the fitted pixels.

        Parameters
        ----------
        data : (m, *box) ndarray
            The slices over the box, as stored (a strided view will do).
        dtype : dtype
            Working float type: the slices are centred on the bin's mean
            reference in it (as the engine's sums are), the centre's own
            products added in float64.

        Returns
        -------
        b : (m, P) ndarray of float64
        yy : (m,) ndarray of float64
        """
        cached = self.__dict__.get('_centred')
        if cached is None or cached[0] != np.dtype(dtype):
            k = (len(self.columns) - 1) // (1 + self._ndim)
            outside = np.ones(self.columns.shape[1], bool)
            outside[self.fitted] = False
            columns = self.columns.copy()
            columns[:, outside] = 0.0  # pixels outside the mask add nothing
            centre = columns[:k].mean(axis=0)
            cached = (
                np.dtype(dtype),
                centre.astype(dtype).reshape(data.shape[1:]),
                np.ascontiguousarray(columns.T, dtype=dtype),
                columns @ centre,
                float(centre @ centre),
                k,
                outside if outside.any() else None,
            )
            object.__setattr__(self, '_centred', cached)
        _, centre, columns, b_centre, norm2, k, outside = cached
        yc = np.subtract(data, centre, dtype=centre.dtype)
        yc = yc.reshape(len(yc), -1)
        if outside is not None:
            yc[:, outside] = 0
        bc = np.dot(yc, columns).astype(np.float64)
        yy = np.einsum('mp,mp->m', yc, yc, dtype=np.float64)
        # Σy² = Σy_c² + 2 M·y_c + ‖M‖², M the mean of the first K columns
        yy += 2 * bc[:, :k].mean(axis=1) + norm2
        return bc + b_centre, yy

    def terms(self, rho: NDArray, box_shape) -> NDArray[np.float64]:
        """Sandwich terms of the columns, ``(P(P+1)/2, n_fit)``.

        The spatial HAC terms of :mod:`.spatial` for the noise kernel
        ``rho``: ``Ω_B = Σ_p r_p² terms[:, p]``.
        """
        cached = self.__dict__.get('_terms')
        if cached is None or cached[0] is not rho:
            images = np.zeros_like(self.columns)
            images[:, self.fitted] = self.columns[:, self.fitted]
            smooth = smoothed(images.reshape((-1, *box_shape)), rho)
            smooth = smooth.reshape(len(images), -1)
            terms = sandwich_terms(images, smooth)[:, self.fitted]
            cached = (rho, np.ascontiguousarray(terms))
            object.__setattr__(self, '_terms', cached)
        return cached[1]


class ShiftedDesigns:
    """The bins' designs over a box of the references, made on first use.

    Parameters
    ----------
    images : (K, *shape) ndarray of float64
        The references.
    box : tuple of slice
        The part of the reference grid that every registered slice covers.
    mask : (*shape) ndarray of bool or None
        The fitted pixels (None: all).
    """

    def __init__(self, images: NDArray, box: tuple, mask) -> None:
        self.k = images.shape[0]
        self.ndim = images.ndim - 1
        self.box = box
        self.full_shape = tuple(images.shape[1:])
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
        self._cache: dict[tuple[int, ...], BinDesign] = {}

    @property
    def box_shape(self) -> tuple[int, ...]:
        """Shape of the box."""
        return tuple(s.stop - s.start for s in self.box)

    @property
    def width(self) -> int:
        """Shared columns per bin, ``P = K(1 + d) + 1``."""
        return self.k * (1 + self.ndim) + 1

    def _evaluated(self, coef: NDArray, keys: list) -> dict:
        """``R(p − f0)`` and its derivatives in ``f`` over the box, per bin.

        The cubic spline's 5 taps per axis: values ``β₃(−f − t)``, and
        ``−β₃'(−f − t)`` along the axis being differentiated.  An axis at
        a time, every bin that shares the axes before it in one product
        of the tap weights with the 5 shifted images (a GEMM, not a pass
        per bin).  Returns ``{key: [R, ∂_1R, …, ∂_dR]}`` (flat).
        """
        level = {(): {None: coef}}
        taps = np.arange(-2, 3)
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
                        out = np.dot(w, flat).reshape((-1, *moved.shape[1:]))
                        for step, image in zip(steps, out):
                            done.setdefault((*prefix, step), {})[name] = image
            level = done
        order = [None, *range(self.ndim)]
        return {
            key: [level[key][w].reshape(-1) for w in order] for key in keys
        }

    def get(self, key: tuple[int, ...]) -> BinDesign:
        """Return the design of bin ``key`` (``f0 = key / BINS``)."""
        return self.get_many([key])[0]

    def get_many(self, keys: list) -> list[BinDesign]:
        """Return the designs of bins ``keys``, making the missing together."""
        missing = sorted({tuple(k) for k in keys} - set(self._cache))
        if missing:
            each = [self._evaluated(c, missing) for c in self._coef]
            for key in missing:
                self._cache[key] = self._made(key, [e[key] for e in each])
        return [self._cache[tuple(k)] for k in keys]

    def _made(self, key: tuple[int, ...], each: list) -> BinDesign:
        f0 = np.asarray(key, np.float64) / BINS
        # rows: R_k, then ∂_1 R_k for every k, …, then the constant;
        # written in place (stack + vstack copied each bin twice)
        k = len(each)
        columns = np.empty((k * (self.ndim + 1) + 1, len(each[0][0])))
        for j in range(self.ndim + 1):
            for r, e in enumerate(each):
                columns[j * k + r] = e[j]
        columns[-1] = 1.0
        if len(self.fitted) == columns.shape[1]:
            part = columns
        else:
            part = np.ascontiguousarray(columns[:, self.fitted])
        return BinDesign(
            f0=f0,
            columns=columns,
            fitted=self.fitted,
            gram=np.dot(part, part.T),
            moved=self._plain - columns[:k],
            _ndim=self.ndim,
        )


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
