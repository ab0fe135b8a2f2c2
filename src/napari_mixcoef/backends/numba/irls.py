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


def _step(func):
    """Compile a step of :func:`_fit_rows` into it."""
    return numba.njit(inline='always', fastmath=set(FASTMATH))(func)


@_step
def _centre_row(row, centre, d, u2, runs, yb, zero):  # pragma: no cover
    """``y_c = T(row) − M`` into ``yb``; ``qᵀy_c, u2ᵀy_c, Σy_c, Σy_c²``."""
    T = centre.dtype.type
    g0 = h1 = h2 = q = 0.0
    for j in range(runs.shape[0]):
        a, b = runs[j, 0], runs[j, 1]
        ys, ds, v2 = yb[a:b], d[a:b], u2[a:b]
        rs, cs = row[a:b], centre[a:b]
        s0 = s1 = s2 = s3 = zero
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
    return g0, h1, h2, q


@_step
def _weight(dp, cp, dt, offset, floor, one):  # pragma: no cover - compiled
    """Poisson weight ``1 / max(M + q z − c + f, f)`` of one pixel."""
    mu = dt * dp + ((cp - offset) + floor)
    mu = mu if mu > floor else floor
    return one / mu


@_step
def _psi(r, clip, gross, zero):  # pragma: no cover - compiled
    """Huber's ψ of one residual; gross outliers get 0."""
    psi = r if r > -clip else -clip
    psi = psi if psi < clip else clip
    return zero if abs(r) > gross else psi


@_step
def _poisson_step(yb, d, centre, runs, dt, consts):  # pragma: no cover
    """Sum the weighted ``qᵀWq`` and ``qᵀWy`` at the fit ``dt``."""
    offset, floor, one, zero = consts[0], consts[1], consts[2], consts[5]
    gram = rhs = 0.0
    for j in range(runs.shape[0]):
        a, b = runs[j, 0], runs[j, 1]
        ys, ds, cs = yb[a:b], d[a:b], centre[a:b]
        s0 = s1 = zero
        for p in range(b - a):
            dp = ds[p]
            w = _weight(dp, cs[p], dt, offset, floor, one)
            s0 += w * (dp * dp)
            s1 += w * (ys[p] * dp)
        gram += s0
        rhs += s1
    return gram, rhs


@_step
def _huber_step(yb, d, runs, dt, clip, gross, zero):  # pragma: no cover
    """``qᵀψ(r)`` at the fit ``dt``: the H-algorithm's step."""
    step = 0.0
    for j in range(runs.shape[0]):
        a, b = runs[j, 0], runs[j, 1]
        ys, ds = yb[a:b], d[a:b]
        s0 = zero
        for p in range(b - a):
            dp = ds[p]
            s0 += _psi(ys[p] - dt * dp, clip, gross, zero) * dp
        step += s0
    return step


@_step
def _poisson_meat(
    yb, d, centre, ts, runs, dt, dw, consts, auto
):  # pragma: no cover - compiled
    """SSR and ``Σψ²t`` (auto) or ``Σψr`` with the weights at ``dw``."""
    offset, floor, one, zero = consts[0], consts[1], consts[2], consts[5]
    ssr = meat = 0.0
    for j in range(runs.shape[0]):
        a, b = runs[j, 0], runs[j, 1]
        s0 = s1 = zero
        for p in range(a, b):
            dp = d[p]
            r = yb[p] - dt * dp
            psi = _weight(dp, centre[p], dw, offset, floor, one) * r
            s0 += r * r
            s1 += (psi * psi) * ts[p] if auto else psi * r
        ssr += s0
        meat += s1
    return ssr, meat


