"""Slices of a few pixels (spectra, pixel by pixel), fitted one by one.

A channel-last image ``(Y, X, C)`` fitted with references of length C has
millions of slices of C values.  The per-slice sums of
:mod:`.sums` and their assembly (:mod:`.assemble`) cost a few passes over
per-slice arrays as wide as the sums, for every slice: more than the fit.
Here each slice is read once and its reported numbers follow at once,
from fixed linear maps of the design, made once per fit:

* ``z = Q_k y_c`` and ``β = β0 + L z`` with ``L = E T⁻¹`` (``lift``), as
  :mod:`.assemble` maps them; the residual ``r = y_c − Q_kᵀ z`` and
  ``SSR = Σr²`` are explicit (a slice is short: no cancellation guard).
* The sandwich's meat ``Ω = Σ_p r_p² · ½(q_p q̃_pᵀ + q̃_p q_pᵀ)`` (with
  ``q̃ = ρ ⋆ q``, :mod:`.spatial`) enters every variance wanted as
  ``γᵀ L Ω Lᵀ γ = Σ_p r_p² (γ·G_p)(γ·G̃_p)`` with ``G = L Q_k`` and ``G̃ =
  L Q̃_k``: for a coefficient ``γ`` is a unit vector, for a fraction ``f_i
  = a_i / T`` of the free models ``(e_i − f_i 1_K) / T``, which splits into
  three sums per slice.  Textbook errors put ``r_p² → 1`` and multiply by
  ``SSR``.  The definitions are those of :func:`.assemble.stats_arrays`.

:func:`fit_pixels` is the numpy reference the compiled backend is held to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ['PixelMaps', 'PixelOutputs', 'fit_pixels', 'make_maps']

#: How the fractions follow from the coefficients.
MIX_TWO, MIX_MANY, FREE = 0, 1, 2


@dataclass(frozen=True, eq=False)
class PixelMaps:
    """The design's linear maps over the fitted pixels (float64).

    Attributes
    ----------
    index : (n,) ndarray of int64
        Fitted pixels of the flattened image.
    centre : (n,) ndarray
        ``M`` at those pixels.
    basis : (k, n) ndarray
        ``Q_kᵀ`` rows at those pixels.
    lift, beta0 : (m, k) and (m,) ndarray
        ``β = β0 + lift z``.
    var_coef : (m, n) ndarray
        ``G ∘ G̃``: a coefficient's variance is ``Σ_p w_p var_coef[:, p]``.
    var_row : (K, n) ndarray
        ``G_i ∘ Ũ + U ∘ G̃_i`` with ``U = Σ_{i<K} G_i`` (free models).
    var_total : (n,) ndarray
        ``U ∘ Ũ`` (free models).
    kind : int
        :data:`MIX_TWO`, :data:`MIX_MANY` or :data:`FREE`.
    n_references : int
        K.
    robust : bool
        Sandwich (``w_p = r_p²``) or textbook (``w_p = 1``, times SSR).
    scale : float
        ``n/(n − k)`` (sandwich) or ``1/(n − k)``; NaN for an exact fit.
    dtype : dtype
        The working dtype, of :attr:`working`.
    """

    index: NDArray[np.int64]
    centre: NDArray[np.float64]
    basis: NDArray[np.float64]
    lift: NDArray[np.float64]
    beta0: NDArray[np.float64]
    var_coef: NDArray[np.float64]
    var_row: NDArray[np.float64]
    var_total: NDArray[np.float64]
    kind: int
    n_references: int
    robust: bool
    scale: float
    dtype: np.dtype

    @property
    def working(self) -> tuple[NDArray, ...]:
        """``centre``, ``basis``, ``var_coef``, ``var_row``, ``var_total``.

        In the working dtype (compiled sums of a slice's few values in
        float32 keep the digits of the other passes' sums).
        """
        cached = self.__dict__.get('_working')
        if cached is None:
            names = ('centre', 'basis', 'var_coef', 'var_row', 'var_total')
            cached = tuple(
                np.ascontiguousarray(getattr(self, name), dtype=self.dtype)
                for name in names
            )
            object.__setattr__(self, '_working', cached)
        return cached


def make_maps(design, smooth: NDArray | None) -> PixelMaps:
    """Return the maps of :func:`fit_pixels` for a design.

    Parameters
    ----------
    design : Design
        The shared design.
    smooth : (k, n_ref) ndarray or None
        ``ρ ⋆ q`` of each basis vector (flat, float64) for the sandwich;
        None for textbook errors.
    """
    model = design.model
    k, big_k = design.k, model.n_references
    fitted = design.mask
    index = (
        np.arange(design.centre.size, dtype=np.int64)
        if fitted is None
        else np.flatnonzero(fitted.reshape(-1)).astype(np.int64)
    )
    # the working-dtype basis, as the sums of the other passes use it
    basis = design.basis.astype(np.float64)
    lift = model.expand @ design.tri_inv
    g = lift @ basis[:, index]
    g_smooth = g if smooth is None else lift @ smooth[:, index]
    u, u_smooth = g[:big_k].sum(axis=0), g_smooth[:big_k].sum(axis=0)
    n = design.n_pixels
    dof = n - k
    robust = smooth is not None
    scale = math.nan
    if dof > 0:
        scale = n / dof if robust else 1.0 / dof
    if model.name == 'mix':
        kind = MIX_TWO if big_k == 2 else MIX_MANY
    else:
        kind = FREE
    return PixelMaps(
        index=index,
        centre=design.centre[index].astype(np.float64),
        basis=np.ascontiguousarray(basis[:, index]),
        lift=np.ascontiguousarray(lift),
        beta0=model.beta0.astype(np.float64),
        var_coef=np.ascontiguousarray(g * g_smooth),
        var_row=np.ascontiguousarray(
            g[:big_k] * u_smooth + u * g_smooth[:big_k]
        ),
        var_total=u * u_smooth,
        kind=kind,
        n_references=big_k,
        robust=robust,
        scale=scale,
        dtype=design.dtype,
    )


@dataclass(frozen=True)
class PixelOutputs:
    """The reported per-slice arrays, preallocated, ``(n_slices, ...)``.

    ``fractions`` and ``fractions_stderr`` are ``coef`` and ``stderr``
    themselves for a mix of more than two references; ``x`` and
    ``x_stderr`` are views of their first column (every array written is
    a large share of the fit's time).
    """

    coef: NDArray[np.float64]
    stderr: NDArray[np.float64]
    fractions: NDArray[np.float64]
    fractions_stderr: NDArray[np.float64]
    x: NDArray[np.float64]
    x_stderr: NDArray[np.float64]
    r2: NDArray[np.float64]
    rmse: NDArray[np.float64]

    @classmethod
    def empty(cls, n_slices: int, maps: PixelMaps) -> PixelOutputs:
        """Uninitialised outputs (every slice's rows get written)."""
        m, big_k = maps.lift.shape[0], maps.n_references
        coef, stderr = np.empty((n_slices, m)), np.empty((n_slices, m))
        share = maps.kind == MIX_MANY
        fractions = coef if share else np.empty((n_slices, big_k))
        fractions_stderr = stderr if share else np.empty((n_slices, big_k))
        return cls(
            coef=coef,
            stderr=stderr,
            fractions=fractions,
            fractions_stderr=fractions_stderr,
            x=fractions[:, 0],
            x_stderr=fractions_stderr[:, 0],
            r2=np.empty(n_slices),
            rmse=np.empty(n_slices),
        )

    def rows(self, start: int, stop: int) -> PixelOutputs:
        """Return the outputs of slices ``start:stop`` (views)."""
        return PixelOutputs(
            **{
                name: value[start:stop]
                for name, value in self.__dict__.items()
            }
        )

    def arrays(self, lead_shape) -> dict[str, NDArray]:
        """Return the arrays of :func:`.assemble.stats_arrays`, shaped."""
        out = dict(self.__dict__)
        out['at_bound'] = np.zeros(len(self.x), bool)
        return {
            key: value.reshape(tuple(lead_shape) + value.shape[1:])
            for key, value in out.items()
        }


def fit_pixels(y: NDArray, maps: PixelMaps, out: PixelOutputs) -> None:
    """Fit each row of ``y`` and write its numbers into ``out`` (numpy).

    Parameters
    ----------
    y : (rows, n_ref) ndarray
        Whole slices as stored (any real dtype).
    maps : PixelMaps
        The design's maps.
    out : PixelOutputs
        Rows matching ``y``'s.
    """
    with np.errstate(invalid='ignore', over='ignore', divide='ignore'):
        _fit_pixels(y, maps, out)


def _fit_pixels(y, maps, out) -> None:
    n = maps.index.size
    yc = y[:, maps.index].astype(np.float64) - maps.centre
    z = yc @ maps.basis.T
    resid = yc - z @ maps.basis
    ssr = np.einsum('ij,ij->i', resid, resid)
    values = yc + maps.centre
    spread = values - values.mean(axis=1, keepdims=True)
    sst = np.einsum('ij,ij->i', spread, spread)
    np.add(maps.beta0, z @ maps.lift.T, out=out.coef)
    if maps.robust:
        weights, factor = np.square(resid), maps.scale
    else:
        weights, factor = np.ones_like(resid), (maps.scale * ssr)[:, None]
    var = factor * (weights @ maps.var_coef.T)
    np.sqrt(np.maximum(var, 0.0), out=out.stderr)
    if maps.kind == MIX_TWO:
        out.fractions[:, 0] = out.coef[:, 0]
        out.fractions[:, 1] = 1.0 - out.coef[:, 0]
        out.fractions_stderr[:] = out.stderr[:, :1]
    elif maps.kind == FREE:
        a = out.coef[:, : maps.n_references]
        total = a.sum(axis=1, keepdims=True)
        f = a / total
        var_f = factor * (
            weights @ maps.var_coef[: maps.n_references].T
            - f * (weights @ maps.var_row.T)
            + f * f * (weights @ maps.var_total)[:, None]
        )
        out.fractions[:] = f
        var_f /= total * total
        np.sqrt(np.maximum(var_f, 0.0), out=out.fractions_stderr)
    out.r2[:] = np.where(sst > 0, 1.0 - ssr / sst, math.nan)
    out.rmse[:] = np.sqrt(ssr / n)
