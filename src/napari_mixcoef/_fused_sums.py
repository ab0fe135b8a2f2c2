"""Bodies of the one-pass sums kernels, compiled by :func:`._fused.jit`.

Imported only when the compiled path is used (it imports numba, which
takes seconds).  See :func:`napari_mixcoef._fused.block_sums` and
:func:`napari_mixcoef._fused.exact_sums` for the arguments.
"""

from __future__ import annotations

import numba
import numpy as np

from ._fused import FLAGS


def _inline(func):
    # small steps of the kernels' loops, compiled into them
    return numba.njit(inline='always', fastmath=set(FLAGS))(func)


@_inline
def _ols_add(s, v, u, c2):  # pragma: no cover - compiled
    """Add one pixel's ``u1·y_c, u2·y_c, y_c, y_c²`` to the 4-tuple ``s``."""
    return (s[0] + u * v, s[1] + c2 * v, s[2] + v, s[3] + v * v)


@_inline
def _hac_add(s, v, u, c2, t):  # pragma: no cover - compiled
    """:func:`_ols_add` and ``y_c²·t, y_c·u1·t`` on the 6-tuple ``s``."""
    w = u * v
    q = v * v
    return (
        s[0] + w,
        s[1] + c2 * v,
        s[2] + v,
        s[3] + q,
        s[4] + q * t,
        s[5] + w * t,
    )


def sums(y, centre, mean, u1, t, segs, out):  # pragma: no cover - compiled
    """Add each slice's sums over ``y_c = y − M`` into ``out``.

    Several slices at a time (rows ``i, j, k, m``): they share each load
    of the vectors, and several streams of data keep more reads in flight.
    Four for the four sums of textbook errors, three with the two HAC sums:
    four slices' 24 accumulators spill from AVX2's 16 registers, and whole
    fits of 5000 × 64 × 64 float64 took ~20 % less time three at a time
    (float32 at 2000 × 256 × 256: the same; two slices: as three).
    ``t is None`` is decided when numba compiles (one machine code with
    the HAC sums, one without).  Each sum runs in the working dtype over
    one run of ``segs`` (SIMD lanes), then into a float64 total; a slice's
    sums travel as a tuple, in registers.
    """
    rows = y.shape[0]
    wt = centre.dtype.type
    z = wt(0)
    width = 4 if t is None else 3
    total = np.zeros((4, 6))
    for i in range(0, rows, width):
        # a last short group repeats its last slice; those sums are dropped
        last = rows - 1
        j, k, m = min(i + 1, last), min(i + 2, last), min(i + 3, last)
        total[:] = 0.0
        for g in range(segs.shape[0]):
            p0, p1 = segs[g, 0], segs[g, 1]
            cs, us = centre[p0:p1], u1[p0:p1]
            ya, yb = y[i, p0:p1], y[j, p0:p1]
            yc, yd = y[k, p0:p1], y[m, p0:p1]
            if t is None:
                sa = sb = sc = sd = (z, z, z, z)
                for p in range(p1 - p0):
                    c, u = cs[p], us[p]
                    c2 = c - mean
                    sa = _ols_add(sa, wt(ya[p]) - c, u, c2)
                    sb = _ols_add(sb, wt(yb[p]) - c, u, c2)
                    sc = _ols_add(sc, wt(yc[p]) - c, u, c2)
                    sd = _ols_add(sd, wt(yd[p]) - c, u, c2)
                zz = (z, z)
                sa, sb, sc, sd = sa + zz, sb + zz, sc + zz, sd + zz
            else:
                ts = t[p0:p1]
                sa = sb = sc = sd = (z, z, z, z, z, z)  # sd stays 0
                for p in range(p1 - p0):
                    c, u, tp = cs[p], us[p], ts[p]
                    c2 = c - mean
                    sa = _hac_add(sa, wt(ya[p]) - c, u, c2, tp)
                    sb = _hac_add(sb, wt(yb[p]) - c, u, c2, tp)
                    sc = _hac_add(sc, wt(yc[p]) - c, u, c2, tp)
            for q in range(6):
                total[0, q] += sa[q]
                total[1, q] += sb[q]
                total[2, q] += sc[q]
                total[3, q] += sd[q]
        for r in range(min(width, rows - i)):
            for q, col in enumerate((0, 1, 2, 4, 5, 6)):
                out[i + r, col] += total[r, q]


def sums_one(y, centre, mean, u1, t, segs, out):  # pragma: no cover
    """:func:`sums` one slice at a time (for 8- and 16-bit data)."""
    wt = centre.dtype.type
    z = wt(0)
    for i in range(y.shape[0]):
        total = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        for g in range(segs.shape[0]):
            p0, p1 = segs[g, 0], segs[g, 1]
            cs, us, ys = centre[p0:p1], u1[p0:p1], y[i, p0:p1]
            if t is None:
                s = (z, z, z, z)
                for p in range(p1 - p0):
                    c = cs[p]
                    s = _ols_add(s, wt(ys[p]) - c, us[p], c - mean)
                s = s + (z, z)
            else:
                ts = t[p0:p1]
                s = (z, z, z, z, z, z)
                for p in range(p1 - p0):
                    c = cs[p]
                    s = _hac_add(s, wt(ys[p]) - c, us[p], c - mean, ts[p])
            total = (
                total[0] + s[0],
                total[1] + s[1],
                total[2] + s[2],
                total[3] + s[3],
                total[4] + s[4],
                total[5] + s[5],
            )
        for q, col in enumerate((0, 1, 2, 4, 5, 6)):
            out[i, col] += total[q]


