"""The coarse estimate: each slice's shift to about a pixel.

Each slice's cross-correlation with the mean reference, by FFT over
blocks of slices at a reduced resolution (the peak, refined by a
parabola).
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft
from numpy.typing import NDArray

from ..model.downsample import block_means
from ..model.references import References

__all__ = ['COARSE_SIDE', 'Coarse']

#: Coarse correlations run on images of about this many pixels a side.
COARSE_SIDE = 32


def _window(shape) -> NDArray:
    """Return a separable Hann window (the wrap-around fades out)."""
    out = np.ones(shape)
    for j, size in enumerate(shape):
        w = np.hanning(size + 2)[1:-1]
        out = out * w.reshape((-1,) + (1,) * (len(shape) - j - 1))
    return out


class Coarse:
    """FFT cross-correlation of slices with the mean reference."""

    def __init__(self, refs: References, limit: float, backend) -> None:
        self._backend = backend
        shape = refs.shape
        self.ndim = len(shape)
        self.factor = max(1, min(shape) // COARSE_SIDE)
        template = refs.images.mean(axis=0)
        self.mask = (
            None
            if refs.mask is None
            else block_means(
                refs.mask.astype(np.float64), self.factor, self.ndim
            )
        )
        self.window = _window(tuple(s // self.factor for s in shape)).astype(
            np.float32
        )
        small = self._prepared(template[None])[0]
        self.shape = small.shape
        self.axes = tuple(range(-self.ndim, 0))
        # scipy's FFT keeps float32 (numpy's works in float64)
        self.spectrum = np.conj(sfft.rfftn(small, axes=self.axes))
        reach = limit / self.factor + 1
        grid = np.meshgrid(
            *[np.fft.fftfreq(s, 1 / s) for s in self.shape], indexing='ij'
        )
        self.lags = np.stack([g.reshape(-1) for g in grid], axis=1)
        self.allowed = (np.abs(self.lags) <= reach).all(axis=1)

    def _means(self, images: NDArray, factor: int, ndim: int) -> NDArray:
        if factor == 1:
            return images.astype(np.float32)
        lead = images.shape[: images.ndim - ndim]
        small = tuple(s // factor for s in images.shape[images.ndim - ndim :])
        out = np.empty(lead + small, np.float32)
        self._backend.block_means(images, factor, out)
        return out

    def _prepared(self, images: NDArray) -> NDArray:
        small = self._means(images, self.factor, self.ndim)
        axes = tuple(range(1, small.ndim))
        small = small - small.mean(axis=axes, keepdims=True)
        if self.mask is not None:
            small = small * self.mask
        return small * self.window

    def __call__(self, y: NDArray) -> NDArray[np.float64]:
        """Shifts ``(m, d)`` of slices ``y`` (m, *shape), in pixels."""
        spec = sfft.rfftn(self._prepared(y), axes=self.axes)
        corr = sfft.irfftn(spec * self.spectrum, s=self.shape, axes=self.axes)
        flat = corr.reshape(len(y), -1)
        flat = np.where(self.allowed, flat, -np.inf)
        best = np.argmax(flat, axis=1)
        peak = self.lags[best].astype(np.float64)
        index = np.stack(np.unravel_index(best, self.shape), axis=1)
        rows = np.arange(len(y))
        for j, size in enumerate(self.shape):
            if size < 3:
                continue
            around = []
            for step in (-1, 0, 1):
                at = index.copy()
                at[:, j] = (at[:, j] + step) % size
                around.append(corr[(rows, *at.T)])
            lo, mid, hi = around
            curve = lo - 2 * mid + hi
            with np.errstate(invalid='ignore', divide='ignore'):
                frac = np.where(curve < 0, 0.5 * (lo - hi) / curve, 0.0)
            peak[:, j] += np.clip(np.nan_to_num(frac), -0.5, 0.5)
        return peak * self.factor
