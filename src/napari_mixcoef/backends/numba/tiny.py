"""Compiled kernels for slices of a few pixels (spectra, pixel by pixel).

A channel-last image ``(Y, X, C)`` fitted with references of length C has
millions of slices of C values.  The kernels of :mod:`.kernels` vectorize
over a slice's pixels, which leaves a handful of SIMD lanes per slice and
the loops' overhead for every one.  Here :data:`LANES` slices go side by
side instead: their centred values are transposed into a small buffer
(pixels × lanes, in L1) and every sum, the residuals and the meat are one
vector operation per pixel and term across the lanes.  Sums run in the
working dtype over a slice's few pixels, then go to float64.
"""

from __future__ import annotations

import numpy as np

from .kernels import jit

#: Slices side by side: one AVX2 vector of float32.
LANES = 8
#: Slices of at most this many fitted pixels take these kernels.
TINY_PIXELS = 64


@jit
def _transpose(y, centre, index, base, yt):  # pragma: no cover - compiled
    """Centred values of rows ``base …`` at pixels ``index`` into ``yt``.

    A short last group repeats its last row; those lanes are dropped.
    """
    wt = centre.dtype.type
    last = y.shape[0] - 1
    for p in range(index.size):
        px = index[p]
        c = centre[px]
        for lane in range(LANES):
            yt[p, lane] = wt(y[min(base + lane, last), px]) - c


@jit
def tiny_sums(y, centre, mean, basis, t, index, out, cols):  # pragma: no cover
    """Add each row's ``g``, ``Σy_c``, ``u2ᵀy_c``, ``Σy_c²`` (and HAC).

    ``y`` (rows, n_px) as stored; ``centre`` (n_px), ``basis`` (k, n_px)
    and ``t`` (n_px, or None) in the working dtype; ``index`` the fitted
    pixels; ``out`` (rows, width) float64 with ``g`` in columns 0 … k−1
    and ``cols`` (5,) the columns of ``Σy_c``, ``u2ᵀy_c``, ``Σy_c²`` and
    (with ``t``) ``Σy_c²t``, ``Σy_c q₀ t``.
    """
    rows = y.shape[0]
    k = basis.shape[0]
    wt = centre.dtype.type
    yt = np.empty((index.size, LANES), centre.dtype)
    acc = np.empty((k + 5, LANES), centre.dtype)
    for base in range(0, rows, LANES):
        _transpose(y, centre, index, base, yt)
        acc[:] = wt(0)
        for p in range(index.size):
            px = index[p]
            u = centre[px] - mean
            for lane in range(LANES):
                v = yt[p, lane]
                acc[k, lane] += v
                acc[k + 1, lane] += v * u
                acc[k + 2, lane] += v * v
            for j in range(k):
                q = basis[j, px]
                for lane in range(LANES):
                    acc[j, lane] += yt[p, lane] * q
            if t is not None:
                tp = t[px]
                q0 = basis[0, px]
                for lane in range(LANES):
                    v = yt[p, lane]
                    acc[k + 3, lane] += v * v * tp
                    acc[k + 4, lane] += v * q0 * tp
        n_sums = 3 if t is None else 5
        for lane in range(min(LANES, rows - base)):
            r = base + lane
            for j in range(k):
                out[r, j] += acc[j, lane]
            for e in range(n_sums):
                out[r, cols[e]] += acc[k + e, lane]


@jit
def tiny_meat(y, centre, basis, z, terms, index, out):  # pragma: no cover
    """Add ``Σr²`` and ``Σr²·terms[m]`` of ``r = y_c − Σ_j z_j q_j``.

    As :func:`.kernels.residual_sums`, for slices of a few pixels: ``z``
    (rows, k) float64, ``terms`` (P, n_px) or None, ``out`` (rows, 1 + P).
    """
    rows = y.shape[0]
    k = basis.shape[0]
    wt = centre.dtype.type
    n_terms = 0
    if terms is not None:
        n_terms = terms.shape[0]
    yt = np.empty((index.size, LANES), centre.dtype)
    coef = np.empty((max(k, 1), LANES), centre.dtype)
    r = np.empty(LANES, centre.dtype)
    acc = np.empty((1 + n_terms, LANES), centre.dtype)
    last = rows - 1
    for base in range(0, rows, LANES):
        _transpose(y, centre, index, base, yt)
        for j in range(k):
            for lane in range(LANES):
                coef[j, lane] = wt(z[min(base + lane, last), j])
        acc[:] = wt(0)
        for p in range(index.size):
            px = index[p]
            for lane in range(LANES):
                r[lane] = yt[p, lane]
            for j in range(k):
                q = basis[j, px]
                for lane in range(LANES):
                    r[lane] -= coef[j, lane] * q
            for lane in range(LANES):
                r[lane] *= r[lane]
                acc[0, lane] += r[lane]
            if terms is not None:
                for mm in range(n_terms):
                    tq = terms[mm, px]
                    for lane in range(LANES):
                        acc[1 + mm, lane] += r[lane] * tq
        for lane in range(min(LANES, rows - base)):
            for e in range(1 + n_terms):
                out[base + lane, e] += acc[e, lane]
