"""Per-slice estimators on a block of whole, centred slices.

Ordinary least squares with honest (sandwich) errors, Poisson maximum
likelihood and Huber's robust fit, the last two by iteratively reweighted
least squares (IRLS).  Every step is vectorized over the block's slices:
the per-slice weighted Gram matrices of all slices come from one matrix
product of the weights with the design's pairwise products.  Pure numpy;
:func:`fit_block` hands the cases it covers to the compiled per-slice
kernel of :mod:`napari_mixcoef._fused_irls`.

Notation: ``yc`` is the block centred on the mean reference ``M`` (zero
outside the mask), ``D`` the model's design (``n × k``), ``δ`` the
coefficients relative to those of ``M``; the model image is ``M + Dδ``.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ._spatial import pair_index, unpack

NOISE_MODELS = ('gaussian', 'poisson', 'huber')
STDERR_MODES = ('auto', 'ols')

#: Huber's tuning constant: 95 % efficiency for Gaussian noise.
HUBER_C = 1.345
#: A robust standard deviation from the median absolute residual.
MAD_SCALE = 1.4826
#: Residuals beyond this many robust standard deviations get zero weight
#: (a Gaussian pixel goes that far once in 500 million).
REJECT = 6.0


@dataclass(frozen=True)
class NoiseSpec:
    """How to weigh pixels and how to compute standard errors.

    Attributes
    ----------
    noise : {"gaussian", "poisson", "huber"}
        Noise model.
    stderr : {"auto", "ols"}
        ``"auto"``: sandwich estimator, robust to unequal variances and
        (with the spatial kernel) to correlated neighbours; ``"ols"``: the
        textbook formula.
    gain, camera_offset, read_noise : float
        Detector: counts per photon, counts at zero light, read noise in
        photons (Poisson noise only).
    iterations : int
        IRLS iterations for the Poisson and Huber models.
    """

    noise: str = 'gaussian'
    stderr: str = 'auto'
    gain: float = 1.0
    camera_offset: float = 0.0
    read_noise: float = 0.0
    iterations: int = 3


def check_spec(spec: NoiseSpec) -> None:
    """Raise ValueError for an unknown mode or an impossible detector."""
    if spec.noise not in NOISE_MODELS:
        raise ValueError(
            f'unknown noise model {spec.noise!r}; choose one of '
            + ', '.join(repr(m) for m in NOISE_MODELS)
        )
    if spec.stderr not in STDERR_MODES:
        raise ValueError(
            f'unknown stderr {spec.stderr!r}; choose "auto" or "ols"'
        )
    if not (math.isfinite(spec.gain) and spec.gain > 0):
        raise ValueError(
            f'gain must be a positive number of counts per photon, not '
            f'{spec.gain!r}'
        )
    if not math.isfinite(spec.camera_offset):
        raise ValueError(
            f'camera_offset must be finite, not {spec.camera_offset!r}'
        )
    if not (math.isfinite(spec.read_noise) and spec.read_noise >= 0):
        raise ValueError(
            f'read_noise must be >= 0 photons, not {spec.read_noise!r}'
        )
    if int(spec.iterations) < 1:
        raise ValueError('iterations must be at least 1')


@dataclass(frozen=True)
class BlockDesign:
    """What :func:`fit_block` needs of the design, in the working dtype.

    ``design_t`` is ``Dᵀ`` (k × n), ``pairs`` the products ``D_a D_b``
    (n × k(k+1)/2) for weighted Gram matrices, ``terms`` the sandwich terms
    (n × k(k+1)/2, see :mod:`napari_mixcoef._spatial`), ``centre`` is
    ``M`` (n), ``inside`` the indices of fitted pixels (None: all).
    """

    design_t: NDArray
    pairs: NDArray
    terms: NDArray | None
    centre: NDArray
    gram_inv: NDArray[np.float64]
    inside: NDArray | None
    n_pixels: int
    basis_t: NDArray  # (n, 3) F-ordered: u1, u2, 1 (zero outside the mask)
    transform: NDArray[np.float64]  # (3, k): D = basis · transform
    sample: NDArray  # ≤ 2048 fitted pixels' indices, for robust scales

    @property
    def k(self) -> int:
        return self.design_t.shape[0]

    @property
    def n_out(self) -> int:
        return output_width(self.k)


def output_width(k: int) -> int:
    """Numbers per slice returned by :func:`fit_block`."""
    return k + k * (k + 1) // 2 + 4


def split_output(out: NDArray, k: int):
    """``δ, cov, ssr, q, s, h2`` from :func:`fit_block`'s rows."""
    p = k * (k + 1) // 2
    delta = out[:, :k]
    cov = unpack(out[:, k : k + p], k)
    ssr, q, s, h2 = (out[:, k + p + j] for j in range(4))
    return delta, cov, ssr, q, s, h2


