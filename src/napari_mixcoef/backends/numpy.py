"""The numpy backend: always there, the reference the others are held to.

Each block is cast and centred into a per-thread buffer (zero outside the
mask) and reduced by a few numpy calls that release the GIL (``np.dot``
runs one small BLAS GEMM against the basis, where ``@`` would keep it).
"""

from __future__ import annotations

import threading

import numpy as np
from numpy.typing import NDArray

from ..model import downsample, noise, pixelwise, spatial, windows

__all__ = ['NumpyBackend', 'centred']

_LOCAL = threading.local()


def _buffer(shape: tuple[int, ...], dtype, fitted) -> NDArray:
    """Return a zeroed per-thread buffer for one block shape and mask.

    With a mask only the fitted pixels are ever written, so the rest must
    start (and stay) zero: one buffer per shape and mask array (the
    array itself is kept and compared, so that a new mask at a reused
    address is not mistaken for an old one).
    """
    buffers = getattr(_LOCAL, 'buffers', None)
    if buffers is None:
        buffers = _LOCAL.buffers = {}
    key = (shape, np.dtype(dtype).str, id(fitted))
    hit = buffers.get(key)
    if hit is None or hit[0] is not fitted:
        if len(buffers) > 32:  # block shapes changed: start afresh
            buffers.clear()
        hit = buffers[key] = (fitted, np.zeros(shape, dtype))
    return hit[1]


def centred(y: NDArray, view, *, reuse: bool = True) -> NDArray:
    """``y − M`` in the working dtype, zero outside the mask, ``(rows, n)``.

    ``reuse``: into the thread's buffer (valid until the next call), else
    a new array.
    """
    dtype = view.dtype
    where = True if view.fitted is None else view.fitted
    if reuse:
        out = _buffer(y.shape, dtype, view.fitted)
    else:
        out = np.zeros(y.shape, dtype)
    with np.errstate(invalid='ignore', over='ignore'):  # reported later
        if y.dtype == dtype:
            np.subtract(y, view.centre, out=out, where=where)
        else:
            # a plain cast and an in-cache subtraction take less time than
            # one subtraction that casts as it goes
            np.copyto(out, y, casting='unsafe', where=where)
            np.subtract(out, view.centre, out=out, where=where)
    return out


class NumpyBackend:
    """numpy and BLAS; any real dtype, every model, noise and constraint."""

    name = 'numpy'

    def supports(self, dtype, k, spec, constrained) -> bool:
        """Every fit."""
        return True

    def block_sums(self, y, view, sums) -> None:
        """Add each row's ``g``, ``s``, ``h``, ``Σy_c²`` (and HAC sums)."""
        yc = centred(y, view)
        layout = sums.layout
        raw = sums.raw
        with np.errstate(invalid='ignore', over='ignore'):
            # one small GEMM gives g, Σy_c and u2ᵀy_c (adjacent columns)
            raw[:, layout.linear] += np.dot(yc, view.sums_rows.T)
            if not layout.hac:
                raw[:, layout.yy] += np.vecdot(yc, yc)
                return
            t = view.hac
            squares = np.square(yc)
            both = np.dot(squares, np.stack([t, np.ones_like(t)], axis=1))
            raw[:, layout.hy] += both[:, 0]
            raw[:, layout.yy] += both[:, 1]
            raw[:, layout.hq] += np.dot(yc, t * view.basis[0])

    def residual_sums(self, y, view, z, terms, out) -> None:
        """Add ``Σr²`` and ``Σr²·terms`` of ``r = y_c − Q_k z`` to ``out``."""
        yc = centred(y, view)
        with np.errstate(invalid='ignore', over='ignore'):
            model = np.dot(z.astype(yc.dtype), view.basis)
            resid = (yc - model).astype(np.float64)
            squares = np.square(resid)
            out[:, 0] += squares.sum(axis=1)
            if terms is not None:
                out[:, 1:] += squares @ terms.T.astype(np.float64)

    def fit_block(self, y, view, spec, constraint):
        """Fit whole slices (:func:`napari_mixcoef.model.noise.fit_block`)."""
        return noise.fit_block(centred(y, view), view, spec, constraint)

    def fit_pixels(self, y, maps, out) -> None:
        """Fit by a few GEMMs per block (:func:`.pixelwise.fit_pixels`)."""
        pixelwise.fit_pixels(y, maps, out)

    def lag_products(self, buf, n, offsets) -> NDArray:
        """One BLAS dot per offset."""
        return spatial.numpy_lag_products(buf, n, offsets)

    def correlate(self, images, kernel) -> NDArray:
        """``scipy.ndimage.correlate``, image by image."""
        return spatial.numpy_correlate(images, kernel)

    def window_products(
        self, y, base, which, runs, centre, columns, b, yy
    ) -> None:
        """Gather each bin's rows and multiply (:mod:`.model.windows`)."""
        windows.numpy_window_products(
            y, base, which, runs, centre, columns, b, yy
        )

    def window_fill(self, y, base, which, runs, coef, rows, out) -> None:
        """Gather each bin's rows and add one GEMM's correction."""
        windows.numpy_window_fill(y, base, which, runs, coef, rows, out)

    def window_meat(
        self, y, base, which, runs, v, columns, twhich, terms, out
    ) -> None:
        """Gather each bin's rows; residuals and their sums by GEMMs."""
        windows.numpy_window_meat(
            y, base, which, runs, v, columns, twhich, terms, out
        )

    def block_means(self, y, factor, out) -> None:
        """Add strided views an axis at a time (:mod:`.model.downsample`)."""
        out[...] = downsample.block_means(y, factor, y.ndim - 1)

    def warm_up(self) -> None:
        """Nothing to prepare."""
