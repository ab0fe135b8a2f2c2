"""From each slice's fit in basis coordinates to the reported result.

The backends and the engine produce :class:`~.sums.SliceStats`: the fit
``z`` in the orthonormal basis and the pieces of its covariance.  Here
they become the model's coefficients, fractions and their errors through
``β = β0 + E T⁻¹ z`` and the delta method; where a constraint is active
the covariance is that of the fit on the free directions, and the
coefficients held at their bound get NaN errors.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from .constraints import constraint_rows, free_directions
from .sums import SliceStats, covariance_z

__all__ = ['coefficient_errors', 'stats_arrays']


def _diagonal_sqrt(cov: NDArray) -> NDArray:
    return np.sqrt(np.maximum(np.diagonal(cov, axis1=-2, axis2=-1), 0.0))


#: Slices mapped at a time by :func:`_linear_errors` (its temporaries stay
#: in the cache).
_CHUNK = 1 << 15


def coefficient_errors(design, stats: SliceStats) -> dict[str, NDArray]:
    """Coefficients, fractions and their errors of every slice.

    Returns
    -------
    dict
        ``coef``, ``stderr`` (n, m); ``fractions``, ``fractions_stderr``
        (n, K); ``at_bound`` (n,) bool.
    """
    unconstrained = stats.active is None or not stats.active.any()
    if stats.bread is None and unconstrained:
        return _linear_errors(design, stats)
    return _matrix_errors(design, stats)


def _packed_map(left: NDArray, right: NDArray, k: int) -> NDArray:
    """``(P, r)``: row ``i`` of ``left Ω rightᵀ``'s diagonal from packed Ω.

    For symmetric ``Ω`` packed as its upper triangle (P values), ``Σ_ab
    left_ia Ω_ab right_ib`` is ``packed @ M`` with this ``M``.
    """
    a, b = np.triu_indices(k)
    both = left[:, a] * right[:, b] + left[:, b] * right[:, a]
    both[:, a == b] *= 0.5
    return both.T


def _linear_errors(design, stats: SliceStats) -> dict[str, NDArray]:
    """Map unconstrained least-squares fits, without per-slice matrices.

    The covariance of ``z`` is the packed meat times one number, so every
    variance wanted (of the coefficients, and the pieces of the fractions')
    is a fixed linear map of the packed meat: one small product per
    chunk of slices.
    """
    model = design.model
    k, m, big_k = model.k, model.m, model.n_references
    n_slices = stats.z.shape[0]
    lift = model.expand @ design.tri_inv  # (m, k): β = β0 + lift z
    dof = design.n_pixels - k
    scale = math.nan
    if dof > 0:
        scale = design.n_pixels / dof if stats.sandwich else 1.0 / dof
    var_coef = scale * _packed_map(lift, lift, k)  # (P, m)
    coef = np.empty((n_slices, m))
    stderr = np.empty((n_slices, m))
    mix = model.name == 'mix'
    if mix:  # the fractions are the coefficients (and 1 − x for two)
        fractions = coef if big_k > 2 else np.empty((n_slices, big_k))
        fractions_stderr = (
            stderr if big_k > 2 else np.empty((n_slices, big_k))
        )
    else:
        part = lift[:big_k]  # a = β0[:K] + part z
        sums = part.sum(axis=0, keepdims=True)  # Σ_i a_i
        var_diag = scale * _packed_map(part, part, k)
        var_row = scale * _packed_map(part, np.repeat(sums, big_k, 0), k)
        var_total = scale * _packed_map(sums, sums, k)
        fractions = np.empty((n_slices, big_k))
        fractions_stderr = np.empty((n_slices, big_k))
    for start in range(0, n_slices, _CHUNK):
        rows = slice(start, start + _CHUNK)
        meat = stats.meat[rows]
        np.add(model.beta0, stats.z[rows] @ lift.T, out=coef[rows])
        stderr[rows] = np.sqrt(np.maximum(meat @ var_coef, 0.0))
        if mix:
            if big_k == 2:
                x = coef[rows, 0]
                fractions[rows, 0] = x
                fractions[rows, 1] = 1.0 - x
                fractions_stderr[rows] = stderr[rows, :1]  # both shares'
            continue
        a = coef[rows, :big_k]
        total = a.sum(axis=1, keepdims=True)
        with np.errstate(divide='ignore', invalid='ignore'):
            f = a / total
            var = (
                meat @ var_diag
                - 2.0 * f * (meat @ var_row)
                + f * f * (meat @ var_total)
            ) / (total * total)
        fractions[rows] = f
        fractions_stderr[rows] = np.sqrt(np.maximum(var, 0.0))
    return {
        'coef': coef,
        'stderr': stderr,
        'fractions': fractions,
        'fractions_stderr': fractions_stderr,
        'at_bound': np.zeros(n_slices, bool),
    }


def _matrix_errors(design, stats: SliceStats) -> dict[str, NDArray]:
    """Map fits through per-slice matrices (constraints, IRLS breads)."""
    model = design.model
    n_slices = stats.z.shape[0]
    lift = model.expand @ design.tri_inv  # (m, k)
    coef = model.beta0 + stats.z @ lift.T
    n = design.n_pixels
    cov_z = np.empty((n_slices, model.k, model.k))
    active = stats.active
    held = np.zeros((n_slices, model.n_references), bool)
    if active is None or not active.any():
        cov_z[:] = covariance_z(stats, n)
    else:
        held = active
        c, _ = constraint_rows(design)
        patterns, which = np.unique(active, axis=0, return_inverse=True)
        which = which.reshape(-1)
        for p, pattern in enumerate(patterns):
            rows = np.flatnonzero(which == p)
            part = _rows(stats, rows)
            free = None if not pattern.any() else free_directions(c, pattern)
            cov_z[rows] = covariance_z(part, n, free)
    cov = lift @ cov_z @ lift.T
    if held.any():
        coef = model.snap(coef, held)
    stderr = _diagonal_sqrt(cov)
    fractions, fcov = model.fractions(coef, cov)
    fractions_stderr = _diagonal_sqrt(fcov)
    if held.any():
        # a coefficient whose variance the free directions cannot reach is
        # held at its bound: its error is NaN, not 0
        stderr = np.where(model.held(held), np.nan, stderr)
        fractions_stderr = np.where(held, np.nan, fractions_stderr)
    return {
        'coef': coef,
        'stderr': stderr,
        'fractions': fractions,
        'fractions_stderr': fractions_stderr,
        'at_bound': held.any(axis=1),
    }


def _rows(stats: SliceStats, rows: NDArray) -> SliceStats:
    return SliceStats(
        z=stats.z[rows],
        ssr=stats.ssr[rows],
        sst=stats.sst[rows],
        meat=stats.meat[rows],
        bread=None if stats.bread is None else stats.bread[rows],
        sandwich=stats.sandwich,
        active=None if stats.active is None else stats.active[rows],
    )


def stats_arrays(design, stats: SliceStats, lead_shape) -> dict[str, NDArray]:
    """Every per-slice array of a :class:`~.result.MixFit`, shaped.

    Returns
    -------
    dict
        ``coef``, ``stderr``, ``fractions``, ``fractions_stderr`` of shape
        ``lead + (m,)`` / ``lead + (K,)``; ``x``, ``x_stderr``, ``r2``,
        ``rmse``, ``at_bound`` of shape ``lead``.
    """
    out = coefficient_errors(design, stats)
    n = design.n_pixels
    with np.errstate(divide='ignore', invalid='ignore'):
        r2 = np.where(stats.sst > 0, 1.0 - stats.ssr / stats.sst, math.nan)
        rmse = np.sqrt(stats.ssr / n)
    out['x'] = out['fractions'][:, 0]
    out['x_stderr'] = out['fractions_stderr'][:, 0]
    out['r2'] = r2
    out['rmse'] = rmse

    def shaped(v):
        v = np.ascontiguousarray(v)
        return v.reshape(tuple(lead_shape) + v.shape[1:])

    return {key: shaped(value) for key, value in out.items()}
