"""Compiled per-slice fits of slices of a few pixels (spectra).

The compiled form of :func:`napari_mixcoef.model.pixelwise.fit_pixels`:
:data:`LANES` slices go side by side, each pixel's centred values of
those slices in one small buffer (pixels × lanes, in L1), so that every
sum is a vector operation across the lanes; each slice's values are read
once, and its reported numbers written once.  float64 arithmetic.
"""

from __future__ import annotations

import math

import numpy as np

from .kernels import jit

#: Slices side by side: two AVX2 vectors of float64.
LANES = 128

_MIX_TWO, _MIX_MANY, _FREE = 0, 1, 2


@jit
def fit_pixels(
    y,
    index,
    centre,
    basis,
    lift,
    beta0,
    var_coef,
    var_row,
    var_total,
    kind,
    n_refs,
    robust,
    scale,
    coef,
    stderr,
    fractions,
    fractions_stderr,
    r2,
    rmse,
):  # pragma: no cover - compiled
    """Fit each row of ``y`` (rows, n_ref) and write its numbers.

    The maps are those of :class:`~napari_mixcoef.model.pixelwise.PixelMaps`
    (float64, over the ``n`` fitted pixels ``index``); the outputs are
    the rows of :class:`~napari_mixcoef.model.pixelwise.PixelOutputs`.
    """
    rows = y.shape[0]
    n = index.size
    k = basis.shape[0]
    m = lift.shape[0]
    dtype = centre.dtype
    wt = dtype.type
    yt = np.empty((n, LANES), dtype)
    w = np.empty((n, LANES), dtype)
    z = np.empty((k, LANES), dtype)
    c = np.empty((m, LANES))
    var = np.empty((m, LANES), dtype)
    f = np.empty((n_refs, LANES))
    fvar = np.empty((n_refs, LANES), dtype)
    ssr = np.empty(LANES, dtype)
    mean = np.empty(LANES, dtype)
    sst = np.empty(LANES, dtype)
    total_sum = np.empty(LANES, dtype)
    total = np.empty(LANES)
    factor = np.empty(LANES)
    fit_r2 = np.empty(LANES)
    fit_rmse = np.empty(LANES)
    for base in range(0, rows, LANES):
        todo = min(LANES, rows - base)
        # a short last group repeats its last row; those lanes are dropped
        for lane in range(LANES):
            row = base + min(lane, todo - 1)
            for p in range(n):
                yt[p, lane] = wt(y[row, index[p]]) - centre[p]
        z[:] = 0.0
        mean[:] = 0.0
        for p in range(n):
            cp = centre[p]
            for lane in range(LANES):
                mean[lane] += yt[p, lane] + cp
            for j in range(k):
                q = basis[j, p]
                for lane in range(LANES):
                    z[j, lane] += q * yt[p, lane]
        ssr[:] = 0.0
        sst[:] = 0.0
        for lane in range(LANES):
            mean[lane] /= n
        for p in range(n):
            cp = centre[p]
            for lane in range(LANES):
                w[p, lane] = yt[p, lane]
                d = yt[p, lane] + cp - mean[lane]
                sst[lane] += d * d
            for j in range(k):
                q = basis[j, p]
                for lane in range(LANES):
                    w[p, lane] -= q * z[j, lane]
            for lane in range(LANES):
                ssr[lane] += w[p, lane] * w[p, lane]
        if robust:
            for p in range(n):
                for lane in range(LANES):
                    w[p, lane] *= w[p, lane]
            factor[:] = scale
        else:
            w[:] = 1.0
            for lane in range(LANES):
                factor[lane] = scale * ssr[lane]
        for i in range(m):
            for lane in range(LANES):
                c[i, lane] = beta0[i]
            for j in range(k):
                t = lift[i, j]
                for lane in range(LANES):
                    c[i, lane] += t * z[j, lane]
        var[:] = 0.0
        for p in range(n):
            for i in range(m):
                t = var_coef[i, p]
                for lane in range(LANES):
                    var[i, lane] += w[p, lane] * t
        for lane in range(LANES):
            fit_rmse[lane] = math.sqrt(ssr[lane] / n)
            s = sst[lane]
            fit_r2[lane] = 1.0 - ssr[lane] / s if s > 0.0 else np.nan
        if kind == _FREE:
            total_sum[:] = 0.0
            fvar[:] = 0.0
            for p in range(n):
                t = var_total[p]
                for lane in range(LANES):
                    total_sum[lane] += w[p, lane] * t
                for i in range(n_refs):
                    t = var_row[i, p]
                    for lane in range(LANES):
                        fvar[i, lane] += w[p, lane] * t
            total[:] = 0.0
            for i in range(n_refs):
                for lane in range(LANES):
                    total[lane] += c[i, lane]
            for lane in range(LANES):
                total[lane] = 1.0 / total[lane]  # one division per slice
            for i in range(n_refs):
                for lane in range(LANES):
                    share = c[i, lane] * total[lane]
                    v = (
                        var[i, lane]
                        - share * fvar[i, lane]
                        + share * share * total_sum[lane]
                    )
                    v = factor[lane] * v * total[lane] * total[lane]
                    f[i, lane] = share
                    fvar[i, lane] = math.sqrt(0.0 if v < 0.0 else v)
        for i in range(m):
            for lane in range(LANES):
                v = factor[lane] * var[i, lane]
                var[i, lane] = math.sqrt(0.0 if v < 0.0 else v)
        for lane in range(todo):
            r = base + lane
            for i in range(m):
                coef[r, i] = c[i, lane]
                stderr[r, i] = var[i, lane]
            rmse[r] = fit_rmse[lane]
            r2[r] = fit_r2[lane]
        if kind == _MIX_TWO:
            for lane in range(todo):
                r = base + lane
                fractions[r, 0] = c[0, lane]
                fractions[r, 1] = 1.0 - c[0, lane]
                fractions_stderr[r, 0] = var[0, lane]
                fractions_stderr[r, 1] = var[0, lane]
        elif kind == _FREE:
            for lane in range(todo):
                r = base + lane
                for i in range(n_refs):
                    fractions[r, i] = f[i, lane]
                    fractions_stderr[r, i] = fvar[i, lane]
