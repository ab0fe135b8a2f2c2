"""Fused per-slice fits: :func:`fit_block` as one compiled loop per pass.

:func:`napari_mixcoef._estimators.fit_block` runs every IRLS step as
whole-block numpy passes, each of which streams the block (several slices,
more than the L2 cache) through memory again.  Here each slice is fitted on
its own while it sits in the L2 cache (256 KiB for 256 × 256 float32): a
first loop gathers ``Dᵀy``, ``Σy``, ``u2ᵀy`` and ``Σy²``, each IRLS
iteration is one loop that computes the weights (or Huber's ψ) and the
weighted sums at once, and a last loop forms the residuals and the sums of
the covariance.  Only the fitted pixels are visited, as runs of
consecutive pixels of the mask.

The arithmetic follows :func:`fit_block` step for step in the working
dtype (the same roundings of ``δ``, the residuals, Huber's thresholds and
the Poisson weights; the MAD is the same sample element, found by an exact
radix select).  Only the sums differ: each runs in the working dtype over
at most :data:`CHUNK` pixels and is then added in float64, where numpy's
float32 BLAS sums whole slices in float32.  Results agree to float32
rounding, and the fused ones are the closer to a float64 fit.

numba is optional: without it (or for a case not covered here)
:func:`fit_block_fused` returns None and the caller uses :func:`fit_block`.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from ._estimators import (
    HUBER_C,
    MAD_SCALE,
    REJECT,
    BlockDesign,
    NoiseSpec,
)
from ._fused import DTYPES, jit, segments

_NOISE_CODES = {'gaussian': 0, 'poisson': 1, 'huber': 2}

#: :data:`napari_mixcoef._fused.FLAGS` without ``contract`` (no fused
#: multiply-adds: residuals round as numpy's do, so that Huber's clipping
#: and rejection decide alike).
_FASTMATH = frozenset({'nsz', 'arcp', 'reassoc', 'afn'})

#: Most pixels in one partial sum (see :func:`_fit_rows`).
CHUNK = 1024
_TINY = float(np.finfo(np.float32).tiny)  # as in _estimators._median_abs

_RUNS: dict[tuple[int, int], tuple[NDArray | None, NDArray]] = {}


def fit_block_fused(
    yc: NDArray, bd: BlockDesign, spec: NoiseSpec, *, raw: bool = False
) -> NDArray | None:
    """Fit each slice of a block like :func:`fit_block`, compiled per slice.

    Parameters
    ----------
    yc : (m, n) ndarray
        Whole slices centred on ``M``, working dtype (float32 or float64),
        zero outside the mask; with ``raw``, the slices as stored (any
        dtype of :data:`napari_mixcoef._fused.DTYPES`), which the kernel
        casts and centres as it reads them (bit for bit as numpy would).
    bd : BlockDesign
        The shared design, in the working dtype.
    spec : NoiseSpec
        Noise model and standard-error mode.
    raw : bool
        Whether ``yc`` holds the stored slices rather than centred ones.

    Returns
    -------
    (m, output_width(k)) ndarray of float64 or None
        The rows :func:`fit_block` returns (``δ``, packed covariance,
        ``SSR``, ``Σy_c²``, ``Σy_c``, ``u2ᵀy_c``), or None when numba is
        not installed, ``NAPARI_MIXCOEF_KERNEL=numpy`` is set or the case
        is not covered (models with more than one coefficient, other
        dtypes, ``stderr="auto"`` without sandwich terms): then call
        :func:`fit_block`.
    """
    if not _supported(yc, bd, spec, raw):
        return None
    kernel = jit(_fit_rows, _FASTMATH)
    dtype = bd.centre.dtype.type
    yc = np.ascontiguousarray(yc)
    # what the kernel subtracts from each pixel it reads
    minus = bd.centre if raw else np.zeros_like(bd.centre)
    auto = spec.stderr == 'auto'
    terms = bd.terms[:, 0] if auto else bd.centre[:1]
    floor = spec.gain * (0.1 + spec.read_noise**2)
    # constants in the working dtype, as numpy rounds Python floats
    consts = np.array(
        [spec.camera_offset, floor, 1.0, HUBER_C, REJECT, 0.0], dtype
    )
    out = np.empty((yc.shape[0], bd.n_out))
    kernel(
        yc,
        np.ascontiguousarray(minus),
        np.ascontiguousarray(bd.design_t[0]),
        np.ascontiguousarray(bd.basis_t[:, 0]),
        np.ascontiguousarray(bd.basis_t[:, 1]),
        np.ascontiguousarray(bd.centre),
        np.ascontiguousarray(terms),
        _runs(bd),
        np.ascontiguousarray(bd.sample, dtype=np.int64),
        np.ascontiguousarray(bd.transform[:, 0], dtype=np.float64),
        float(bd.gram_inv[0, 0]),
        consts,
        _NOISE_CODES[spec.noise],
        auto,
        int(spec.iterations),
        int(bd.n_pixels),
        out,
    )
    return out


def covers(dtype, bd: BlockDesign, spec: NoiseSpec, raw: bool) -> bool:
    """Whether the kernel fits slices of ``dtype`` with this design exactly.

    ``raw``: the slices as stored (any dtype of ``DTYPES``), else centred
    in the working dtype.  False also without numba.
    """
    dtype = np.dtype(dtype)
    if bd.k != 1 or spec.noise not in _NOISE_CODES:
        return False
    work = bd.centre.dtype
    if work not in (np.dtype(np.float32), np.dtype(np.float64)):
        return False
    if raw and (dtype not in DTYPES or not dtype.isnative):
        return False
    if not raw and dtype != work:
        return False
    arrays = [bd.design_t, bd.basis_t, bd.centre]
    if spec.stderr == 'auto':
        if bd.terms is None:
            return False  # fit_block raises its own error
        arrays.append(bd.terms)
    if any(a.dtype != work for a in arrays):
        return False
    return jit(_fit_rows, _FASTMATH) is not None


def _supported(yc, bd: BlockDesign, spec: NoiseSpec, raw: bool) -> bool:
    """Whether the compiled kernel covers this block exactly."""
    if not isinstance(yc, np.ndarray) or yc.ndim != 2:
        return False
    if not covers(yc.dtype, bd, spec, raw):
        return False
    return yc.shape[1] == bd.centre.size == bd.design_t.shape[1]


def _runs(bd: BlockDesign) -> NDArray[np.int64]:
    """``(r, 2)`` starts and stops of runs of consecutive fitted pixels.

    Runs are cut at multiples of :data:`CHUNK` pixels.  Kept for the
    last few masks (the array's identity is checked, so that a new mask at
    a reused address is not mistaken for an old one).
    """
    inside = bd.inside
    key = (id(inside), bd.centre.size)
    cached = _RUNS.get(key)
    if cached is not None and cached[0] is inside:
        return cached[1]
    if inside is None:
        fitted = np.ones(bd.centre.size, bool)
    else:
        fitted = np.zeros(bd.centre.size, bool)
        fitted[inside] = True
    runs = segments(fitted, CHUNK)
    if len(_RUNS) > 8:
        _RUNS.clear()
    _RUNS[key] = (bd.inside, runs)
    return runs


# The kernel below is compiled by numba (as plain Python it would take
# minutes).  ``T`` is the working dtype: every constant that meets a T value
# comes from ``consts`` (or goes through ``cast``), or numba would promote
# the arithmetic to float64 where numpy's stays in float32.  ``runs`` are
# pieces of at most CHUNK consecutive fitted pixels: each sum over pixels
# runs in T over one piece (vectorized: 8 lanes × a few accumulators, each
# adding ≤ 32 terms) and is then added to a float64 total.


def _fit_rows(
    yc,
    minus,
    d,
    u1,
    u2,
    centre,
    terms,
    runs,
    sample,
    transform,
    gram_inv,
    consts,
    noise,
    auto,
    iterations,
    n,
    out,
):  # pragma: no cover - compiled
    """Fit the rows of ``yc − minus`` (k = 1); write ``fit_block``'s rows.

    Each row is cast to T, centred and kept in ``ybuf`` (in the L2 cache)
    by the first pass; the IRLS passes read it there.
    """
    offset = consts[0]
    floor = consts[1]
    one = consts[2]
    huber_c = consts[3]
    reject = consts[4]
    zero = consts[5]
    k = 1
    T = centre.dtype.type
    cast = np.empty(2, centre.dtype)  # float64 → T, rounded as numpy does
    ybuf = np.zeros(yc.shape[1], centre.dtype)
    n_sample = sample.size
    middle = n_sample // 2
    ysample = np.empty(n_sample, centre.dtype)
    dsample = np.empty(n_sample, centre.dtype)
    absr = np.empty(n_sample, np.float64)
    keys = absr.view(np.int64)
    candidates = np.empty(n_sample, np.int64)
    histogram = np.empty(2048, np.int32)
    picked = np.empty(1, np.int64)
    for i in range(yc.shape[0]):
        row = yc[i]
        y = ybuf
        # 1. y = T(row) − minus into ybuf; u1ᵀy, u2ᵀy, Σy, Σy²: the OLS
        # start and the output's sums
        h0 = 0.0
        h1 = 0.0
        h2 = 0.0
        q = 0.0
        for j in range(runs.shape[0]):
            a, b = runs[j, 0], runs[j, 1]
            ys, v1, v2 = y[a:b], u1[a:b], u2[a:b]
            rs, sh = row[a:b], minus[a:b]
            s0 = zero
            s1 = zero
            s2 = zero
            s3 = zero
            for p in range(b - a):
                yp = T(rs[p]) - sh[p]
                ys[p] = yp
                s0 += yp * v1[p]
                s1 += yp * v2[p]
                s2 += yp
                s3 += yp * yp
            h0 += s0
            h1 += s1
            h2 += s2
            q += s3
        g = h0 * transform[0] + h1 * transform[1] + h2 * transform[2]
        delta = g * gram_inv
        previous = delta
        scale = 0.0
        bread = 0.0
        # 2. IRLS, one loop per iteration
        for it in range(iterations):
            cast[0] = delta
            dt = cast[0]
            if noise == 1:  # Poisson: weights 1 / max(M + Dδ − c + f, f)
                gram = 0.0
                rhs = 0.0
                for j in range(runs.shape[0]):
                    a, b = runs[j, 0], runs[j, 1]
                    ys, ds, cs = y[a:b], d[a:b], centre[a:b]
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
                previous = delta
                delta = rhs / gram
                bread = gram
            elif noise == 2:  # Huber: δ += (DᵀD)⁻¹ Dᵀψ(r)
                if it < 2:  # MAD: the middle |r| of the sample
                    if it == 0:
                        for s in range(n_sample):
                            ysample[s] = y[sample[s]]
                            dsample[s] = d[sample[s]]
                    for s in range(n_sample):
                        r = ysample[s] - dt * dsample[s]
                        absr[s] = np.float64(abs(r))  # exact
                    # a radix select on the bits of these non-negative
                    # float64 values, 11 at a time: several times faster
                    # than a partition, whose branches mispredict
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
                    rank = middle
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
                    picked[0] = candidates[0]
                    mad = picked.view(np.float64)[0]
                    scale = max(mad * MAD_SCALE, _TINY)
                cast[1] = scale
                clip = huber_c * cast[1]
                gross = reject * cast[1]
                step = 0.0
                for j in range(runs.shape[0]):
                    a, b = runs[j, 0], runs[j, 1]
                    ys, ds = y[a:b], d[a:b]
                    s0 = zero
                    for p in range(b - a):
                        dp = ds[p]
                        r = ys[p] - dt * dp
                        psi = r if r > -clip else -clip
                        psi = psi if psi < clip else clip
                        psi = zero if abs(r) > gross else psi
                        s0 += psi * dp
                    step += s0
                delta = delta + step * gram_inv
        # 3. residuals: SSR and the covariance's middle ("meat")
        cast[0] = delta
        dt = cast[0]
        ssr = 0.0
        meat = 0.0  # Σψr, Σψ², Σψ²t or Σr²t
        count = 0.0  # Huber's inliers (an integer count)
        if noise == 1:
            cast[1] = previous  # the weights of the last iteration
            dw = cast[1]
            for j in range(runs.shape[0]):
                a, b = runs[j, 0], runs[j, 1]
                ys, ds, cs, ts = y[a:b], d[a:b], centre[a:b], terms[a:b]
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
        elif noise == 2:
            cast[1] = scale
            clip = huber_c * cast[1]
            gross = reject * cast[1]
            for j in range(runs.shape[0]):
                a, b = runs[j, 0], runs[j, 1]
                ys, ds, ts = y[a:b], d[a:b], terms[a:b]
                s0 = zero
                s1 = zero
                s2 = zero
                if auto:  # bread: Σ ψ'·D² over the inliers
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
                if auto:
                    bread += s2
                else:
                    count += s2
        else:
            for j in range(runs.shape[0]):
                a, b = runs[j, 0], runs[j, 1]
                ys, ds, ts = y[a:b], d[a:b], terms[a:b]
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
        # 4. the covariance of δ, as _estimators._covariance forms it
        if auto:
            inv = gram_inv if noise == 0 else 1.0 / bread
            cov = inv * (meat * (n / (n - k))) * inv
        elif noise == 0:
            cov = ssr / (n - k) * gram_inv
        elif noise == 1:
            cov = meat / (n - k) * (1.0 / bread)
        else:
            frac = max(count / n, 1.0 / n)
            cov = meat / (n - k) / frac**2 * gram_inv
        out[i, 0] = delta
        out[i, 1] = cov
        out[i, 2] = ssr
        out[i, 3] = q
        out[i, 4] = h2
        out[i, 5] = h1
