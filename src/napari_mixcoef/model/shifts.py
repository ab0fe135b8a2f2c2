"""The maths of a slice's translation estimated with its mix.

A slice ``y`` shifted by ``s`` (``y(q) = m(q − s)``, the convention of
``scipy.ndimage.shift(m, s)``) is read at an integer offset ``n`` (a pure
re-index: its noise is untouched) and compared with the references
shifted by the rest, ``f = s − n`` (|f| ≤ ½).  ``f`` is binned to
``1/BINS`` pixel: each bin has one shared design of the references
shifted by the bin's centre ``f0`` and their derivatives with respect to
the shift, columns ``[R_k, ∂_1 R_k, …, ∂_d R_k, 1]``, so that to first
order in ``δ = f − f0`` (|δ| ≤ 1/(2·BINS))

    m(p − f) ≈ Σ_k w_k R_k^{f0}(p) + Σ_j δ_j Σ_k w_k ∂_j R_k^{f0}(p) + c,

a vector ``v(θ, δ) = [w, δ_1 w, …, δ_d w, c]`` on the shared columns
(the bins' designs are made in :mod:`.bins`).  One pass of products
``Bᵀy`` per slice then gives everything: the joint least-squares fit
of the model's parameters ``θ`` and of ``δ`` is a small Gauss–Newton
problem on the sums (:func:`joint_fit`), and its covariance comes from
the same Jacobian (:func:`joint_covariance`).
The neglected second order, ``½δ²∂²m``, is below a thousandth of the
image's curvature at 8 bins per pixel.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from .bins import BINS, BinDesign, ShiftedDesigns
from .spatial import unpack

__all__ = [
    'BINS',
    'BinDesign',
    'ShiftedDesigns',
    'joint_covariance',
    'joint_fit',
    'structure_z',
]

#: Gauss–Newton iterations on the sums of one pass, at most.
ITERATIONS = 6


def split_shift(
    shift: NDArray, bins: int = BINS
) -> tuple[NDArray, NDArray, NDArray]:
    """Split shifts into integer offsets, bin keys and the rest.

    Parameters
    ----------
    shift : (m, d) ndarray of float64
    bins : int, optional
        Bins per pixel (a divisor of :data:`BINS`).

    Returns
    -------
    offset : (m, d) ndarray of int64
        ``n``, the integer part the slice is read at.
    key : (m, d) ndarray of int64
        The bin of ``f0 = key / bins``, ``−bins/2 ≤ key < bins/2``.
    delta : (m, d) ndarray of float64
        ``s − n − f0``.
    """
    binned = np.rint(shift * bins)
    # half-open keys: f0 = ±½ would be two bins of one fraction
    offset = np.floor((binned + bins // 2) / bins)
    key = binned - offset * bins
    delta = shift - binned / bins
    return offset.astype(np.int64), key.astype(np.int64), delta


def _vector(theta, delta, model) -> NDArray:
    """``v(θ, δ)`` on the shared columns, ``(m, P)``."""
    w = model.weight0 + theta @ model.weight_map.T
    parts = [w] + [delta[:, j : j + 1] * w for j in range(delta.shape[1])]
    parts.append(_offset(theta, model)[:, None])
    return np.concatenate(parts, axis=1)


def _offset(theta, model) -> NDArray:
    if model.name == 'offset':
        return theta[:, model.n_references]
    return np.zeros(len(theta))


def _jacobian(theta, delta, model) -> NDArray:
    """``∂v/∂(θ, δ)``, ``(m, P, k + d)``."""
    m, d = delta.shape
    big_k, k = model.n_references, model.k
    w = model.weight0 + theta @ model.weight_map.T
    jac = np.zeros((m, big_k * (1 + d) + 1, k + d))
    jac[:, :big_k, :k] = model.weight_map
    for j in range(d):
        rows = slice(big_k * (1 + j), big_k * (2 + j))
        jac[:, rows, :k] = delta[:, j, None, None] * model.weight_map
        jac[:, rows, k + j] = w
    if model.name == 'offset':
        jac[:, -1, big_k] = 1.0
    return jac


def joint_fit(
    b: NDArray,
    yy: NDArray,
    gram: NDArray,
    model,
    delta0: NDArray,
    settled: float = 1e-9,
) -> tuple[NDArray, NDArray, NDArray, NDArray]:
    """Least squares of ``θ`` and ``δ`` from one bin's sums.

    Parameters
    ----------
    b : (m, P) ndarray of float64
        ``Bᵀy`` of each slice over the fitted pixels.
    yy : (m,) ndarray
        ``Σy²``.
    gram : (m, P, P) ndarray
        ``BᵀB`` of each slice's bin.
    model : Model
        The model (its weights ``w = w0 + Wθ``).
    delta0 : (m, d) ndarray
        Where to start: the previous estimate's ``δ``.
    settled : float, optional
        The iterations stop once every slice's step is below this
        (pixels; relative for ``θ``), or after :data:`ITERATIONS`.

    Returns
    -------
    theta : (m, k) ndarray
    delta : (m, d) ndarray
    ssr : (m,) ndarray
    hessian : (m, k + d, k + d) ndarray
        ``JᵀBᵀBJ`` at the solution (Gauss–Newton's).
    """
    k = model.k
    delta = np.array(delta0, np.float64)
    theta = np.zeros((len(b), k))
    # θ first with δ held: the model is linear in θ there
    jac = _jacobian(theta, delta, model)[..., :k]
    v0 = _vector(theta, delta, model)
    lhs = _quadratic(jac, gram)
    rhs = np.einsum('mpa,mp->ma', jac, b - _apply(gram, v0))
    with np.errstate(invalid='ignore', divide='ignore', over='ignore'):
        theta = _solve(lhs, rhs)
        for _ in range(ITERATIONS):
            jac = _jacobian(theta, delta, model)
            v = _vector(theta, delta, model)
            hess = _quadratic(jac, gram)
            grad = np.einsum('mpa,mp->ma', jac, b - _apply(gram, v))
            step = _solve(hess, grad)
            # a step beyond half a pixel leaves the linear model's reach
            step[:, k:] = np.clip(step[:, k:], -0.5, 0.5)
            theta = theta + step[:, :k]
            delta = delta + step[:, k:]
            if _settled(step, theta, k, settled):
                break
        v = _vector(theta, delta, model)
        jac = _jacobian(theta, delta, model)
        hess = _quadratic(jac, gram)
        ssr = yy - 2 * np.einsum('mp,mp->m', v, b)
        ssr += np.einsum('mp,mp->m', v, _apply(gram, v))
    return theta, delta, np.maximum(ssr, 0.0), hess


def _settled(step: NDArray, theta: NDArray, k: int, tol: float) -> bool:
    """Whether every slice's last step was below ``tol``."""
    size = np.abs(step)
    if not np.isfinite(size).any():
        return True
    scale = 1.0 + np.abs(theta)
    return bool(
        np.nanmax(size[:, k:], initial=0.0) <= tol
        and np.nanmax(size[:, :k] / scale, initial=0.0) <= tol
    )


def _quadratic(jac: NDArray, gram: NDArray) -> NDArray:
    """``JᵀGJ`` per slice, ``(m, f, f)``."""
    return np.matmul(np.swapaxes(jac, 1, 2), np.matmul(gram, jac))


def _apply(gram: NDArray, v: NDArray) -> NDArray:
    """``G v`` per slice, ``(m, P)``."""
    return np.matmul(gram, v[:, :, None])[..., 0]


def _solve(lhs: NDArray, rhs: NDArray) -> NDArray:
    """``lhs⁻¹ rhs`` per slice; NaN where a slice's matrix is singular."""
    out = np.full(rhs.shape, np.nan)
    ok = np.isfinite(lhs).all(axis=(1, 2)) & np.isfinite(rhs).all(axis=1)
    if ok.any():
        try:
            out[ok] = np.linalg.solve(lhs[ok], rhs[ok, :, None])[..., 0]
        except np.linalg.LinAlgError:
            out[ok] = (np.linalg.pinv(lhs[ok]) @ rhs[ok, :, None])[..., 0]
    return out


def joint_meat(
    r2: NDArray, terms: NDArray, theta, delta, model
) -> NDArray[np.float64]:
    """Return the sandwich's middle ``JᵀΩ_BJ`` from squared residuals.

    Parameters
    ----------
    r2 : (m, n_fit) ndarray
        Squared residuals over the fitted pixels.
    terms : (P(P+1)/2, n_fit) ndarray
        :meth:`BinDesign.terms`.
    theta, delta : ndarray
        The fit.

    Returns
    -------
    (m, k + d, k + d) ndarray
    """
    return meat_of(r2 @ terms.T, theta, delta, model)


def meat_of(sums: NDArray, theta, delta, model) -> NDArray[np.float64]:
    """``JᵀΩ_BJ`` from the sums ``Σ_p r_p² terms[:, p]``, ``(m, T)``."""
    width = _vector(theta[:1], delta[:1], model).shape[1]
    omega = unpack(sums, width)
    return _quadratic(_jacobian(theta, delta, model), omega)


def joint_covariance(
    hessian: NDArray, ssr: NDArray, n: int, meat: NDArray | None = None
) -> NDArray[np.float64]:
    """Covariance of ``(θ, δ)``: textbook, or the sandwich with ``meat``.

    ``σ̂²H⁻¹`` with ``σ̂² = SSR/(n − f)``, or ``H⁻¹ Ω H⁻¹ · n/(n − f)``
    (the scale of the coefficients' own errors), ``f = k + d``.
    """
    f = hessian.shape[-1]
    dof = n - f
    inv = np.full(hessian.shape, np.nan)
    ok = np.isfinite(hessian).all(axis=(1, 2))
    if ok.any():
        inv[ok] = np.linalg.pinv(hessian[ok], hermitian=True)
    if dof <= 0:
        return inv * np.nan
    if meat is None:
        return inv * (ssr / dof)[:, None, None]
    return inv @ meat @ inv * (n / dof)


def structure_z(
    b: NDArray, gram: NDArray, ssr: NDArray, theta, delta, model, n: int
) -> NDArray[np.float64]:
    """How far each slice's structure stands out of its noise.

    ``⟨y − ȳ, m − m̄⟩ / (σ̂ ‖m − m̄‖)``: of the order of ``‖m − m̄‖/σ``
    for a slice that holds the model's pattern, a standard normal one
    for pure noise (whatever the model makes of it).
    """
    v = _vector(theta, delta, model)
    total_y = b[:, -1]
    total_m = np.einsum('mp,mp->m', v, gram[:, :, -1])
    cross = np.einsum('mp,mp->m', v, b) - total_y * total_m / n
    norm2 = np.einsum('mp,mp->m', v, _apply(gram, v)) - total_m**2 / n
    sigma = np.sqrt(ssr / max(n - 1, 1))
    with np.errstate(invalid='ignore', divide='ignore'):
        return cross / (sigma * np.sqrt(np.maximum(norm2, 0.0)))


def correction_coef(theta, delta, model) -> NDArray:
    """Weights of :func:`correction_rows` that register the rest ``f``.

    ``m̂(p) − m̂(p − f) = Σ_k ŵ_k (R_k − R_k^{f0}) − Σ_j δ_j Σ_k ŵ_k
    ∂_jR_k^{f0}``: noise-free, from the references and the fit alone;
    ``[ŵ, −δ_1ŵ, …, −δ_dŵ]``, ``(m, K(1 + d))``.
    """
    w = model.weight0 + theta @ model.weight_map.T
    parts = [w] + [-delta[:, j : j + 1] * w for j in range(delta.shape[1])]
    return np.concatenate(parts, axis=1)


def correction_rows(design: BinDesign, out: NDArray | None = None) -> NDArray:
    """``[R_k − R_k^{f0}, ∂_1R_k^{f0}, …]`` over the box, ``(K(1+d), n)``.

    Written into ``out`` (any float dtype) when given.
    """
    k = design.plain.shape[0]
    if out is None:
        out = np.empty((len(design.columns) - 1, design.columns.shape[1]))
    # straight into ``out`` (no float64 image of the bin's move)
    np.subtract(design.plain, design.columns[:k], out=out[:k])
    out[k:] = design.columns[k:-1]
    return out


def box_of(shape, low: NDArray, high: NDArray) -> tuple[slice, ...]:
    """Return the reference pixels that every slice covers.

    ``low``/``high`` (d,) are the most negative and most positive integer
    offsets; one more pixel each side keeps the references' fractional
    shift inside their grid.
    """
    box = []
    for size, lo, hi in zip(shape, low, high):
        a = int(max(0, -lo)) + 1
        b = size - int(max(0, hi)) - 1
        if b - a < 4:
            raise ValueError(
                f'a shift of {max(-lo, hi)} pixels leaves no pixels of '
                f'an axis of {size} to fit; lower max_shift'
            )
        box.append(slice(a, b))
    return tuple(box)


def margin_ok(offset: NDArray, box, shape) -> NDArray[np.bool_]:
    """Whether each slice read at ``offset`` stays inside the box's reach."""
    ok = np.ones(len(offset), bool)
    for j, (part, size) in enumerate(zip(box, shape)):
        ok &= offset[:, j] >= -part.start
        ok &= offset[:, j] <= size - part.stop
    return ok


def shifted_images(images: NDArray, shift: NDArray | None) -> NDArray:
    """Each image moved by its shift, as ``scipy.ndimage.shift`` moves it.

    Parameters
    ----------
    images : (..., *shape) ndarray
        Model images, one per slice.
    shift : (..., d) ndarray or None
        Their shifts (NaN: left where it is); None: no shift at all.

    Returns
    -------
    (..., *shape) ndarray
        Cubic spline, edges continued by the nearest pixel.
    """
    if shift is None:
        return images
    d = shift.shape[-1]
    flat = images.reshape((-1, *images.shape[images.ndim - d :]))
    moves = np.asarray(shift, np.float64).reshape(-1, d)
    out = np.empty_like(flat)
    for i, (image, move) in enumerate(zip(flat, moves)):
        if np.isfinite(move).all() and move.any():
            out[i] = ndimage.shift(image, move, order=3, mode='nearest')
        else:
            out[i] = image
    return out.reshape(images.shape)
