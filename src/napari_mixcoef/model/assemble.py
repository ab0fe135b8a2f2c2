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


def coefficient_errors(design, stats: SliceStats) -> dict[str, NDArray]:
    """Coefficients, fractions and their errors of every slice.

    Returns
    -------
    dict
        ``coef``, ``stderr`` (n, m); ``fractions``, ``fractions_stderr``
        (n, K); ``at_bound`` (n,) bool.
    """
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
