"""Noise models: how to weigh pixels, and the numpy reference fits.

Ordinary least squares with honest (sandwich) errors, Poisson maximum
likelihood and Huber's robust fit, the last two by iteratively reweighted
least squares (IRLS).  Every step works in the coordinates ``z`` of the
design's orthonormal basis (``Q_k``: the rows ``basis[:k]``) and is
vectorized over a block's slices: the per-slice weighted Gram matrices of
all slices come from one matrix product of the weights with the basis'
pairwise products.  :func:`fit_block` is the reference that the compiled
backend is held to.

Notation: ``yc`` is a block of whole slices centred on ``M`` (zero outside
the mask); the model image is ``M + Q_k z``.
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from .constraints import solve
from .spatial import pack, unpack

__all__ = [
    'HUBER_C',
    'MAD_SCALE',
    'NOISE_MODELS',
    'REJECT',
    'STDERR_MODES',
    'BlockFit',
    'DetectorWarning',
    'NoiseSpec',
    'check_detector',
    'check_spec',
    'fit_block',
]

NOISE_MODELS = ('gaussian', 'poisson', 'huber')
STDERR_MODES = ('auto', 'ols')

#: Huber's tuning constant: 95 % efficiency for Gaussian noise.
HUBER_C = 1.345
#: A robust standard deviation from the median absolute residual.
MAD_SCALE = 1.4826
#: Residuals beyond this many robust standard deviations get zero weight
#: (a Gaussian pixel goes that far once in 500 million).
REJECT = 6.0


class DetectorWarning(UserWarning):
    """The detector settings do not fit the data (Poisson noise model)."""


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

    @property
    def floor(self) -> float:
        """Smallest modelled variance of a pixel, in counts (Poisson)."""
        return self.gain * (0.1 + self.read_noise**2)


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


def check_detector(spec: NoiseSpec, values: NDArray, stacklevel: int) -> None:
    """Warn when the camera offset lies above most of the data (Poisson).

    Photon counts ``(I − offset)/gain`` below zero all get the variance
    floor: with most of them there, the fit is plain least squares.

    Parameters
    ----------
    spec : NoiseSpec
        The detector settings.
    values : ndarray
        Fitted pixels of a few slices (raw counts).
    stacklevel : int
        The caller's frame, for the warning.
    """
    if spec.noise != 'poisson' or values.size == 0:
        return
    below = float(np.mean(values <= spec.camera_offset))
    if below > 0.5:
        median = float(np.median(values))
        warnings.warn(
            f'camera_offset {spec.camera_offset:g} is at or above '
            f'{100 * below:.0f} % of the fitted pixels (their median is '
            f'{median:.4g} counts): their photon counts (I − offset)/gain '
            'are not positive, so the Poisson weights treat them all alike; '
            'set camera_offset to the counts at zero light (the dark level)',
            DetectorWarning,
            stacklevel=stacklevel,
        )


@dataclass
class BlockFit:
    """Per-slice results of :func:`fit_block` (m slices, k coordinates).

    ``z`` (m, k), ``meat`` and ``bread`` (m, k(k+1)/2; bread None for the
    identity), ``sandwich`` as in
    :class:`napari_mixcoef.model.sums.SliceStats`, ``ssr`` (unweighted),
    ``yy`` = ``Σy_c²``, ``s`` = ``Σy_c`` and ``h`` = ``u2ᵀy_c`` for the
    centred total, ``active`` (m, K) or None.
    """

    z: NDArray[np.float64]
    meat: NDArray[np.float64]
    bread: NDArray[np.float64] | None
    sandwich: bool
    ssr: NDArray[np.float64]
    yy: NDArray[np.float64]
    s: NDArray[np.float64]
    h: NDArray[np.float64]
    active: NDArray[np.bool_] | None = None


_LOCAL = threading.local()


def _scratch(name: str, like: NDArray) -> NDArray:
    """Return a per-thread work array shaped like ``like`` (reused).

    A fresh array of a block's size pays its page faults on first write,
    more than the arithmetic of the pass that fills it.
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


def _gram(weights: NDArray, pairs: NDArray, k: int) -> NDArray[np.float64]:
    """Per-slice ``Q_kᵀ W Q_k`` for weights (m, n): (m, k, k)."""
    return unpack(np.dot(weights, pairs.T).astype(np.float64), k)


