"""The compiled per-slice IRLS fit of one-coefficient models (numba).

:func:`napari_mixcoef.model.noise.fit_block` runs every IRLS step as
whole-block numpy passes, each of which streams the block (several
slices, more than the L2 cache) through memory again.  Here each slice is
fitted on its own while it sits in the L2 cache: a first loop casts and
centres it into a buffer and gathers ``Qᵀy_c`` and ``Σy_c²``, each IRLS
iteration is one loop that computes the weights (or Huber's ψ) and the
weighted sums at once, and a last loop forms the residuals and the sums
of the covariance.  Only the fitted pixels are visited, as runs.

The arithmetic follows the numpy reference step for step in the working
dtype (the same roundings of ``z``, the residuals, Huber's thresholds and
the Poisson weights; the MAD is the same sample element, found by an
exact radix select).  Only the sums differ: each runs in the working
dtype over at most :data:`CHUNK` pixels and is then added in float64,
where numpy's float32 BLAS sums whole slices in float32.
"""

from __future__ import annotations

import numba
import numpy as np

from ...model.noise import HUBER_C, MAD_SCALE, REJECT

#: The sums' flags without ``contract`` (no fused multiply-adds: residuals
#: round as numpy's do, so that Huber's clipping and rejection decide
#: alike).
FASTMATH = frozenset({'nsz', 'arcp', 'reassoc', 'afn'})

#: Most pixels in one partial sum.
CHUNK = 1024
_TINY = float(np.finfo(np.float32).tiny)  # as the numpy reference's MAD

NOISE_CODES = {'gaussian': 0, 'poisson': 1, 'huber': 2}

#: Columns of the kernel's rows: z, bread, meat, SSR, Σy_c², Σy_c, u2ᵀy_c.
Z, BREAD, MEAT, SSR, YY, S, H = range(7)
WIDTH = 7


def constants(spec, dtype) -> np.ndarray:
    """Return the constants in the working dtype, as numpy rounds them."""
    return np.array(
        [spec.camera_offset, spec.floor, 1.0, HUBER_C, REJECT, 0.0], dtype
    )


@numba.njit(inline='always', fastmath=set(FASTMATH))
def _robust_scale(ysample, dsample, dt, absr, keys, candidates, histogram):
    """MAD scale of ``ysample − dt·dsample``: a radix select, 11 bits a time.

    Several times faster than a partition, whose branches mispredict;
    exact (the same element numpy's partition picks).
    """  # pragma: no cover - compiled
    n_sample = ysample.size
    for s in range(n_sample):
        r = ysample[s] - dt * dsample[s]
        absr[s] = np.float64(abs(r))  # exact
    low = keys[0]
    high = keys[0]
    for s in range(n_sample):
        key = keys[s]
        candidates[s] = key
        low = min(low, key)
        high = max(high, key)
    shift = 0  # start below the bits that all share
    while (low ^ high) >> (shift + 11) != 0:
        shift += 1
    m = n_sample
    rank = n_sample // 2
    while m > 1:
        histogram[:] = 0
        for s in range(m):
            histogram[(candidates[s] >> shift) & 2047] += 1
        below = 0
        digit = 0
        while below + histogram[digit] <= rank:
            below += histogram[digit]
            digit += 1
        rank -= below
        kept = 0
        for s in range(m):  # keep that digit's keys
            key = candidates[s]
            candidates[kept] = key
            kept += 1 if (key >> shift) & 2047 == digit else 0
        m = kept
        if shift == 0:
            break
        shift = max(shift - 11, 0)
    picked = np.empty(1, np.int64)
    picked[0] = candidates[0]
    mad = picked.view(np.float64)[0]
    return max(mad * MAD_SCALE, _TINY)


