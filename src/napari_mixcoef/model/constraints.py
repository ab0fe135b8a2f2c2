"""Non-negative and fully constrained fits in the basis coordinates.

``constraint="nonneg"`` holds each reference's weight ``w = w0 + Wθ`` at
or above zero: the fractions of the mix model (which also sum to one, so
that is fully constrained least squares) or the ``a_k`` of the scaled and
offset models (``c`` stays free).  In the coordinates ``z = Tθ`` of the
orthonormal basis those are ``K`` linear inequalities ``C z ≥ d`` shared
by every slice, and a slice's fit is the small quadratic program

    minimise ½ zᵀ B z − bᵀ z   subject to   C z ≥ d,

with ``B = I`` and ``b = g[:k]`` for least squares (its objective differs
from ``½‖y_c − Q_k z‖²`` by a constant: the minimiser is exact) and the
weighted Gram matrix for an IRLS step.  :func:`solve` finds it exactly by
visiting the faces of the feasible set, fewest active constraints first,
vectorized over slices: a slice is done at the first face whose solution
is feasible with non-negative multipliers (the KKT point of a strictly
convex problem is unique).  Most slices are done at the first face, the
unconstrained fit.
"""

from __future__ import annotations

import itertools

import numpy as np
from numpy.typing import NDArray

__all__ = ['CONSTRAINTS', 'check_constraint', 'constraint_rows', 'solve']

#: Constraints a fit can take (None: unconstrained).
CONSTRAINTS = ('nonneg',)

#: Relative slack of the feasibility and multiplier tests.
_TOL = 1e-9


def check_constraint(constraint) -> None:
    """Raise ValueError for an unknown constraint."""
    if constraint is not None and constraint not in CONSTRAINTS:
        raise ValueError(
            f'unknown constraint {constraint!r}; use None (unconstrained) '
            'or "nonneg"'
        )


def constraint_rows(design) -> tuple[NDArray, NDArray]:
    """``C`` (K, k) and ``d`` (K,) of ``C z ≥ d`` for a design.

    ``w = w0 + W T⁻¹ z ≥ 0``: ``C = W T⁻¹``, ``d = −w0``.
    """
    model = design.model
    return model.weight_map @ design.tri_inv, -model.weight0


def free_directions(c: NDArray, active: NDArray) -> NDArray:
    """Orthonormal basis ``(k, f)`` of the directions the active rows keep.

    Parameters
    ----------
    c : (K, k) ndarray
        The constraint rows.
    active : (K,) ndarray of bool
        Which hold with equality.
    """
    k = c.shape[1]
    rows = c[active]
    if rows.shape[0] == 0:
        return np.eye(k)
    _, s, vt = np.linalg.svd(rows)
    rank = int(np.sum(s > _TOL * max(1.0, s[0])))
    return vt[rank:].T


def _faces(n_constraints: int, k: int):
    """Active sets by size: none, then every one, pair, … up to k."""
    for size in range(min(n_constraints, k) + 1):
        yield from itertools.combinations(range(n_constraints), size)


def solve(
    b: NDArray,
    c: NDArray,
    d: NDArray,
    bread: NDArray | None = None,
) -> tuple[NDArray, NDArray]:
    """Solve each slice's quadratic program exactly.

    Parameters
    ----------
    b : (n, k) ndarray
        Linear terms (least squares: ``g[:k]``).
    c, d : (K, k) and (K,) ndarray
        Constraints ``C z ≥ d``, shared by every slice.
    bread : (n, k, k) ndarray, optional
        Quadratic terms (None: the identity).

    Returns
    -------
    z : (n, k) ndarray
        The minimisers.
    active : (n, K) ndarray of bool
        Which constraints hold with equality there.
    """
    n, k = b.shape
    n_con = c.shape[0]
    if bread is None:
        # most slices are inside: their least-squares fit is the answer
        inside = _feasible(b, c, d)
        if inside.all():
            return b.copy(), np.zeros((n, n_con), bool)
        if inside.any():
            z = b.copy()
            active = np.zeros((n, n_con), bool)
            rest = np.flatnonzero(~inside)
            z[rest], active[rest] = _solve_faces(b[rest], c, d, None, 1)
            return z, active
    return _solve_faces(b, c, d, bread, 0)


