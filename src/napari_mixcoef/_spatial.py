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
robust (HC) estimator.  Pure numpy/scipy.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

#: Largest lag (pixels, per axis) of the correlation kernel.
MAX_LAG = 4


def noise_correlation(
    residuals: NDArray,
    mask: NDArray[np.bool_] | None = None,
    *,
    max_lag: int = MAX_LAG,
    overwrite: bool = False,
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
    sample = np.abs(sample)
    middle = len(sample) // 2
    scale = 1.4826 * float(np.partition(sample, middle)[middle])
    # zero padding by the largest lag is enough to avoid wrap-around at the
    # lags kept (a padding to twice the size cost 4× the time)
    from scipy import fft as sfft

    size = [sfft.next_fast_len(s + h, real=True) for s, h in zip(shape, lag)]
    image_axes = tuple(range(len(size)))
    # All slices in one transform (the caller passes a few hundred
    # thousand pixels at most), in float32 (the lags' estimates are good to
    # ~1e-3 statistically): several times faster than numpy's.  One
    # worker: two took longer on transforms this small (thread hand-offs).
    # The clipped residuals go straight into the padded float32 input.
    padded = np.zeros((len(r), *size), np.float32)
    inner = padded[(slice(None), *(slice(0, s) for s in shape))]
    if scale > 0:
        np.clip(r, -4 * scale, 4 * scale, out=inner, casting='same_kind')
    else:
        inner[...] = r
    slice_axes = tuple(range(1, len(size) + 1))
    spectrum = sfft.rfftn(padded, axes=slice_axes, overwrite_x=True)
    power = (spectrum.real**2 + spectrum.imag**2).sum(axis=0)
    window, pairs = _lag_grid(mask, shape, lag, size)
    auto = sfft.irfftn(power, s=size, axes=image_axes)[window]
    auto = auto.astype(np.float64)
    pairs = pairs * len(r)
    with np.errstate(invalid='ignore', divide='ignore'):
        mean = np.where(pairs > 0, auto / np.maximum(pairs, 1), 0.0)
    centre = tuple(lag)
    if mean[centre] <= 0:
        kernel = np.zeros_like(mean)
        kernel[centre] = 1.0
        return kernel
    rho = mean / mean[centre]
    # a lag's estimate has standard error ~ 1/sqrt(number of pairs)
    noise = 3.0 / np.sqrt(np.maximum(pairs, 1))
    rho[np.abs(rho) < noise] = 0.0
    rho[centre] = 1.0
    return rho


_LAG_GRIDS: dict = {}


def _lag_grid(mask, shape, lag, size) -> tuple[tuple, NDArray[np.float64]]:
    """Return the kept lags' index into the padded grid, and pair counts.

    The counts are the pairs of fitted pixels at each lag.  Kept for the
    last few masks: hashing a bool mask is cheap, computing counts is
    two more transforms.
    """
    key = (shape, lag, tuple(size), None if mask is None else mask.tobytes())
    hit = _LAG_GRIDS.get(key)
    if hit is None:
        window = np.ix_(
            *(
                np.r_[np.arange(-h, 0) % n, np.arange(h + 1)]
                for h, n in zip(lag, size)
            )
        )
        inside = np.ones(shape) if mask is None else mask.astype(np.float64)
        axes = tuple(range(inside.ndim))
        counts = np.fft.irfftn(
            np.abs(np.fft.rfftn(inside, s=size, axes=axes)) ** 2,
            s=size,
            axes=axes,
        )
        hit = (window, np.round(counts[window]))
        if len(_LAG_GRIDS) >= 4:
            _LAG_GRIDS.clear()
        _LAG_GRIDS[key] = hit
    return hit


def smoothed(images: NDArray, kernel: NDArray) -> NDArray[np.float64]:
    """Correlate each image with the kernel (zero outside the image).

    Parameters
    ----------
    images : (k, *shape) ndarray
        Design columns as images (zero outside the mask).
    kernel : (*window) ndarray
        Output of :func:`noise_correlation`.

    Returns
    -------
    (k, *shape) ndarray of float64
        ``D̃ = ρ ⋆ D`` for each column.
    """
    from scipy import ndimage

    images = np.asarray(images, dtype=np.float64)
    if kernel.size == 1 or np.count_nonzero(kernel) == 1:
        return images * kernel.max()
    return np.stack(
        [
            ndimage.correlate(image, kernel, mode='constant', cval=0.0)
            for image in images
        ]
    )


def sandwich_terms(columns: NDArray, smooth: NDArray) -> NDArray[np.float64]:
    """Per-pixel terms ``½(u_a ũ_b + u_b ũ_a)`` for ``a ≤ b``.

    Parameters
    ----------
    columns, smooth : (k, n) ndarray
        Design columns and their smoothed versions, flattened.

    Returns
    -------
    (n, k(k+1)/2) ndarray of float64
        Rows are pixels; ``Ω = Σ_p r_p² · terms[p]`` in the order of
        :func:`pair_index`.
    """
    k = len(columns)
    out = [
        0.5 * (columns[a] * smooth[b] + columns[b] * smooth[a])
        for a, b in pair_index(k)
    ]
    return np.stack(out, axis=1)


def pair_index(k: int) -> list[tuple[int, int]]:
    """Pairs ``(a, b)``, ``a ≤ b``, of a symmetric k × k matrix, in order."""
    return [(a, b) for a in range(k) for b in range(a, k)]


def unpack(values: NDArray, k: int) -> NDArray[np.float64]:
    """``(..., k(k+1)/2)`` upper-triangle values to ``(..., k, k)``."""
    out = np.empty(values.shape[:-1] + (k, k))
    for j, (a, b) in enumerate(pair_index(k)):
        out[..., a, b] = values[..., j]
        out[..., b, a] = values[..., j]
    return out