_LOCAL = threading.local()


def _scratch(name: str, like: NDArray) -> NDArray:
    """Return a per-thread work array shaped like ``like`` (reused).

    A fresh 1 MiB array costs its page faults on first write -- here more
    than the arithmetic of the pass that fills it.
    """
    arrays = getattr(_LOCAL, 'arrays', None)
    if arrays is None:
        arrays = _LOCAL.arrays = {}
    key = (name, like.shape, like.dtype.str)
    out = arrays.get(key)
    if out is None:
        if len(arrays) > 16:  # block shapes changed: start afresh
            arrays.clear()
        out = arrays[key] = np.empty_like(like)
    return out


def _gram(weights: NDArray, bd: BlockDesign) -> NDArray[np.float64]:
    """Per-slice ``Dᵀ W D`` for weights of shape (m, n): (m, k, k)."""
    return unpack(np.dot(weights, bd.pairs).astype(np.float64), bd.k)


def _solve(gram: NDArray, rhs: NDArray) -> NDArray[np.float64]:
    try:
        return np.linalg.solve(gram, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return np.einsum('mij,mj->mi', np.linalg.pinv(gram), rhs)


def _median_abs(r: NDArray, bd: BlockDesign) -> NDArray[np.float64]:
    """Robust residual scale per slice (MAD), over the fitted pixels."""
    # a spread-out sample of ≤ 2048 fitted pixels is plenty for a scale;
    # a partition is 10× faster than np.median here
    sample = np.abs(r[:, bd.sample])
    middle = sample.shape[1] // 2
    sample.partition(middle, axis=1)
    mad = sample[:, middle].astype(np.float64) * MAD_SCALE
    return np.maximum(mad, np.finfo(np.float32).tiny)


def fit_block(yc: NDArray, bd: BlockDesign, spec: NoiseSpec) -> NDArray:
    """Fit each slice of a block; return ``(m, n_out)`` float64 rows.

    The compiled per-slice kernel of :mod:`napari_mixcoef._fused_irls`
    where it covers the case (one coefficient, numba present), else
    :func:`fit_block_numpy`; both give the same rows (see its tests).
    """
    from ._fused_irls import fit_block_fused  # it imports this module

    out = fit_block_fused(yc, bd, spec)
    return fit_block_numpy(yc, bd, spec) if out is None else out


def fit_block_numpy(yc: NDArray, bd: BlockDesign, spec: NoiseSpec) -> NDArray:
    """Fit each slice of a block with numpy; see :func:`fit_block`.

    Parameters
    ----------
    yc : (m, n) ndarray
        Whole slices centred on ``M``, working dtype, zero outside the mask.
    bd : BlockDesign
        The shared design.
    spec : NoiseSpec
        Noise model and standard-error mode.

    Returns
    -------
    (m, output_width(k)) ndarray of float64
        Per slice: ``δ`` (k), the covariance of ``δ`` (upper triangle),
        ``SSR = Σ r²`` (unweighted), ``Σ yc²``, ``Σ yc`` and ``u2ᵀ yc``
        (for the centred total sum of squares).
    """
    # NaN or inf in the data propagate silently here; the caller checks
    # Σy² of every slice and names the first bad one.
    with np.errstate(invalid='ignore', over='ignore', divide='ignore'):
        return _fit_block(yc, bd, spec)


def _model_into(delta: NDArray, bd: BlockDesign, out: NDArray) -> NDArray:
    """``D δ`` per slice into ``out`` (m, n), without temporaries.

    OpenBLAS is 3× slower for a GEMM with an inner dimension of 1 than a
    broadcast product; from 2 on, the GEMM is the faster.
    """
    delta = np.ascontiguousarray(delta, dtype=out.dtype)
    if bd.k == 1:
        return np.multiply(delta, bd.design_t[0], out=out)
    return np.dot(delta, bd.design_t, out=out)


def block_residuals(
    yc: NDArray, bd: BlockDesign, delta: NDArray | None = None
) -> NDArray[np.float64]:
    """Residuals ``y_c − D δ`` of each slice, (m, n) float64.

    ``delta`` (m, k): the coefficients; None: least squares.
    """
    if delta is None:
        _, delta = _normal_equations(yc, bd)
    resid = _model_into(delta, bd, np.empty(yc.shape))
    return np.subtract(yc, resid, out=resid)


def _normal_equations(yc: NDArray, bd: BlockDesign) -> tuple[NDArray, NDArray]:
    """Return ``h = (u1ᵀy, u2ᵀy, Σy)`` (m, 3) and least-squares δ (m, k).

    One small GEMM with the avg/diff basis gives all of ``h``.
    """
    h = np.dot(yc, bd.basis_t).astype(np.float64)
    return h, (h @ bd.transform) @ bd.gram_inv


def _fit_block(yc: NDArray, bd: BlockDesign, spec: NoiseSpec) -> NDArray:
    m = yc.shape[0]
    k, n = bd.k, bd.n_pixels
    h, delta = _normal_equations(yc, bd)
    # a few scratch arrays of the block's size serve every step in place
    work = _scratch('work', yc)
    weights = None
    bread = None
    scale = None
    if spec.noise == 'poisson':
        # weights ∝ 1 / variance of the model's count: their scale cancels
        # in δ and in both covariances, so gain² is left out
        floor = spec.gain * (0.1 + spec.read_noise**2)  # counts
        # variance ∝ max(μ − offset, 0) + floor = max(μ − offset + floor,
        # floor), with μ = M + Dδ: one GEMM of [δ, 1] with [D; shift]
        shift = (bd.centre - spec.camera_offset + floor).astype(yc.dtype)
        augmented = np.vstack([bd.design_t, shift])
        # np.maximum against a scalar is 4× slower here than against a row
        floor_row = np.full(yc.shape[1], floor, yc.dtype)
        one = yc.dtype.type(1)
        weights = _scratch('weights', yc)
        # y ∘ D_j once, so that each iteration's Dᵀ W y is k row-wise dots
        yd = [
            np.multiply(yc, column, out=_scratch(f'yd{j}', yc))
            for j, column in enumerate(bd.design_t)
        ]
        for _ in range(spec.iterations):
            coef = np.ones((len(delta), bd.k + 1), yc.dtype)
            coef[:, :-1] = delta
            np.dot(coef, augmented, out=weights)
            np.maximum(weights, floor_row, out=weights)
            np.divide(one, weights, out=weights)  # 1.7× np.reciprocal
            gram = _gram(weights, bd)
            rhs = np.stack([np.vecdot(weights, v) for v in yd], axis=1)
            delta = _solve(gram, rhs.astype(np.float64))
        bread = gram
    elif spec.noise == 'huber':
        # Huber and Dutter's H-algorithm: δ += (DᵀD)⁻¹ Dᵀ ψ(r), with the
        # shared Gram matrix; it converges at the rate of the fraction of
        # clipped pixels (~0.2 for Gaussian noise)
        size = _scratch('size', yc)
        for i in range(spec.iterations):
            resid = np.subtract(yc, _model_into(delta, bd, work), out=work)
            # the scale settles after two steps; later ones reuse it
            if i < 2:
                scale = _median_abs(resid, bd)
            psi = _psi(resid, bd, size, scale)
            delta = delta + np.dot(psi, bd.design_t.T) @ bd.gram_inv
    resid = np.subtract(yc, _model_into(delta, bd, work), out=work)
    out = np.empty((m, bd.n_out))
    p = k * (k + 1) // 2
    out[:, :k] = delta
    out[:, k + p] = np.vecdot(resid, resid)
    out[:, k + p + 1] = np.vecdot(yc, yc)
    out[:, k + p + 2] = h[:, 2]
    out[:, k + p + 3] = h[:, 1]
    # last: the covariance may overwrite the residuals
    out[:, k : k + p] = _covariance(
        resid, weights, bread, scale, bd, spec, n, k
    )
    return out


def _psi(resid: NDArray, bd: BlockDesign, size: NDArray, scale) -> NDArray:
    """Huber's ψ of the residuals, in place, gross outliers set to 0."""
    scale = scale.astype(resid.dtype)[:, None]
    np.abs(resid, out=size)
    # gross outliers (hot pixels, debris) get no say at all
    gross = size > REJECT * scale
    np.clip(resid, -HUBER_C * scale, HUBER_C * scale, out=resid)
    resid[gross] = 0.0
    return resid


def sandwich(omega: NDArray, inv: NDArray, n: int) -> NDArray[np.float64]:
    """Robust covariances ``inv Ω inv · n/(n − k)`` of many slices.

    ``omega`` (m, k(k+1)/2) float64: the packed ``Σ ψ² · terms`` of each
    slice (see :func:`napari_mixcoef._spatial.sandwich_terms`); ``inv``
    (k, k) or (m, k, k): the inverse bread.  Returns (m, k, k).
    """
    k = inv.shape[-1]
    full = unpack(omega, k) * (n / (n - k))
    return inv @ full @ inv


def _covariance(resid, weights, bread, scale, bd, spec, n, k) -> NDArray:
    """Packed per-slice covariance of δ for the chosen stderr mode.

    ``weights`` and ``bread`` are the Poisson fit's last weights and
    weighted Gram matrices, ``scale`` the Huber fit's robust scale.
    """
    m = resid.shape[0]
    if spec.noise == 'huber':
        size = _scratch('size', resid)
        psi = _psi(resid, bd, size, scale)  # leaves |r| in size
        # ψ' of Huber's loss; pixels outside the mask have D = 0 and no
        # part in the bread, but count as inliers (their residual is 0)
        inlier = size <= HUBER_C * scale.astype(resid.dtype)[:, None]
        if spec.stderr == 'auto':  # the textbook formula needs no bread
            bread = _gram(inlier.astype(resid.dtype), bd)
        n_out = resid.shape[1] - n
        frac = (np.count_nonzero(inlier, axis=1) - n_out) / n
    elif spec.noise == 'poisson':
        psi = np.multiply(weights, resid, out=weights)
    else:
        psi = resid
        bread = None
    if spec.stderr == 'ols':
        if spec.noise == 'gaussian':
            sigma2 = np.vecdot(resid, resid).astype(np.float64) / (n - k)
            cov = sigma2[:, None, None] * bd.gram_inv
        elif spec.noise == 'poisson':
            # quasi-likelihood: model-based covariance times the dispersion
            phi = np.vecdot(psi, resid).astype(np.float64) / (n - k)
            cov = phi[:, None, None] * np.linalg.inv(bread)
        else:
            # Huber's classic: E[ψ²] / E[ψ']² · (DᵀD)⁻¹
            psi2 = np.vecdot(psi, psi).astype(np.float64) / (n - k)
            frac = np.maximum(frac, 1.0 / n)
            cov = (psi2 / frac**2)[:, None, None] * bd.gram_inv
    else:
        # sandwich: bread⁻¹ Ω bread⁻¹, Ω = Σ ψ² · terms (spatial HAC)
        squares = np.square(psi, out=psi)  # psi is not needed after
        inv = bd.gram_inv if bread is None else np.linalg.inv(bread)
        cov = sandwich(np.dot(squares, bd.terms).astype(np.float64), inv, n)
    packed = np.empty((m, k * (k + 1) // 2))
    for j, (a, b) in enumerate(pair_index(k)):
        packed[:, j] = cov[:, a, b] if cov.ndim == 3 else cov[a, b]
    return packed