def _feasible(z: NDArray, c: NDArray, d: NDArray) -> NDArray[np.bool_]:
    """Which rows of ``z`` satisfy ``C z ≥ d`` (to rounding)."""
    slack = z @ c.T - d
    scale = np.abs(z) @ np.abs(c).T + np.abs(d) + 1e-300
    return np.all(slack >= -_TOL * scale, axis=1)


def _solve_faces(b, c, d, bread, first: int):
    """Search the faces for :func:`solve`, from face ``first`` on."""
    n, k = b.shape
    n_con = c.shape[0]
    z = np.zeros((n, k))
    active = np.zeros((n, n_con), bool)
    todo = np.isfinite(b).all(axis=1)
    if bread is not None:
        todo &= np.isfinite(bread).all(axis=(1, 2))
        inv = np.full((n, k, k), np.nan)
        inv[todo] = np.linalg.pinv(bread[todo], hermitian=True)
    z[~todo] = np.nan
    # a fallback for rounding-degenerate slices: the best feasible face
    best = np.full(n, np.inf)
    best_z = np.full((n, k), np.nan)
    best_active = np.zeros((n, n_con), bool)
    for face in itertools.islice(_faces(n_con, k), first, None):
        if not todo.any():
            break
        rows = np.flatnonzero(todo)
        bb = b[rows]
        ca = c[list(face)]
        if bread is None:
            cand, lam = _face_identity(bb, ca, d[list(face)])
            quad = np.einsum('ij,ij->i', cand, cand)
        else:
            ii = inv[rows]
            cand, lam = _face_bread(bb, ii, ca, d[list(face)])
            quad = np.einsum('ij,ijk,ik->i', cand, bread[rows], cand)
        slack = cand @ c.T - d  # (m, K)
        # rounding of the fit's own size: a fit at zero keeps b's
        size = np.abs(cand) + np.abs(bb)
        scale = size @ np.abs(c).T + np.abs(d) + 1e-300
        feasible = np.all(slack >= -_TOL * scale, axis=1)
        lam_scale = np.abs(bb).sum(axis=1, keepdims=True) + 1e-300
        optimal = feasible & np.all(lam >= -_TOL * lam_scale, axis=1)
        objective = 0.5 * quad - np.einsum('ij,ij->i', bb, cand)
        mask = np.zeros(n_con, bool)
        mask[list(face)] = True
        better = feasible & (objective < best[rows])
        best[rows[better]] = objective[better]
        best_z[rows[better]] = cand[better]
        best_active[rows[better]] = mask
        done = rows[optimal]
        z[done] = cand[optimal]
        active[done] = mask
        todo[done] = False
    rest = np.flatnonzero(todo)
    z[rest] = best_z[rest]
    active[rest] = best_active[rest]
    return z, active


def _face_identity(b, ca, da):
    """Minimiser of ``½‖z − b‖²`` with ``C_A z = d_A``, and multipliers."""
    if ca.shape[0] == 0:
        return b.copy(), np.zeros((len(b), 0))
    gram = ca @ ca.T
    rhs = da[None, :] - b @ ca.T  # (m, a)
    lam = np.linalg.lstsq(gram, rhs.T, rcond=None)[0].T
    return b + lam @ ca, lam


def _face_bread(b, inv, ca, da):
    """Minimiser of ``½zᵀBz − bᵀz`` with ``C_A z = d_A``, and multipliers."""
    free = np.einsum('mij,mj->mi', inv, b)
    if ca.shape[0] == 0:
        return free, np.zeros((len(b), 0))
    cinv = np.einsum('aj,mjk->mak', ca, inv)  # C_A B⁻¹
    gram = cinv @ ca.T  # (m, a, a)
    rhs = da[None, :] - free @ ca.T
    lam = np.linalg.solve(gram, rhs[..., None])[..., 0]
    z = free + np.einsum('mak,ma->mk', cinv, lam)
    return z, lam