@_step
def _huber_meat(
    yb, d, ts, runs, dt, clip, gross, consts, auto
):  # pragma: no cover - compiled
    """SSR, ``Σψ²t`` or ``Σψ²``, and ``Σq²`` or the count of inliers."""
    one, zero = consts[2], consts[5]
    ssr = meat = inliers = 0.0
    for j in range(runs.shape[0]):
        a, b = runs[j, 0], runs[j, 1]
        s0 = s1 = s2 = zero
        for p in range(a, b):
            dp = d[p]
            r = yb[p] - dt * dp
            size = abs(r)
            psi = _psi(r, clip, gross, zero)
            s0 += r * r
            if auto:  # bread: Σ ψ'·q² over the inliers
                s1 += (psi * psi) * ts[p]
                s2 += (dp * dp) if size <= clip else zero
            else:  # the inliers counted in T, exact up to 2**24
                s1 += psi * psi
                s2 += one if size <= clip else zero
        ssr += s0
        meat += s1
        inliers += s2
    return ssr, meat, inliers


@_step
def _gaussian_meat(yb, d, ts, runs, dt, zero, auto):  # pragma: no cover
    """SSR and ``Σr²t`` (auto)."""
    ssr = meat = 0.0
    for j in range(runs.shape[0]):
        a, b = runs[j, 0], runs[j, 1]
        s0 = s1 = zero
        for p in range(a, b):
            r = yb[p] - dt * d[p]
            s0 += r * r
            if auto:
                s1 += (r * r) * ts[p]
        ssr += s0
        meat += s1
    return ssr, meat


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
    ``out`` (rows, WIDTH).  Each row is cast, centred and kept in ``ybuf``
    (in the L2 cache) by the first step; the IRLS steps read it there.
    """
    huber_c, reject, zero = consts[3], consts[4], consts[5]
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
        g0, h1, h2, q = _centre_row(y[i], centre, d, u2, runs, ybuf, zero)
        z = previous = g0
        scale = 0.0
        bread = 1.0
        for it in range(iterations):
            cast[0] = z
            dt = cast[0]
            if noise == 1:  # Poisson: weighted least squares
                bread, rhs = _poisson_step(ybuf, d, centre, runs, dt, consts)
                previous = z
                z = rhs / bread
            elif noise == 2:  # Huber: z += qᵀψ(r)
                if it < 2:  # the scale settles after two steps
                    if it == 0:
                        for s in range(n_sample):
                            ysample[s] = ybuf[sample[s]]
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
                z = z + _huber_step(
                    ybuf,
                    d,
                    runs,
                    dt,
                    huber_c * cast[1],
                    reject * cast[1],
                    zero,
                )
        # the residuals: SSR and the covariance's middle ("meat")
        cast[0] = z
        dt = cast[0]
        if noise == 1:
            cast[1] = previous  # the weights of the last iteration
            ssr, meat = _poisson_meat(
                ybuf, d, centre, terms, runs, dt, cast[1], consts, auto
            )
            if not auto:  # quasi-likelihood: Ω = Σψr · bread
                meat = meat * bread
        elif noise == 2:
            cast[1] = scale
            ssr, meat, inliers = _huber_meat(
                ybuf,
                d,
                terms,
                runs,
                dt,
                huber_c * cast[1],
                reject * cast[1],
                consts,
                auto,
            )
            if auto:
                bread = inliers
            else:  # Huber's classic: Σψ² / (share of inliers)²
                frac = max(inliers / n, 1.0 / n)
                meat = meat / (frac * frac)
        else:
            ssr, meat = _gaussian_meat(ybuf, d, terms, runs, dt, zero, auto)
            if not auto:
                meat = ssr
        out[i, Z] = z
        out[i, BREAD] = bread
        out[i, MEAT] = meat
        out[i, SSR] = ssr
        out[i, YY] = q
        out[i, S] = h2
        out[i, H] = h1


#: :func:`_fit_rows` compiled (nogil, cached on disk).
fit_rows = numba.njit(
    nogil=True, fastmath=set(FASTMATH), error_model='numpy', cache=True
)(_fit_rows)
