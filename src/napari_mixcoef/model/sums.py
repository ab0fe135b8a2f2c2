"""Per-slice sums, named, and the algebra from them to a slice's fit.

A backend reduces each slice ``y`` (centred on ``M``: ``y_c = y − M``) to
a few sums over its fitted pixels, laid out by :class:`SumsLayout`:

``g``
    ``Q_kᵀ y_c``, one per orthonormal basis vector of the design (k).
``s``, ``h``
    ``Σ y_c`` and ``u2ᵀ y_c`` with ``u2 = M − mean M``: the centred total
    of the slice follows from them (no more basis vectors are needed).
``yy``
    ``Σ y_c²``.
``hy``, ``hq`` (with HAC terms, one-coefficient models)
    ``Σ y_c² t`` and ``Σ y_c q₁ t`` for the sandwich terms ``t`` of
    :mod:`napari_mixcoef.model.spatial`: with the residual ``r = y_c −
    z q₁`` the meat ``Σ r² t`` expands into ``hy − 2 z hq + z² Σq₁²t``.

Sums add up over pixels, so slices may be split into bands and dask blocks
may split the image axes.  Their width follows the number of basis
vectors; no column index is written outside this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from .spatial import pack, unpack

__all__ = ['GUARD', 'SliceStats', 'SliceSums', 'SumsLayout', 'ols_stats']

#: Recompute SSR from explicit residuals where ``SSR < GUARD · Σy_c²``:
#: the difference ``Σy_c² − ‖g‖²`` then keeps too few digits.
GUARD = {np.dtype(np.float32): 1e-2, np.dtype(np.float64): 1e-6}


@dataclass(frozen=True)
class SumsLayout:
    """Columns of the per-slice sums (float64 rows).

    Attributes
    ----------
    k : int
        Basis vectors of the design: the width of ``g``.
    hac : bool
        Whether the one-pass HAC sums ``hy``, ``hq`` follow.
    """

    k: int
    hac: bool = False

    @property
    def g(self) -> slice:
        """Columns of ``Q_kᵀy_c``."""
        return slice(0, self.k)

    @property
    def linear(self) -> slice:
        """Columns ``g``, ``s``, ``h``: the products with ``[Q_k; 1; u2]``."""
        return slice(0, self.k + 2)

    @property
    def s(self) -> int:
        """Column of ``Σy_c``."""
        return self.k

    @property
    def h(self) -> int:
        """Column of ``u2ᵀy_c``."""
        return self.k + 1

    @property
    def yy(self) -> int:
        """Column of ``Σy_c²``."""
        return self.k + 2

    @property
    def hy(self) -> int:
        """Column of ``Σy_c² t`` (HAC)."""
        return self.k + 3

    @property
    def hq(self) -> int:
        """Column of ``Σy_c q₁ t`` (HAC)."""
        return self.k + 4

    @property
    def width(self) -> int:
        """Number of columns."""
        return self.k + 3 + 2 * self.hac

    def empty(self, n_slices: int) -> SliceSums:
        """Zeroed sums for ``n_slices`` slices."""
        return SliceSums(np.zeros((n_slices, self.width)), self)


@dataclass(frozen=True)
class SliceSums:
    """Per-slice sums: the raw ``(n, width)`` rows and their layout."""

    raw: NDArray[np.float64]
    layout: SumsLayout

    @property
    def g(self) -> NDArray[np.float64]:
        """``Q_kᵀ y_c``, (n, k)."""
        return self.raw[:, self.layout.g]

    @property
    def s(self) -> NDArray[np.float64]:
        """``Σ y_c``, (n,)."""
        return self.raw[:, self.layout.s]

    @property
    def h(self) -> NDArray[np.float64]:
        """``u2ᵀ y_c``, (n,)."""
        return self.raw[:, self.layout.h]

    @property
    def yy(self) -> NDArray[np.float64]:
        """``Σ y_c²``, (n,)."""
        return self.raw[:, self.layout.yy]

    @property
    def hy(self) -> NDArray[np.float64]:
        """``Σ y_c² t``, (n,)."""
        return self.raw[:, self.layout.hy]

    @property
    def hq(self) -> NDArray[np.float64]:
        """``Σ y_c q₁ t``, (n,)."""
        return self.raw[:, self.layout.hq]

    def rows(self, start: int, stop: int) -> SliceSums:
        """Return the sums of slices ``start:stop`` (a view)."""
        return SliceSums(self.raw[start:stop], self.layout)


@dataclass(frozen=True)
class FitLayout:
    """Columns of a block's fitted rows (float64), for transport.

    ``z`` (k), ``meat`` (P), ``bread`` (P, where the estimator has one),
    ``ssr``, ``yy``, ``s``, ``h`` and ``active`` (K flags), with ``P =
    k(k+1)/2``: :meth:`pack` and :meth:`unpack` turn a
    :class:`~.noise.BlockFit` into rows and back.
    """

    k: int
    n_constraints: int = 0
    bread: bool = False

    @property
    def n_pairs(self) -> int:
        """Entries of a packed symmetric k × k matrix."""
        return self.k * (self.k + 1) // 2

    def _spans(self) -> dict[str, tuple[int, int]]:
        sizes = {
            'z': self.k,
            'meat': self.n_pairs,
            'bread': self.n_pairs if self.bread else 0,
            'ssr': 1,
            'yy': 1,
            's': 1,
            'h': 1,
            'active': self.n_constraints,
        }
        spans, start = {}, 0
        for name, size in sizes.items():
            spans[name] = (start, start + size)
            start += size
        return spans

    @property
    def width(self) -> int:
        """Number of columns."""
        return self._spans()['active'][1]

    def pack(self, fit) -> NDArray[np.float64]:
        """Rows ``(m, width)`` of a BlockFit."""
        spans = self._spans()
        out = np.zeros((fit.z.shape[0], self.width))
        for name, (a, b) in spans.items():
            if a == b:
                continue
            value = getattr(fit, name)
            if value is None:
                continue
            out[:, a:b] = np.asarray(value, np.float64).reshape(len(out), -1)
        return out

    def unpack(self, rows: NDArray, sandwich: bool):
        """Return the BlockFit of rows made by :meth:`pack`."""
        from .noise import BlockFit

        spans = self._spans()

        def part(name):
            a, b = spans[name]
            return rows[:, a:b]

        active = part('active') > 0.5 if self.n_constraints else None
        return BlockFit(
            z=part('z'),
            meat=part('meat'),
            bread=part('bread') if self.bread else None,
            sandwich=sandwich,
            ssr=part('ssr')[:, 0],
            yy=part('yy')[:, 0],
            s=part('s')[:, 0],
            h=part('h')[:, 0],
            active=active,
        )


@dataclass
class SliceStats:
    """Each slice's fit in basis coordinates, before the model's map.

    Attributes
    ----------
    z : (n, k) ndarray
        Coordinates of the fit in the first k (orthonormal) basis vectors.
    ssr, sst : (n,) ndarray
        Residual and centred total sums of squares (unweighted).
    meat : (n, k(k+1)/2) ndarray
        Packed middle of the covariance of ``z``.
    bread : (n, k(k+1)/2) ndarray or None
        Packed bread (None: the identity, least squares).
    sandwich : bool
        ``cov = B⁻¹ Ω B⁻¹ · n/(n − f)`` (robust) if True, else
        ``B⁻¹ Ω B⁻¹ / (n − f)`` (textbook: Ω is the unnormalised ``SSR·I``,
        ``Σψr·B`` or ``Σψ²/p²·I``), with f free parameters.
    active : (n, K) ndarray of bool or None
        Constraints that hold with equality (None: unconstrained).
    """

    z: NDArray[np.float64]
    ssr: NDArray[np.float64]
    sst: NDArray[np.float64]
    meat: NDArray[np.float64]
    bread: NDArray[np.float64] | None
    sandwich: bool
    active: NDArray[np.bool_] | None = None


def ssr_of(sums: SliceSums, k: int, z: NDArray | None = None) -> NDArray:
    """``SSR = Σy_c² − ‖g_k‖² + ‖g_k − z‖²`` (z: least squares if None).

    The last term is the distance of a constrained fit from the
    unconstrained one (Pythagoras in the orthonormal basis).
    """
    g = sums.g
    ssr = sums.yy - np.einsum('ij,ij->i', g, g)
    if z is not None:
        d = g - z
        ssr = ssr + np.einsum('ij,ij->i', d, d)
    return ssr


def suspect(sums: SliceSums, ssr: NDArray, dtype: np.dtype) -> NDArray:
    """Slices whose ``SSR`` from sums cancelled (R² ≈ 1): recompute them."""
    return ssr < GUARD[np.dtype(dtype)] * sums.yy


def expanded_meat(sums: SliceSums, z: NDArray, hac_const: float) -> NDArray:
    """``Σ r² t`` of a one-coefficient fit from the HAC sums, ``(n, 1)``.

    ``r = y_c − z q₁``: ``Σy_c²t − 2zΣy_c q₁ t + z²Σq₁²t``.
    """
    d = z[:, 0]
    omega = sums.hy - 2.0 * d * sums.hq + d * d * hac_const
    return np.maximum(omega, 0.0)[:, None]


def ols_stats(
    sums: SliceSums,
    design,
    *,
    z: NDArray | None = None,
    ssr: NDArray | None = None,
    meat: NDArray | None = None,
    active: NDArray | None = None,
) -> SliceStats:
    """Return the stats of least-squares fits from their sums.

    Parameters
    ----------
    sums : SliceSums
        The slices' sums.
    design : Design
        Their design.
    z : (n, k) ndarray, optional
        A constrained fit (default: least squares, ``g[:k]``).
    ssr : (n,) ndarray, optional
        SSR recomputed from explicit residuals (default: from the sums).
    meat : (n, k(k+1)/2) ndarray, optional
        A robust (sandwich) meat; default: textbook errors.
    active : (n, K) ndarray of bool, optional
        Active constraints of ``z``.
    """
    k = design.k
    if z is None:
        z = np.ascontiguousarray(sums.g)
    if ssr is None:
        ssr = ssr_of(sums, k, z if active is not None else None)
    ssr = np.maximum(ssr, 0.0)
    sst = design.centred_total(sums.s, sums.h, sums.yy)
    sandwich = meat is not None
    if meat is None:
        meat = ssr[:, None] * pack(np.eye(k))[None]
    return SliceStats(z, ssr, sst, meat, None, sandwich, active)


def covariance_z(
    stats: SliceStats, n: int, free: NDArray | None = None
) -> NDArray[np.float64]:
    """Covariance of ``z`` for every slice, ``(n_slices, k, k)``.

    Parameters
    ----------
    stats : SliceStats
        The fits.
    n : int
        Fitted pixels per slice.
    free : (k, f) ndarray, optional
        Orthonormal free directions of ``z`` (a constrained fit's active
        set removes the others); default: all of them.

    Notes
    -----
    With ``N = free``: ``N (NᵀBN)⁻¹ NᵀΩN (NᵀBN)⁻¹ Nᵀ · c`` with ``c =
    n/(n − f)`` for the sandwich and ``1/(n − f)`` for textbook errors.
    Where ``n ≤ f`` (an exact fit) the covariance is NaN.
    """
    k = stats.z.shape[1]
    meat = unpack(stats.meat, k)
    bread = None if stats.bread is None else unpack(stats.bread, k)
    if free is not None:
        meat = free.T @ meat @ free
        if bread is not None:
            bread = free.T @ bread @ free
    f = meat.shape[-1]
    dof = n - f
    scale = (n / dof if stats.sandwich else 1.0 / dof) if dof > 0 else np.nan
    if f == 0:
        cov = np.zeros(meat.shape)
    elif bread is None:
        cov = meat * scale
    else:
        inv = _inverse(bread)
        cov = inv @ meat @ inv * scale
    if free is not None:
        cov = free @ cov @ free.T
    return cov


def _inverse(matrices: NDArray) -> NDArray:
    """Inverse of each symmetric matrix (pseudo-inverse where singular)."""
    try:
        return np.linalg.inv(matrices)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(matrices, hermitian=True)