def _median_abs(r: NDArray, sample: NDArray) -> NDArray[np.float64]:
    """Robust residual scale per slice (MAD) over a sample of pixels."""
    # a spread-out sample of ≤ 2048 fitted pixels is plenty for a scale;
    # a partition is 10× faster than np.median here
    sample = np.abs(r[:, sample])
    middle = sample.shape[1] // 2
    sample.partition(middle, axis=1)
    mad = sample[:, middle].astype(np.float64) * MAD_SCALE
    return np.maximum(mad, np.finfo(np.float32).tiny)


def _model_into(z: NDArray, basis_k: NDArray, out: NDArray) -> NDArray:
    """``Q_k z`` per slice into ``out`` (m, n), without temporaries.

    A GEMM with an inner dimension of 1 is slower than a broadcast
    product; from 2 on, the GEMM is the faster.
    """
    z = np.ascontiguousarray(z, dtype=out.dtype)
    if basis_k.shape[0] == 1:
        return np.multiply(z, basis_k[0], out=out)
    return np.dot(z, basis_k, out=out)


def residuals(yc: NDArray, basis_k: NDArray, z: NDArray) -> NDArray:
    """Residuals ``y_c − Q_k z`` of each slice, (m, n) float64."""
    out = _model_into(z, basis_k, np.empty(yc.shape))
    return np.subtract(yc, out, out=out)


def _psi(resid: NDArray, size: NDArray, scale: NDArray) -> NDArray:
    """Huber's ψ of the residuals, in place, gross outliers set to 0."""
    scale = scale.astype(resid.dtype)[:, None]
    np.abs(resid, out=size)
    # gross outliers (hot pixels, debris) get no say at all
    gross = size > REJECT * scale
    np.clip(resid, -HUBER_C * scale, HUBER_C * scale, out=resid)
    resid[gross] = 0.0
    return resid


def fit_block(
    yc: NDArray,
    view,
    spec: NoiseSpec,
    constraint: tuple[NDArray, NDArray] | None = None,
) -> BlockFit:
    """Fit each slice of a block of whole slices (numpy reference).

    Parameters
    ----------
    yc : (m, n) ndarray
        Whole slices centred on ``M``, working dtype, zero outside the mask.
    view : DesignView
        The design over the whole slice (``basis``, ``k``, ``centre``,
        ``sums_rows``, ``pairs``, ``terms`` for robust errors, ``sample``).
    spec : NoiseSpec
        Noise model and standard-error mode.
    constraint : (C, d), optional
        Inequalities ``C z ≥ d`` (see :mod:`.constraints`).

    Returns
    -------
    BlockFit
    """
    # NaN or inf in the data propagate silently here; the caller checks
    # Σy² of every slice and names the first bad one.
    with np.errstate(invalid='ignore', over='ignore', divide='ignore'):
        return _fit_block(yc, view, spec, constraint)


def _least_squares(g, k, constraint):
    if constraint is None:
        return g[:, :k].copy(), None
    return solve(g[:, :k], *constraint)


