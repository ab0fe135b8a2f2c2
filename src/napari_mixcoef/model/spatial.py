"""Spatial correlation of the noise, for honest standard errors.

Optics blur the noise as well as the signal: neighbouring pixels' noise is
correlated, and errors computed as if pixels were independent come out
several times too small.  The correlation is a property of the camera and
the optics, the same in every slice, so it is estimated once, pooled over a
few slices' residuals, as a small kernel ``ρ(h)`` of lags ``h`` (``ρ(0) =
1``).  The standard errors then use

    Ω = Σ_p r_p² · ½(D_p D̃_pᵀ + D̃_p D_pᵀ),   D̃ = ρ ⋆ D,

a spatial HAC ("sandwich") estimator that assumes the noise variance
varies slowly over the correlation length (``r_p r_{p+h} ≈ r_p² ρ(h)``).
With white noise ``ρ`` is a single 1 and ``Ω`` is the heteroscedasticity-
robust (HC) estimator.  numpy and scipy; the sums over pairs at each lag
come from a ``lag_products`` function the caller passes (a backend's: one
compiled call with numba), numpy's BLAS dots by default.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

#: ``lag_products(buf, n, offsets) -> (len(offsets),) float64``.
LagProducts = Callable[[NDArray, int, NDArray], NDArray]

#: ``correlate(images, kernel) -> (k, *shape) float64``: each image
#: correlated with the kernel, zero outside the image.
Correlate = Callable[[NDArray, NDArray], NDArray]

#: Largest lag (pixels, per axis) of the correlation kernel.
MAX_LAG = 4


def noise_correlation(
    residuals: NDArray,
    mask: NDArray[np.bool_] | None = None,
    *,
    max_lag: int = MAX_LAG,
    overwrite: bool = False,
    lag_products: LagProducts | None = None,
) -> NDArray[np.float64]:
    """Estimate the noise's spatial correlation kernel from residuals.

    Parameters
    ----------
    residuals : (n_slices, *shape) ndarray
        Residual images of a few slices (zero outside the mask).
    mask : (*shape) ndarray of bool, optional
        Fitted pixels; lags are averaged over pairs of fitted pixels only.
    max_lag : int
        Largest lag per axis.
    overwrite : bool
        Whether ``residuals`` (float64) may be zeroed outside the mask in
        place (the clipped values go to a separate padded copy).
    lag_products : callable, optional
        ``lag_products(buf, n, offsets)``, see
        :func:`numpy_lag_products` (the default); a backend's compiled
        one gives the same sums.

    Returns
    -------
    (2·max_lag + 1,)*ndim ndarray of float64
        ``ρ(h)`` with ``ρ(0) = 1`` at the centre; lags whose estimate is
        within three standard errors of zero are set to zero, so white
        noise gives a single 1.
    """
    r = np.array(residuals, dtype=np.float64, copy=not overwrite)
    shape = r.shape[1:]
    lag = tuple(min(max_lag, s - 1) for s in shape)
    if mask is not None:
        r[:, ~mask] = 0.0
    # Robust to hot pixels and debris: clip at 4 robust standard deviations
    # (the median of a strided sample of ≤ 16384 fitted pixels is plenty:
    # it sets a clipping level, known to ~1 %).
    step = max(1, r.size // 16384)
    sample = r.reshape(-1)[::step]
    if mask is not None:
        sample = sample[np.broadcast_to(mask, r.shape).reshape(-1)[::step]]
    if sample.size == 0:  # no fitted pixel left: nothing to estimate
        return white_kernel(lag)
    sample = np.abs(sample)
    middle = len(sample) // 2
    scale = 1.4826 * float(np.partition(sample, middle)[middle])
    # Zero padding by the largest lag after each axis: a neighbour past an
    # edge then reads a zero, and each lag is one offset in the flat array
    # (a lag that steps before an axis's start lands in the previous row's
    # padding).  The sums over pairs at each lag are then plain dot
    # products over a few hundred thousand pixels at most: direct sums take
    # half the time of FFTs here, whose per-transform overhead dominates at
    # these sizes.  In float64, so that the compiled and the BLAS sums
    # agree to rounding (float32 took 100 µs less, but the two differed in
    # the eighth digit of the standard errors).
    padded_shape = tuple(s + h for s, h in zip(shape, lag))
    offsets, where = _half_lags(padded_shape, lag)
    padded, buf = _padded(len(r), padded_shape, offsets)
    inner = padded[(slice(None), *(slice(0, s) for s in shape))]
    if scale > 0:
        np.clip(r, -4 * scale, 4 * scale, out=inner)
    else:
        inner[...] = r
    lags = lag_products or numpy_lag_products
    auto = _mirrored(lags(buf, padded.size, offsets), where, lag)
    pairs = _pair_counts(mask, shape, lag, lags) * len(r)
    with np.errstate(invalid='ignore', divide='ignore'):
        mean = np.where(pairs > 0, auto / np.maximum(pairs, 1), 0.0)
    centre = tuple(lag)
    if mean[centre] <= 0:
        return white_kernel(lag)
    rho = mean / mean[centre]
    # a lag's estimate has standard error ~ 1/sqrt(number of pairs)
    noise = 3.0 / np.sqrt(np.maximum(pairs, 1))
    rho[np.abs(rho) < noise] = 0.0
    rho[centre] = 1.0
    return rho


def white_kernel(lag) -> NDArray[np.float64]:
    """Return the kernel of independent noise: a single 1 at lag 0."""
    kernel = np.zeros(tuple(2 * h + 1 for h in lag))
    kernel[tuple(lag)] = 1.0
    return kernel


def numpy_lag_products(buf: NDArray, n: int, offsets: NDArray) -> NDArray:
    """``Σ_{p<n} buf[p]·buf[p+o]`` for each offset ``o``: one BLAS dot each.

    ``buf`` (float64) is zero from ``n`` on and holds at least
    ``max(offsets) + 8`` elements past it (see :func:`_padded`).
    """
    return np.array([np.dot(buf[:n], buf[o : o + n]) for o in offsets])


def _padded(count: int, padded_shape, offsets) -> tuple[NDArray, NDArray]:
    """Return zeroed images ``(count, *padded_shape)`` and their buffer.

    The flat buffer behind the images goes on with the spare zeros that
    :func:`numpy_lag_products` reads past their end.
    """
    n = count * math.prod(padded_shape)
    buf = np.zeros(n + int(offsets[-1]) + 8)
    return buf[:n].reshape((count, *padded_shape)), buf


_HALF_LAGS: dict = {}


def _half_lags(padded_shape, lag) -> tuple[NDArray, NDArray]:
    """Offsets of the lags ``h ≥ 0`` (lexicographic order), and where they go.

    Offsets are in elements of the flat array of images padded to
    ``padded_shape``, ascending.  The other half of the lags follows by
    symmetry (``ρ(−h) = ρ(h)``): the second array holds, per offset, the
    flat indices of ``h`` and of ``−h`` in the window (see
    :func:`_mirrored`).
    """
    key = (tuple(padded_shape), tuple(lag))
    hit = _HALF_LAGS.get(key)
    if hit is None:
        strides = np.cumprod((1, *padded_shape[:0:-1]))[::-1]
        grid = np.stack(
            np.meshgrid(*(np.arange(-h, h + 1) for h in lag), indexing='ij'),
            axis=-1,
        ).reshape(-1, len(lag))
        # with every |h_i| < padded_shape[i] − lag_i, the lexicographic
        # order of the lags is the order of their offsets
        offsets = grid @ strides
        keep = np.flatnonzero(offsets >= 0)
        window = np.arange(len(grid))  # flat window index of grid[i]
        hit = (
            offsets[keep].astype(np.int64),
            np.stack([window[keep], window[::-1][keep]]),  # h and −h
        )
        if len(_HALF_LAGS) >= 8:
            _HALF_LAGS.clear()
        _HALF_LAGS[key] = hit
    return hit


def _mirrored(values, where, lag) -> NDArray[np.float64]:
    """Return the full window ``(2·lag + 1)`` per axis from half the lags."""
    out = np.empty(tuple(2 * h + 1 for h in lag))
    out.flat[where[0]] = values
    out.flat[where[1]] = values
    return out


_PAIR_COUNTS: dict = {}


def _pair_counts(mask, shape, lag, lags) -> NDArray[np.float64]:
    """Pairs of fitted pixels at each lag of the window, per image.

    The same lag sums over the mask.  Kept for the last few masks: hashing
    a bool mask is cheap, the counts are not.
    """
    key = (shape, lag, None if mask is None else mask.tobytes())
    hit = _PAIR_COUNTS.get(key)
    if hit is None:
        padded_shape = tuple(s + h for s, h in zip(shape, lag))
        offsets, where = _half_lags(padded_shape, lag)
        padded, buf = _padded(1, padded_shape, offsets)
        inside = padded[(0, *(slice(0, s) for s in shape))]
        inside[...] = 1.0 if mask is None else mask
        hit = _mirrored(lags(buf, padded.size, offsets), where, lag)
        if len(_PAIR_COUNTS) >= 4:
            _PAIR_COUNTS.clear()
        _PAIR_COUNTS[key] = hit
    return hit


def smoothed(
    images: NDArray, kernel: NDArray, correlate: Correlate | None = None
) -> NDArray[np.float64]:
    """Correlate each image with the kernel (zero outside the image).

    Parameters
    ----------
    images : (k, *shape) ndarray
        Design columns as images (zero outside the mask).
    kernel : (*window) ndarray
        Output of :func:`noise_correlation`.
    correlate : callable, optional
        ``correlate(images, kernel)``, see :func:`numpy_correlate` (the
        default); a backend's compiled one gives the same images.

    Returns
    -------
    (k, *shape) ndarray of float64
        ``D̃ = ρ ⋆ D`` for each column.
    """
    images = np.asarray(images, dtype=np.float64)
    if kernel.size == 1 or np.count_nonzero(kernel) == 1:
        return images * kernel.max()
    return (correlate or numpy_correlate)(images, kernel)


def numpy_correlate(images: NDArray, kernel: NDArray) -> NDArray:
    """``scipy.ndimage.correlate`` of each image, zero outside it."""
    from scipy import ndimage

    return np.stack(
        [
            ndimage.correlate(image, kernel, mode='constant', cval=0.0)
            for image in np.asarray(images, dtype=np.float64)
        ]
    )


def sandwich_terms(
    columns: NDArray, smooth: NDArray, dtype=np.float64
) -> NDArray:
    """Per-pixel terms ``½(u_a ũ_b + u_b ũ_a)`` for ``a ≤ b``.

    Parameters
    ----------
    columns, smooth : (k, n) ndarray
        Design columns and their smoothed versions, flattened.
    dtype : dtype
        Of the result (the working dtype of the kernels that read it).

    Returns
    -------
    (k(k+1)/2, n) ndarray
        One row per pair, in the order of :func:`pair_index`:
        ``Ω = Σ_p r_p² · terms[:, p]``.
    """
    a, b = np.asarray(pair_index(len(columns))).reshape(-1, 2).T
    out = np.empty((len(a), columns.shape[1]), dtype)
    # a few thousand pixels at a time: the pairs' operands stay in cache
    for p0 in range(0, columns.shape[1], _TERM_TILE):
        c = columns[:, p0 : p0 + _TERM_TILE].astype(dtype, copy=False)
        s = smooth[:, p0 : p0 + _TERM_TILE].astype(dtype, copy=False)
        tile = out[:, p0 : p0 + _TERM_TILE]
        np.multiply(c[a], s[b], out=tile)
        tile += c[b] * s[a]
        tile *= 0.5
    return out


_TERM_TILE = 4096


def pair_index(k: int) -> list[tuple[int, int]]:
    """Pairs ``(a, b)``, ``a ≤ b``, of a symmetric k × k matrix, in order."""
    return [(a, b) for a in range(k) for b in range(a, k)]


def pack(matrices: NDArray) -> NDArray:
    """``(..., k, k)`` symmetric matrices to their upper triangles."""
    k = matrices.shape[-1]
    a, b = np.triu_indices(k)
    return matrices[..., a, b]


def unpack(values: NDArray, k: int) -> NDArray[np.float64]:
    """``(..., k(k+1)/2)`` upper-triangle values to ``(..., k, k)``."""
    out = np.empty(values.shape[:-1] + (k, k))
    for j, (a, b) in enumerate(pair_index(k)):
        out[..., a, b] = values[..., j]
        out[..., b, a] = values[..., j]
    return out
