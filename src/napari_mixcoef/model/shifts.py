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

a vector ``v(θ, δ) = [w, δ_1 w, …, δ_d w, c]`` on the shared columns.
One pass of products ``Bᵀy`` per slice then gives everything: the joint
least-squares fit of the model's parameters ``θ`` and of ``δ`` is a
small Gauss–Newton problem on the sums (:func:`joint_fit`), and its
covariance comes from the same Jacobian (:func:`joint_covariance`).
The neglected second order, ``½δ²∂²m``, is below a thousandth of the
image's curvature at 8 bins per pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from .spatial import sandwich_terms, smoothed, unpack

__all__ = [
    'BINS',
    'BinDesign',
    'ShiftedDesigns',
    'joint_covariance',
    'joint_fit',
    'structure_z',
]

#: Bins per pixel of the fractional shift (see the module notes).
BINS = 8
#: Gauss–Newton iterations on the sums of one pass.
ITERATIONS = 6


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
        # rows: R_k, then ∂_1 R_k for every k, …, then the constant
        rows = [np.stack([e[j] for e in each]) for j in range(self.ndim + 1)]
        rows.append(np.ones((1, rows[0].shape[1])))
        columns = np.vstack(rows)
        if len(self.fitted) == columns.shape[1]:
            part = columns
        else:
            part = np.ascontiguousarray(columns[:, self.fitted])
        return BinDesign(
            f0=f0,
            columns=columns,
            fitted=self.fitted,
            gram=np.dot(part, part.T),
            moved=self._plain - rows[0],
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


def split_shift(shift: NDArray) -> tuple[NDArray, NDArray, NDArray]:
    """Split shifts into integer offsets, bin keys and the rest.

    Parameters
    ----------
    shift : (m, d) ndarray of float64

    Returns
    -------
    offset : (m, d) ndarray of int64
        ``n``, the integer part the slice is read at.
    key : (m, d) ndarray of int64
        The bin of ``f0 = key / BINS`` (|f0| ≤ ½).
    delta : (m, d) ndarray of float64
        ``s − n − f0``.
    """
    binned = np.rint(shift * BINS)
    offset = np.rint(binned / BINS)
    key = binned - offset * BINS
    delta = shift - binned / BINS
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
        v = _vector(theta, delta, model)
        jac = _jacobian(theta, delta, model)
        hess = _quadratic(jac, gram)
        ssr = yy - 2 * np.einsum('mp,mp->m', v, b)
        ssr += np.einsum('mp,mp->m', v, _apply(gram, v))
    return theta, delta, np.maximum(ssr, 0.0), hess


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
    jac = _jacobian(theta, delta, model)
    return np.einsum('mpa,mpq,mqb->mab', jac, omega, jac)


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


def correction_rows(design: BinDesign) -> NDArray:
    """``[R_k − R_k^{f0}, ∂_1R_k^{f0}, …]`` over the box, ``(K(1+d), n)``."""
    k = design.moved.shape[0]
    return np.vstack([design.moved, design.columns[k:-1]])


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