def _fit_block(yc, view, spec, constraint) -> BlockFit:
    k = view.k
    n = view.n_pixels
    basis_k = view.basis
    sums = np.dot(yc, view.sums_rows.T).astype(np.float64)  # g, s, h
    z, active = _least_squares(sums, k, constraint)
    work = _scratch('work', yc)
    weights = bread = scale = None
    if spec.noise == 'poisson':
        # weights ∝ 1 / variance of the model's count: their scale cancels
        # in z and in both covariances, so gain² is left out; variance ∝
        # max(μ − offset + floor, floor) with μ = M + Q_k z
        floor = spec.floor
        shift = (view.centre - spec.camera_offset + floor).astype(yc.dtype)
        floor_row = np.full(yc.shape[1], floor, yc.dtype)
        one = yc.dtype.type(1)
        weights = _scratch('weights', yc)
        # y ∘ q_j once, so that each iteration's Qᵀ W y is k row-wise dots
        yq = [
            np.multiply(yc, q, out=_scratch(f'yq{j}', yc))
            for j, q in enumerate(basis_k)
        ]
        for _ in range(spec.iterations):
            _model_into(z, basis_k, weights)
            np.add(weights, shift, out=weights)
            np.maximum(weights, floor_row, out=weights)
            np.divide(one, weights, out=weights)
            gram = _gram(weights, view.pairs, k)
            rhs = np.stack([np.vecdot(weights, v) for v in yq], axis=1)
            rhs = rhs.astype(np.float64)
            if constraint is None:
                z = np.linalg.solve(gram, rhs[..., None])[..., 0]
            else:
                z, active = solve(rhs, *constraint, bread=gram)
        bread = gram
    elif spec.noise == 'huber':
        # Huber and Dutter's H-algorithm: z += Q_kᵀ ψ(r) (the basis is
        # orthonormal); it converges at the rate of the fraction of
        # clipped pixels (~0.2 for Gaussian noise)
        size = _scratch('size', yc)
        for i in range(spec.iterations):
            resid = np.subtract(yc, _model_into(z, basis_k, work), out=work)
            # the scale settles after two steps; later ones reuse it
            if i < 2:
                scale = _median_abs(resid, view.sample)
            psi = _psi(resid, size, scale)
            target = z + np.dot(psi, basis_k.T).astype(np.float64)
            if constraint is None:
                z = target
            else:
                z, active = solve(target, *constraint)
    resid = np.subtract(yc, _model_into(z, basis_k, work), out=work)
    ssr = np.vecdot(resid, resid).astype(np.float64)
    yy = np.vecdot(yc, yc).astype(np.float64)
    meat, bread, sandwich = _covariance_parts(
        resid, weights, bread, scale, view, spec, n
    )
    return BlockFit(
        z, meat, bread, sandwich, ssr, yy, sums[:, k], sums[:, k + 1], active
    )


def _covariance_parts(resid, weights, bread, scale, view, spec, n):
    """Packed meat and bread of the covariance of ``z``, and its kind.

    ``weights`` and ``bread`` are the Poisson fit's last weights and
    weighted Gram matrices, ``scale`` the Huber fit's robust scale.  May
    overwrite ``resid``.
    """
    k = view.k
    if spec.noise == 'huber':
        size = _scratch('size', resid)
        psi = _psi(resid, size, scale)  # leaves |r| in size
        # ψ' of Huber's loss; pixels outside the mask have q = 0 and no
        # part in the bread, but count as inliers (their residual is 0)
        inlier = size <= HUBER_C * scale.astype(resid.dtype)[:, None]
        if spec.stderr == 'auto':  # the textbook formula needs no bread
            bread = _gram(inlier.astype(resid.dtype), view.pairs, k)
        n_out = resid.shape[1] - n
        frac = (np.count_nonzero(inlier, axis=1) - n_out) / n
    elif spec.noise == 'poisson':
        psi = np.multiply(weights, resid, out=weights)
    else:
        psi = resid
        bread = None
    identity = pack(np.eye(k))[None]
    if spec.stderr == 'ols':
        if spec.noise == 'gaussian':
            ssr = np.vecdot(resid, resid).astype(np.float64)
            return ssr[:, None] * identity, None, False
        if spec.noise == 'poisson':
            # quasi-likelihood: model-based covariance times the dispersion
            phi = np.vecdot(psi, resid).astype(np.float64)
            return phi[:, None] * pack(bread), pack(bread), False
        # Huber's classic: E[ψ²] / E[ψ']² · (DᵀD)⁻¹
        psi2 = np.vecdot(psi, psi).astype(np.float64)
        frac = np.maximum(frac, 1.0 / n)
        return (psi2 / frac**2)[:, None] * identity, None, False
    # sandwich: bread⁻¹ Ω bread⁻¹, Ω = Σ ψ² · terms (spatial HAC), over
    # the design's sample of pixels for several coefficients
    squares = np.square(psi, out=psi)  # psi is not needed after
    if view.meat is None:
        meat = np.dot(squares, view.terms.T).astype(np.float64)
    else:  # the sample's squares times its calibrated terms
        sampled = squares[:, view.meat]
        meat = np.dot(sampled, view.meat_terms.T).astype(np.float64)
    return meat, None if bread is None else pack(bread), True
