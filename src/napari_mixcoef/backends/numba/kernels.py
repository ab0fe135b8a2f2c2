"""Bodies of the compiled sums kernels (imports numba; loaded lazily).

Each kernel reads a block of slices as stored (any integer or float
dtype), casts and centres each pixel in a register, and adds into
per-slice float64 sums.  :func:`sums_one` is the fused fast path of
one-coefficient models; :func:`sums_many` is generic over the number of
basis vectors.  Every sum runs in the working dtype over one run of at
most :data:`RUN` fitted pixels, then into a float64 total.  See
:mod:`napari_mixcoef.backends.numba` for the arguments.
"""

from __future__ import annotations

import numba
import numpy as np

#: numba's fast-math flags without ``nnan``/``ninf``: NaN and inf keep
#: their meaning, so bad slices are still caught.  ``reassoc`` lets LLVM
#: spread the sums over SIMD lanes, ``contract`` fuses multiply-adds.
FLAGS = frozenset({'reassoc', 'contract', 'nsz', 'arcp'})

#: Most pixels in one working-dtype partial sum.  LLVM spreads each sum
#: over its vector lanes (16 or 32 partial sums for float32), so each lane
#: adds at most a few hundred terms, where float32 keeps ~7 digits; longer
#: runs mean fewer reductions of the lanes into float64.
RUN = 2048

#: Bytes of basis (and term) vectors one band may hold: they stay in a
#: core's L2 cache while every slice of the block passes over them.
BAND_BYTES = 1 << 18


def jit(func):
    """Compile ``func`` (nogil, cached on disk, no division checks)."""
    return numba.njit(
        nogil=True,
        fastmath=set(FLAGS),
        error_model='numpy',
        cache=True,
    )(func)