def _fit_rows(
    y,
    centre,
    d,
    u2,
    terms,
    runs,
    sample,
    consts,
    noise,
    auto,
    iterations,
    n,
    out,
):  # pragma: no cover - compiled
    """Fit each row of ``y`` (k = 1); write the rows of :data:`Z` … ``H``.

    ``y`` (rows, n_px) as stored; ``centre``, the basis vector ``d`` and
    ``u2 = M − mean`` (n_px) in the working dtype T (every constant that
    meets a T value comes from ``consts`` or goes through ``cast``, or
    numba would promote the arithmetic to float64 where numpy's stays in
    T); ``terms`` (n_px) the sandwich term (``auto``) or any T array;
    ``out`` (rows, WIDTH).
    """
    offset = consts[0]
    floor = consts[1]
    one = consts[2]
    huber_c = consts[3]
    reject = consts[4]
    zero = consts[5]
    T = centre.dtype.type
    cast = np.empty(2, centre.dtype)  # float64 → T, rounded as numpy does
    ybuf = np.zeros(y.shape[1], centre.dtype)
    n_sample = sample.size
    ysample = np.empty(n_sample, centre.dtype)
    dsample = np.empty(n_sample, centre.dtype)
    absr = np.empty(n_sample, np.float64)
    keys = absr.view(np.int64)
    candidates = np.empty(n_sample, np.int64)
    histogram = np.empty(2048, np.int32)
    for i in range(y.shape[0]):
        row = y[i]
        yb = ybuf
        # 1. y_c = T(row) − M into ybuf; qᵀy_c, u2ᵀy_c, Σy_c, Σy_c²: the
        # least-squares start and the output's sums
        g0 = 0.0
        h1 = 0.0
        h2 = 0.0
        q = 0.0
        for j in range(runs.shape[0]):
            a, b = runs[j, 0], runs[j, 1]
            ys, ds, v2 = yb[a:b], d[a:b], u2[a:b]
            rs, cs = row[a:b], centre[a:b]
            s0 = zero
            s1 = zero
            s2 = zero
            s3 = zero
            for p in range(b - a):
                yp = T(rs[p]) - cs[p]
                ys[p] = yp
                s0 += yp * ds[p]
                s1 += yp * v2[p]
                s2 += yp
                s3 += yp * yp
            g0 += s0
            h1 += s1
            h2 += s2
            q += s3
        out[i, S] = h2
        out[i, H] = h1
        z = g0
        previous = z
        scale = 0.0
        bread = 1.0
        # 2. IRLS, one loop per iteration
        for it in range(iterations):
            cast[0] = z
            dt = cast[0]
            if noise == 1:  # Poisson: weights 1 / max(M + q z − c + f, f)
                gram = 0.0
                rhs = 0.0
                for j in range(runs.shape[0]):
                    a, b = runs[j, 0], runs[j, 1]
                    ys, ds, cs = yb[a:b], d[a:b], centre[a:b]
                    s0 = zero
                    s1 = zero
                    for p in range(b - a):
                        dp = ds[p]
                        mu = dt * dp + ((cs[p] - offset) + floor)
                        mu = mu if mu > floor else floor
                        w = one / mu
                        s0 += w * (dp * dp)
                        s1 += w * (ys[p] * dp)
                    gram += s0
                    rhs += s1
                previous = z
                z = rhs / gram
                bread = gram
            elif noise == 2:  # Huber: z += q ᵀψ(r)
                if it < 2:
                    if it == 0:
                        for s in range(n_sample):
                            ysample[s] = yb[sample[s]]
                            dsample[s] = d[sample[s]]
                    scale = _robust_scale(
                        ysample,
                        dsample,
                        dt,
                        absr,
                        keys,
                        candidates,
                        histogram,
                    )
                cast[1] = scale
                clip = huber_c * cast[1]
                gross = reject * cast[1]
                step = 0.0
                for j in range(runs.shape[0]):
                    a, b = runs[j, 0], runs[j, 1]
                    ys, ds = yb[a:b], d[a:b]
                    s0 = zero
                    for p in range(b - a):
                        dp = ds[p]
                        r = ys[p] - dt * dp
                        psi = r if r > -clip else -clip
                        psi = psi if psi < clip else clip
                        psi = zero if abs(r) > gross else psi
                        s0 += psi * dp
                    step += s0
                z = z + step
        # 3. residuals: SSR and the covariance's middle ("meat")
        cast[0] = z
        dt = cast[0]
        ssr = 0.0
        meat = 0.0  # Σψr, Σψ², Σψ²t or Σr²t
        count = 0.0  # Huber's inliers (an integer count)
        if noise == 1:
            cast[1] = previous  # the weights of the last iteration
            dw = cast[1]
            for j in range(runs.shape[0]):
                a, b = runs[j, 0], runs[j, 1]
                ys, ds, cs, ts = yb[a:b], d[a:b], centre[a:b], terms[a:b]
                s0 = zero
                s1 = zero
                if auto:
                    for p in range(b - a):
                        dp = ds[p]
                        r = ys[p] - dt * dp
                        mu = dw * dp + ((cs[p] - offset) + floor)
                        mu = mu if mu > floor else floor
                        psi = (one / mu) * r
                        s0 += r * r
                        s1 += (psi * psi) * ts[p]
                else:
                    for p in range(b - a):
                        dp = ds[p]
                        r = ys[p] - dt * dp
                        mu = dw * dp + ((cs[p] - offset) + floor)
                        mu = mu if mu > floor else floor
                        s0 += r * r
                        s1 += ((one / mu) * r) * r
                ssr += s0
                meat += s1
            if not auto:  # quasi-likelihood: Ω = Σψr · bread
                meat = meat * bread
        elif noise == 2:
            cast[1] = scale
            clip = huber_c * cast[1]
            gross = reject * cast[1]
            inliers = 0.0
            for j in range(runs.shape[0]):
                a, b = runs[j, 0], runs[j, 1]
                ys, ds, ts = yb[a:b], d[a:b], terms[a:b]
                s0 = zero
                s1 = zero
                s2 = zero
                if auto:  # bread: Σ ψ'·q² over the inliers
                    for p in range(b - a):
                        dp = ds[p]
                        r = ys[p] - dt * dp
                        size = abs(r)
                        psi = r if r > -clip else -clip
                        psi = psi if psi < clip else clip
                        psi = zero if size > gross else psi
                        s0 += r * r
                        s1 += (psi * psi) * ts[p]
                        s2 += (dp * dp) if size <= clip else zero
                else:  # the inliers counted in T, exact up to 2**24
                    for p in range(b - a):
                        r = ys[p] - dt * ds[p]
                        size = abs(r)
                        psi = r if r > -clip else -clip
                        psi = psi if psi < clip else clip
                        psi = zero if size > gross else psi
                        s0 += r * r
                        s1 += psi * psi
                        s2 += one if size <= clip else zero
                ssr += s0
                meat += s1
                inliers += s2
            if auto:
                bread = inliers
            else:  # Huber's classic: Σψ² / (share of inliers)²
                count = inliers
                frac = max(count / n, 1.0 / n)
                meat = meat / (frac * frac)
        else:
            for j in range(runs.shape[0]):
                a, b = runs[j, 0], runs[j, 1]
                ys, ds, ts = yb[a:b], d[a:b], terms[a:b]
                s0 = zero
                s1 = zero
                if auto:
                    for p in range(b - a):
                        r = ys[p] - dt * ds[p]
                        s0 += r * r
                        s1 += (r * r) * ts[p]
                else:
                    for p in range(b - a):
                        r = ys[p] - dt * ds[p]
                        s0 += r * r
                ssr += s0
                meat += s1
            if not auto:
                meat = ssr
        out[i, Z] = z
        out[i, BREAD] = bread
        out[i, MEAT] = meat
        out[i, SSR] = ssr
        out[i, YY] = q


#: :func:`_fit_rows` compiled (nogil, cached on disk).
fit_rows = numba.njit(
    nogil=True, fastmath=set(FASTMATH), error_model='numpy', cache=True
)(_fit_rows)
