"""Compiled products of slices read over a moved box (imports numba).

The registration's joint pass (:mod:`napari_mixcoef.model.windows`):
each slice is read run by run at its flat offset, cast and centred on its
bin's centre into a short buffer, and the buffer's products with each of
the bin's columns summed, in the working dtype over one run, then into
float64.  Rows are visited in ``order`` (by bin): a bin's tables are
read from the cache by its slices in turn, not once per slice.
"""

from __future__ import annotations

import numpy as np

from .kernels import jit


@jit
def window_products(
    y, base, which, order, runs, centre, columns, b, yy
):  # pragma: no cover - compiled
    """Add ``columns[j]·y_c`` and ``Σy_c²`` of each row into ``b``, ``yy``.

    ``y_c = y[i, base[i] + run] − centre[j]``, ``j = which[i]``.
    """
    wt = centre.dtype.type
    n_cols = columns.shape[1]
    longest = 0
    for g in range(runs.shape[0]):
        longest = max(longest, runs[g, 2])
    buf = np.empty(longest, centre.dtype)
    acc = np.zeros(n_cols + 1)
    for i in order:
        j = which[i]
        acc[:] = 0.0
        for g in range(runs.shape[0]):
            s0 = runs[g, 0] + base[i]
            f0 = runs[g, 1]
            n = runs[g, 2]
            ys = y[i, s0 : s0 + n]
            cs = centre[j, f0 : f0 + n]
            # separate loops: a store and a sum in one kept it scalar (4×)
            for p in range(n):
                buf[p] = wt(ys[p]) - cs[p]
            q = wt(0)
            for p in range(n):
                q += buf[p] * buf[p]
            acc[n_cols] += q
            for c in range(n_cols):
                col = columns[j, c, f0 : f0 + n]
                s = wt(0)
                for p in range(n):
                    s += buf[p] * col[p]
                acc[c] += s
        for c in range(n_cols):
            b[i, c] += acc[c]
        yy[i] += acc[n_cols]


@jit
def window_fill(
    y, base, which, order, runs, coef, rows, out
):  # pragma: no cover - compiled
    """Write ``y[i, base[i] + run] + coef[i]·rows[which[i]]`` into ``out``.

    The registered slice: read at its offset, plus the noise-free
    correction, a few rows of its bin combined with its own weights.
    """
    wt = out.dtype.type
    n_rows = rows.shape[1]
    for i in order:
        j = which[i]
        for g in range(runs.shape[0]):
            s0 = runs[g, 0] + base[i]
            f0 = runs[g, 1]
            n = runs[g, 2]
            ys = y[i, s0 : s0 + n]
            dst = out[i, f0 : f0 + n]
            for p in range(n):
                dst[p] = wt(ys[p])
            for c in range(n_rows):
                a = wt(coef[i, c])
                row = rows[j, c, f0 : f0 + n]
                for p in range(n):
                    dst[p] += a * row[p]


@jit
def window_meat(
    y, base, which, order, runs, v, columns, twhich, terms, out
):  # pragma: no cover - compiled
    """Add ``Σ_p r_p² terms[twhich[i], :, p]`` of each row into ``out``.

    ``r = y[i, base[i] + run] − v[i]·columns[which[i]]``: the joint fit's
    residuals over the sampled pixels, squared in a short buffer.
    """
    wt = columns.dtype.type
    n_cols = columns.shape[1]
    n_terms = terms.shape[1]
    longest = 0
    for g in range(runs.shape[0]):
        longest = max(longest, runs[g, 2])
    buf = np.empty(longest, columns.dtype)
    acc = np.zeros(n_terms)
    for i in order:
        j = which[i]
        t = twhich[i]
        acc[:] = 0.0
        for g in range(runs.shape[0]):
            s0 = runs[g, 0] + base[i]
            f0 = runs[g, 1]
            n = runs[g, 2]
            ys = y[i, s0 : s0 + n]
            for p in range(n):
                buf[p] = wt(ys[p])
            for c in range(n_cols):
                a = v[i, c]
                col = columns[j, c, f0 : f0 + n]
                for p in range(n):
                    buf[p] -= a * col[p]
            for p in range(n):
                buf[p] = buf[p] * buf[p]
            for e in range(n_terms):
                row = terms[t, e, f0 : f0 + n]
                s = wt(0)
                for p in range(n):
                    s += buf[p] * row[p]
                acc[e] += s
        for e in range(n_terms):
            out[i, e] += acc[e]


@jit
def block_means(y, fr, fc, out):  # pragma: no cover - compiled
    """Means of ``fr × fc`` blocks of images ``y`` (m, H, W) into ``out``.

    Each output row first sums its ``fr`` input rows at full width (one
    vectorized read of each pixel), then the ``fc`` columns of each block.
    """
    wt = out.dtype.type
    rows, cols = out.shape[1], out.shape[2]
    buf = np.empty(cols * fc, out.dtype)
    scale = wt(1.0 / (fr * fc))
    for i in range(y.shape[0]):
        for r in range(rows):
            buf[:] = 0
            for a in range(fr):
                line = y[i, r * fr + a]
                for x in range(cols * fc):
                    buf[x] += wt(line[x])
            dst = out[i, r]
            for c in range(cols):
                s = wt(0)
                for b in range(fc):
                    s += buf[c * fc + b]
                dst[c] = s * scale