def exact(y, centre, mean, u1, coef, t, segs, out):  # pragma: no cover
    """Add ``Σr²`` (and ``Σr²t``) of each slice's explicit residuals."""
    rows = y.shape[0]
    wt = centre.dtype.type
    for i in range(rows):
        c0, c1, c2 = wt(coef[i, 0]), wt(coef[i, 1]), wt(coef[i, 2])
        a0 = a1 = 0.0
        for g in range(segs.shape[0]):
            p0, p1 = segs[g, 0], segs[g, 1]
            ys, cs, us = y[i, p0:p1], centre[p0:p1], u1[p0:p1]
            s0 = s1 = 0.0
            if t is None:
                for p in range(p1 - p0):
                    c = cs[p]
                    r = (wt(ys[p]) - c) - (c0 * us[p] + c1 * (c - mean) + c2)
                    s0 += np.float64(r) * np.float64(r)
            else:
                ts = t[p0:p1]
                for p in range(p1 - p0):
                    c = cs[p]
                    r = (wt(ys[p]) - c) - (c0 * us[p] + c1 * (c - mean) + c2)
                    rr = np.float64(r) * np.float64(r)
                    s0 += rr
                    s1 += rr * ts[p]
            a0 += s0
            a1 += s1
        out[i, 0] += a0
        out[i, 1] += a1


def exact_terms(  # pragma: no cover - compiled
    y, centre, mean, u1, coef, terms, segs, out
):
    """Add ``Σr²`` and ``Σr²·terms[m]`` (six rows) of explicit residuals.

    Band by band of runs (~32 KiB of each of the eight vectors), all rows
    in each: at 256 × 256 the vectors of whole slices (2 MiB in float32)
    spill from a core's L2 cache, and every slice would read them again
    from L3.
    """
    rows = y.shape[0]
    wt = centre.dtype.type
    z = wt(0)
    n_seg = segs.shape[0]
    per_band = max(1, (1 << 15) // (centre.itemsize * 512))
    for b0 in range(0, n_seg, per_band):
        b1 = min(b0 + per_band, n_seg)
        for i in range(rows):
            c0, c1, c2 = wt(coef[i, 0]), wt(coef[i, 1]), wt(coef[i, 2])
            for g in range(b0, b1):
                p0, p1 = segs[g, 0], segs[g, 1]
                ys, cs, us = y[i, p0:p1], centre[p0:p1], u1[p0:p1]
                t0, t1, t2 = terms[0, p0:p1], terms[1, p0:p1], terms[2, p0:p1]
                t3, t4, t5 = terms[3, p0:p1], terms[4, p0:p1], terms[5, p0:p1]
                s0 = s1 = s2 = s3 = s4 = s5 = s6 = z
                for p in range(p1 - p0):
                    c = cs[p]
                    r = (wt(ys[p]) - c) - (c0 * us[p] + c1 * (c - mean) + c2)
                    rr = r * r
                    s0 += rr
                    s1 += rr * t0[p]
                    s2 += rr * t1[p]
                    s3 += rr * t2[p]
                    s4 += rr * t3[p]
                    s5 += rr * t4[p]
                    s6 += rr * t5[p]
                # a run's sums in the working dtype, the totals in float64
                run = (s0, s1, s2, s3, s4, s5, s6)
                for m in range(7):
                    out[i, m] += run[m]


def lag_products(a, n, starts, out):  # pragma: no cover - compiled
    """Add ``Σ_{p<n} a[p]·a[p + s + m]``, m = 0..8, into ``out[g, m]``.

    For each start ``s = starts[g]``: nine neighbouring offsets share each
    load of ``a[p]``.  ``a`` holds at least ``n + max(starts) + 8``
    elements, zero past ``n``.  Band by band of 2048 elements (16 KiB), all
    starts in each, so that the reads come from L1.
    """
    z = a.dtype.type(0)
    for b0 in range(0, n, 2048):
        b1 = min(b0 + 2048, n)
        for g in range(starts.shape[0]):
            o = starts[g]
            x, y = a[b0:b1], a[b0 + o : b1 + o + 8]
            s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = s8 = z
            for p in range(b1 - b0):  # from 0: the loop vectorizes
                v = x[p]
                s0 += v * y[p]
                s1 += v * y[p + 1]
                s2 += v * y[p + 2]
                s3 += v * y[p + 3]
                s4 += v * y[p + 4]
                s5 += v * y[p + 5]
                s6 += v * y[p + 6]
                s7 += v * y[p + 7]
                s8 += v * y[p + 8]
            band = (s0, s1, s2, s3, s4, s5, s6, s7, s8)
            for m in range(9):
                out[g, m] += band[m]