@numba.njit(inline='always')
def _band(runs, vectors, itemsize):  # pragma: no cover - compiled
    """Return runs per band so that ``vectors`` rows fit BAND_BYTES."""
    per_run = max(1, vectors) * RUN * itemsize
    return max(1, BAND_BYTES // per_run)


@numba.njit(inline='always', fastmath=set(FLAGS))
def _ols_add(s, v, u, c2):  # pragma: no cover - compiled
    """Add one pixel's ``q·y_c, u2·y_c, y_c, y_c²`` to the 4-tuple ``s``."""
    return (s[0] + u * v, s[1] + c2 * v, s[2] + v, s[3] + v * v)


@numba.njit(inline='always', fastmath=set(FLAGS))
def _hac_add(s, v, u, c2, t):  # pragma: no cover - compiled
    """:func:`_ols_add` and ``y_c²·t, y_c·q·t`` on the 6-tuple ``s``."""
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


@numba.njit(inline='always', fastmath=set(FLAGS))
def _four_add(s, a, b, c, d, t):  # pragma: no cover - compiled
    """Add ``a·t, b·t, c·t, d·t`` to the 4-tuple ``s``."""
    return (s[0] + a * t, s[1] + b * t, s[2] + c * t, s[3] + d * t)


@numba.njit(inline='always', fastmath=set(FLAGS))
def _centred4(ya, yb, yc, yd, cs, p, wt):  # pragma: no cover - compiled
    """Pixel ``p`` of four rows, cast to ``wt`` and centred on ``cs[p]``."""
    c = cs[p]
    return wt(ya[p]) - c, wt(yb[p]) - c, wt(yc[p]) - c, wt(yd[p]) - c


@jit
def sums_one(y, centre, mean, q, t, runs, out, cols):  # pragma: no cover
    """Add each row's sums for a one-vector basis (``k = 1``), fused.

    Per pixel one cast, one centring and four (six with ``t``) sums in
    registers: ``q·y_c``, ``u2·y_c`` (``u2 = M − mean`` formed on the fly,
    as it reads ``M`` anyway), ``Σy_c``, ``Σy_c²`` and with the HAC term
    ``t`` also ``Σy_c²t``, ``Σy_c q t``; ``cols`` (6,) are their columns
    in ``out``.  Float rows go four side by side (three with ``t``: four
    rows' 24 accumulators would spill from the registers), sharing each
    load of the vectors; ``t is None`` is decided when numba compiles (one
    machine code with the HAC sums, one without).
    """
    rows = y.shape[0]
    wt = centre.dtype.type
    z = wt(0)
    width = 4 if t is None else 3
    total = np.zeros((4, 6))
    for i in range(0, rows, width):
        # a last short group repeats its last row; those sums are dropped
        last = rows - 1
        j, k, m = min(i + 1, last), min(i + 2, last), min(i + 3, last)
        total[:] = 0.0
        for g in range(runs.shape[0]):
            p0, p1 = runs[g, 0], runs[g, 1]
            cs, us = centre[p0:p1], q[p0:p1]
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
            for e in range(6):
                total[0, e] += sa[e]
                total[1, e] += sb[e]
                total[2, e] += sc[e]
                total[3, e] += sd[e]
        n_sums = 4 if t is None else 6
        for r in range(min(width, rows - i)):
            for e in range(n_sums):
                out[i + r, cols[e]] += total[r, e]


@jit
def sums_single(y, centre, mean, q, t, runs, out, cols):  # pragma: no cover
    """:func:`sums_one` one row at a time (for 8- and 16-bit data).

    Several rows side by side were slower for small integers, whose cast
    costs more than the loads it would share.
    """
    wt = centre.dtype.type
    z = wt(0)
    n_sums = 4 if t is None else 6
    for i in range(y.shape[0]):
        total = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        for g in range(runs.shape[0]):
            p0, p1 = runs[g, 0], runs[g, 1]
            cs, us, ys = centre[p0:p1], q[p0:p1], y[i, p0:p1]
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
        for e in range(n_sums):
            out[i, cols[e]] += total[e]


@jit
def sums_many(y, centre, mean, basis, runs, out, cols):  # pragma: no cover
    """Add each row's sums for a basis of several vectors (``k ≥ 2``).

    Four rows side by side: the first pass over a run sums ``q₀·y_c``,
    ``u2·y_c``, ``Σy_c`` and ``Σy_c²``; each further two or three basis
    vectors are one more vectorized pass that centres the rows again from
    L1 (three where that leaves no single vector over; a
    buffer of centred values is slower: its stores keep LLVM from
    vectorizing the first pass).  Runs are visited band by band (all rows
    of the block for each), so the band's basis vectors stay in the L2
    cache whatever their number.  ``cols`` (4,) are the columns of
    ``Σy_c``, ``u2ᵀy_c``, ``Σy_c²`` and (unused) 0; ``g`` goes to columns
    ``0 … k−1``.
    """
    rows = y.shape[0]
    nb = basis.shape[0]
    wt = centre.dtype.type
    z = wt(0)
    n_runs = runs.shape[0]
    tot = np.zeros((4, nb + 3))
    band = _band(runs, nb + 1, centre.itemsize)
    for b0 in range(0, n_runs, band):
        b1 = min(b0 + band, n_runs)
        for i in range(0, rows, 4):
            last = rows - 1
            i1, i2, i3 = min(i + 1, last), min(i + 2, last), min(i + 3, last)
            tot[:] = 0.0
            for g in range(b0, b1):
                p0, p1 = runs[g, 0], runs[g, 1]
                m = p1 - p0
                cs = centre[p0:p1]
                q = basis[0, p0:p1]
                ya, yb = y[i, p0:p1], y[i1, p0:p1]
                yc, yd = y[i2, p0:p1], y[i3, p0:p1]
                sa = sb = sc = sd = (z, z, z, z)
                for p in range(m):
                    c = cs[p]
                    u = q[p]
                    c2 = c - mean
                    va = wt(ya[p]) - c
                    vb = wt(yb[p]) - c
                    vc = wt(yc[p]) - c
                    vd = wt(yd[p]) - c
                    sa = _ols_add(sa, va, u, c2)
                    sb = _ols_add(sb, vb, u, c2)
                    sc = _ols_add(sc, vc, u, c2)
                    sd = _ols_add(sd, vd, u, c2)
                for e in range(4):
                    tot[0, e] += sa[e]
                    tot[1, e] += sb[e]
                    tot[2, e] += sc[e]
                    tot[3, e] += sd[e]
                j = 1
                while j < nb:
                    left = nb - j
                    if left == 3 or left >= 5:  # leaves no single vector
                        q1 = basis[j, p0:p1]
                        q2 = basis[j + 1, p0:p1]
                        q3 = basis[j + 2, p0:p1]
                        s1 = s2 = s3 = (z, z, z, z)
                        for p in range(m):
                            a, b, c, d = _centred4(ya, yb, yc, yd, cs, p, wt)
                            s1 = _four_add(s1, a, b, c, d, q1[p])
                            s2 = _four_add(s2, a, b, c, d, q2[p])
                            s3 = _four_add(s3, a, b, c, d, q3[p])
                        for r in range(4):
                            tot[r, 3 + j] += s1[r]
                            tot[r, 4 + j] += s2[r]
                            tot[r, 5 + j] += s3[r]
                        j += 3
                        continue
                    # a pair (a single vector repeats itself, dropped),
                    # written out: through the helpers above it ran
                    # slower for K = 4, whose one extra pass this is
                    j2 = min(j + 1, nb - 1)
                    q = basis[j, p0:p1]
                    q2 = basis[j2, p0:p1]
                    sa = sb = sc = sd = z
                    ta = tb = tc = td = z
                    for p in range(m):
                        qp = q[p]
                        qq = q2[p]
                        cc = cs[p]
                        a = wt(ya[p]) - cc
                        b = wt(yb[p]) - cc
                        c = wt(yc[p]) - cc
                        d = wt(yd[p]) - cc
                        sa += a * qp
                        sb += b * qp
                        sc += c * qp
                        sd += d * qp
                        ta += a * qq
                        tb += b * qq
                        tc += c * qq
                        td += d * qq
                    tot[0, 3 + j] += sa
                    tot[1, 3 + j] += sb
                    tot[2, 3 + j] += sc
                    tot[3, 3 + j] += sd
                    if j2 != j:
                        tot[0, 3 + j2] += ta
                        tot[1, 3 + j2] += tb
                        tot[2, 3 + j2] += tc
                        tot[3, 3 + j2] += td
                    j += 2
            for r in range(min(4, rows - i)):
                out[i + r, 0] += tot[r, 0]
                for j in range(1, nb):
                    out[i + r, j] += tot[r, 3 + j]
                out[i + r, cols[1]] += tot[r, 1]
                out[i + r, cols[0]] += tot[r, 2]
                out[i + r, cols[2]] += tot[r, 3]


@jit
def residual_sums(y, centre, basis, z, k, terms, runs, out):
    """Add ``Σr²`` and ``Σr²·terms[m]`` of ``r = y_c − Σ_{j<k} z_j q_j``.

    ``y``, ``centre``, ``basis`` and ``runs`` as in :func:`block_sums`;
    ``z`` (rows, k) float64; ``terms`` (P, n_px) in the working dtype or
    None; ``out`` (rows, 1 + P) float64.  The residual is formed in the
    working dtype, as numpy's path forms it.
    """
    rows = y.shape[0]
    wt = centre.dtype.type
    zero = wt(0)
    n_runs = runs.shape[0]
    n_terms = 0
    if terms is not None:
        n_terms = terms.shape[0]
    buf = np.empty((4, RUN), centre.dtype)
    coef = np.empty((4, max(k, 1)), centre.dtype)
    tot = np.zeros((4, 1 + n_terms))
    band = _band(runs, k + n_terms + 1, centre.itemsize)
    for b0 in range(0, n_runs, band):
        b1 = min(b0 + band, n_runs)
        for i in range(0, rows, 4):
            last = rows - 1
            i1, i2, i3 = min(i + 1, last), min(i + 2, last), min(i + 3, last)
            for j in range(k):
                coef[0, j] = wt(z[i, j])
                coef[1, j] = wt(z[i1, j])
                coef[2, j] = wt(z[i2, j])
                coef[3, j] = wt(z[i3, j])
            tot[:] = 0.0
            for g in range(b0, b1):
                p0, p1 = runs[g, 0], runs[g, 1]
                m = p1 - p0
                cs = centre[p0:p1]
                ya, yb, yc, yd = (
                    y[i, p0:p1],
                    y[i1, p0:p1],
                    y[i2, p0:p1],
                    y[i3, p0:p1],
                )
                for p in range(m):
                    c = cs[p]
                    buf[0, p] = wt(ya[p]) - c
                    buf[1, p] = wt(yb[p]) - c
                    buf[2, p] = wt(yc[p]) - c
                    buf[3, p] = wt(yd[p]) - c
                for j in range(k):
                    q = basis[j, p0:p1]
                    ca, cb, cc, cd = (
                        coef[0, j],
                        coef[1, j],
                        coef[2, j],
                        coef[3, j],
                    )
                    for p in range(m):
                        qp = q[p]
                        buf[0, p] -= ca * qp
                        buf[1, p] -= cb * qp
                        buf[2, p] -= cc * qp
                        buf[3, p] -= cd * qp
                sa = sb = sc = sd = zero
                for p in range(m):
                    a, b, c, d = buf[0, p], buf[1, p], buf[2, p], buf[3, p]
                    a, b, c, d = a * a, b * b, c * c, d * d
                    buf[0, p] = a
                    buf[1, p] = b
                    buf[2, p] = c
                    buf[3, p] = d
                    sa += a
                    sb += b
                    sc += c
                    sd += d
                tot[0, 0] += sa
                tot[1, 0] += sb
                tot[2, 0] += sc
                tot[3, 0] += sd
                if terms is not None:
                    for mm in range(n_terms):
                        tt = terms[mm, p0:p1]
                        sa = sb = sc = sd = zero
                        for p in range(m):
                            tp = tt[p]
                            sa += buf[0, p] * tp
                            sb += buf[1, p] * tp
                            sc += buf[2, p] * tp
                            sd += buf[3, p] * tp
                        tot[0, 1 + mm] += sa
                        tot[1, 1 + mm] += sb
                        tot[2, 1 + mm] += sc
                        tot[3, 1 + mm] += sd
            for r in range(min(4, rows - i)):
                for mm in range(1 + n_terms):
                    out[i + r, mm] += tot[r, mm]


@jit
def sampled_meat(y, runs, centre, basis, z, terms, out):  # pragma: no cover
    """Add ``Σ_p r_p²·terms[m, p]`` over the meat's sample into ``out``.

    ``r = y_c − Σ_j z_j q_j`` at the pixels of ``runs``; ``centre`` (n_s,),
    ``basis`` (k, n_s) and ``terms`` (P, n_s) are the design and the
    sandwich terms at those pixels, compacted in the order of the runs, in
    the working dtype; ``out`` (rows, P) float64.  Four rows side by side:
    their runs are gathered and centred into a buffer (the four rows'
    reads overlap), each basis vector is one long vectorized pass over it,
    then each four terms are one pass of sixteen sums (four rows × four
    terms share every load).  A short last group repeats its last row;
    those sums are dropped.
    """
    rows = y.shape[0]
    k = basis.shape[0]
    n = centre.shape[0]
    n_terms = terms.shape[0]
    wt = centre.dtype.type
    zero = wt(0)
    buf = np.empty((4, n), centre.dtype)
    last = rows - 1
    for i in range(0, rows, 4):
        o = 0
        for g in range(runs.shape[0]):
            p0, p1 = runs[g, 0], runs[g, 1]
            m = p1 - p0
            cs = centre[o : o + m]
            for r in range(4):
                # slices, not buf[r, o + p]: offset indices defeat vectorizing
                src, part = y[min(i + r, last), p0:p1], buf[r, o : o + m]
                for p in range(m):
                    part[p] = wt(src[p]) - cs[p]
            o += m
        for r in range(4):
            dest = buf[r]
            for j in range(k):
                q, cj = basis[j], wt(z[min(i + r, last), j])
                for p in range(n):
                    dest[p] -= cj * q[p]
            for p in range(n):
                dest[p] *= dest[p]
        a, b, c, d = buf[0], buf[1], buf[2], buf[3]
        for m0 in range(0, n_terms, 4):
            m1 = min(m0 + 1, n_terms - 1)
            m2 = min(m0 + 2, n_terms - 1)
            m3 = min(m0 + 3, n_terms - 1)
            t0, t1, t2, t3 = terms[m0], terms[m1], terms[m2], terms[m3]
            s0 = s1 = s2 = s3 = (zero, zero, zero, zero)
            for p in range(n):
                ap, bp, cp, dp = a[p], b[p], c[p], d[p]
                s0 = _four_add(s0, ap, bp, cp, dp, t0[p])
                s1 = _four_add(s1, ap, bp, cp, dp, t1[p])
                s2 = _four_add(s2, ap, bp, cp, dp, t2[p])
                s3 = _four_add(s3, ap, bp, cp, dp, t3[p])
            for r in range(min(4, rows - i)):
                # a term repeated past the last one is dropped
                out[i + r, m0] += s0[r]
                if m1 > m0:
                    out[i + r, m1] += s1[r]
                if m2 > m1:
                    out[i + r, m2] += s2[r]
                if m3 > m2:
                    out[i + r, m3] += s3[r]


@jit
def lag_products(a, n, starts, out):
    """Add ``Σ_{p<n} a[p]·a[p + s + m]``, m = 0..8, into ``out[g, m]``.

    For each start ``s = starts[g]``: nine neighbouring offsets share each
    load of ``a[p]``.  ``a`` holds at least ``n + max(starts) + 8``
    elements, zero past ``n``.  Band by band of 2048 elements, all starts
    in each, so that the reads come from L1.
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


@jit
def correlate_rows(images, kernel, out):  # pragma: no cover - compiled
    """``out[i] = ρ ⋆ images[i]`` for 2-D images, zero outside the image.

    ``images``, ``out`` (k, H, W) float64, ``kernel`` (h, w) with odd
    sides, centred.  Per output row, each tap of the kernel is one
    vectorized pass over the row in L1 (slices, so that it vectorizes).
    """
    n, rows, cols = images.shape
    kh, kw = kernel.shape
    cy, cx = kh // 2, kw // 2
    for i in range(n):
        for r in range(rows):
            dest = out[i, r]
            dest[:] = 0.0
            for dy in range(kh):
                src_row = r + dy - cy
                if src_row < 0 or src_row >= rows:
                    continue
                src = images[i, src_row]
                for dx in range(kw):
                    c = kernel[dy, dx]
                    if c == 0.0:
                        continue
                    shift = dx - cx
                    x0 = max(0, -shift)
                    x1 = min(cols, cols - shift)
                    if x1 <= x0:
                        continue
                    part = dest[x0:x1]
                    taps = src[x0 + shift : x1 + shift]
                    for p in range(x1 - x0):
                        part[p] += c * taps[p]
