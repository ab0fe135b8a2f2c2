"""The fused per-slice sums: one compiled pass over each block (numba).

Least squares with honest errors needs seven sums per slice (see
:data:`napari_mixcoef._kernel.N_SUMS`).  numpy gets them in several passes
(cast, centre, a BLAS product, squares, more products), each a read of the
block; this kernel reads each pixel once, casts and centres it in a
register and adds it into all seven sums, so a fit costs about one read of
the stack.  It runs on the caller's threads (``nogil``).

numba is imported on first use, not with the package: importing it and
starting LLVM take seconds, which the GUI spends in a background thread
(:func:`warm_up`).  Without numba, for a dtype it cannot take, or with
``NAPARI_MIXCOEF_KERNEL=numpy`` in the environment, :func:`available`
says no and the numpy kernel of :mod:`napari_mixcoef._kernel` does the
work (the tests hold both to the same results).
"""

from __future__ import annotations

import os
import threading

import numpy as np

#: Stack dtypes the compiled kernel reads directly (native byte order).
#: Others (float16, big-endian data) go through the numpy kernel.
DTYPES = frozenset(
    np.dtype(t)
    for t in (
        np.uint8,
        np.int8,
        np.uint16,
        np.int16,
        np.uint32,
        np.int32,
        np.uint64,
        np.int64,
        np.float32,
        np.float64,
    )
)

#: Pixels summed in the working dtype before the running float64 sums
#: take them: float32 keeps ~7 digits over a thousand terms, and the
#: compiler gets a loop it can vectorize.
_RUN = 1024

#: numba's fast-math flags without ``nnan``/``ninf``: NaN and inf keep
#: their meaning, so bad slices are still caught.  ``reassoc`` lets LLVM
#: spread the sums over SIMD lanes (the runs are short, so that changes only
#: the last digits), ``contract`` fuses multiply-adds.
FLAGS = frozenset({'reassoc', 'contract', 'nsz', 'arcp'})

_LOCK = threading.Lock()
_JITTED: dict = {}  # plain function -> numba dispatcher, or None


def enabled() -> bool:
    """Whether the environment allows the compiled kernel."""
    return os.environ.get('NAPARI_MIXCOEF_KERNEL', 'auto') != 'numpy'


def available(dtype: np.dtype) -> bool:
    """Whether the compiled kernel can reduce a stack of ``dtype``."""
    dtype = np.dtype(dtype)
    return (
        enabled()
        and dtype in DTYPES
        and dtype.isnative
        and _kernel() is not None
    )


def warm_up(dtypes=(np.uint16, np.float32)) -> None:
    """Import numba and compile (or load from its cache) the default fits.

    Runs tiny fits of each dtype, with robust and textbook errors, so that
    every kernel they use (the sums here, the per-slice fit that estimates
    the noise's correlation) is ready.  Costs a few seconds the first time
    in a process; the widget calls it in a background thread so the first
    fit does not pay for it.
    """
    if _kernel() is None:
        return
    from .core import fit_stack  # core imports this module

    rng = np.random.default_rng(0)
    a, b = rng.random((2, 16, 16)) * 100 + 100
    for dtype in dtypes:
        noisy = (rng.random((4, 16, 16)) * 100).astype(dtype)
        exact = (0.7 * a + 0.3 * b)[None].repeat(4, 0).astype(dtype)
        for stack in (noisy, exact):  # exact: R² ≈ 1 takes the guard
            for stderr in ('auto', 'ols'):
                fit_stack(stack, a, b, stderr=stderr)


def block_sums(y, centre, mean, u1, t, mask, out) -> None:
    """Add one block's sums over ``y_c = y − M`` into ``out`` (in place).

    Parameters
    ----------
    y : ndarray, shape (rows, n_px)
        The block's slices, flattened, in the stack's dtype (C-ordered).
    centre, u1 : ndarray, shape (n_px,)
        ``M`` and ``u1 = A − B`` in the working dtype (float32 for ≤ 16-bit
        data and float32, else float64).
    mean : scalar of the working dtype
        The mean of ``M`` over the fitted pixels: ``u2 = M − mean``.
    t : ndarray, shape (n_px,), or None
        The HAC sandwich terms (working dtype); None: textbook errors only.
    mask : ndarray of bool, shape (n_px,)
        Fitted pixels; the others never reach a sum.
    out : ndarray of float64, shape (rows, 8)
        Columns 0, 1, 2, 4 get ``u1ᵀy_c``, ``u2ᵀy_c``, ``Σy_c`` and
        ``Σy_c²`` added, and with ``t`` columns 5 and 6 ``Σy_c²t`` and
        ``Σy_c u1 t``.

    Notes
    -----
    Only three vectors besides the data (``M``, ``u1``, ``t``) are read:
    with five (``u2 = M − mean M`` and ``u1·t`` too) they no longer fit
    the 512 KiB L2 cache of a core here at 256 × 256 and the kernel took
    1.5× as long.  ``u2`` is formed on the fly (``Mᵀy_c − mean·Σy_c``
    afterwards would cancel digits that the offset model needs).
    """
    _kernel()(y, centre, mean, u1, t, mask, out)


def exact_sums(y, centre, mean, u1, coef, t, mask, out) -> None:
    """Add ``Σr²`` (and ``Σr²t``) of explicit residuals into ``out``.

    The guard of :func:`napari_mixcoef.core._fit_sums` for slices whose
    one-pass SSR cancels (R² ≈ 1).  ``y``, ``centre``, ``mean``, ``u1``,
    ``t`` and ``mask`` as in :func:`block_sums`; ``coef`` (rows, 3)
    float64 holds each slice's ``δ`` on the basis ``u1, u2, 1``; ``out``
    (rows, 2) float64.  The residual is formed in the working dtype as
    numpy's guard forms it, then squared and summed in float64.
    """
    jit(_exact)(y, centre, mean, u1, coef, t, mask, out)


def jit(func, flags=FLAGS):
    """Return ``func`` compiled by numba (made once), or None without it.

    ``nogil``: the chunk threads run it in parallel; ``cache``: the
    machine code is kept on disk between sessions; ``error_model='numpy'``:
    no zero-division checks, which keep loops from vectorizing.
    """
    if not enabled():
        return None
    if func not in _JITTED:
        with _LOCK:
            if func not in _JITTED:
                try:
                    import numba
                except ImportError:
                    _JITTED[func] = None
                else:
                    _JITTED[func] = numba.njit(
                        nogil=True,
                        fastmath=set(flags),
                        error_model='numpy',
                        cache=True,
                    )(func)
    return _JITTED[func]


def _kernel():
    return jit(_sums)


def _sums(y, centre, mean, u1, t, mask, out):  # pragma: no cover - compiled
    """Compiled by :func:`jit`; see :func:`block_sums`.

    ``t is None`` is decided when numba compiles (one machine code with
    the HAC sums, one without).  Each sum runs in the working dtype over
    :data:`_RUN` pixels (SIMD lanes), then into a float64 total.
    """
    rows, n_px = y.shape
    zero = centre.dtype.type(0)
    for i in range(rows):
        a0 = a1 = a2 = a3 = a5 = a6 = 0.0
        for p0 in range(0, n_px, _RUN):
            p1 = min(p0 + _RUN, n_px)
            # slices from 0: numba then drops its negative-index handling,
            # a third of the loop's instructions
            ys, cs, us, ms = y[i, p0:p1], centre[p0:p1], u1[p0:p1], mask[p0:p1]
            s0 = s1 = s2 = s3 = s5 = s6 = zero
            if t is None:
                for p in range(p1 - p0):
                    v = centre.dtype.type(ys[p]) - cs[p]
                    v = v if ms[p] else zero
                    s0 += us[p] * v
                    s1 += (cs[p] - mean) * v
                    s2 += v
                    s3 += v * v
            else:
                ts = t[p0:p1]
                for p in range(p1 - p0):
                    v = centre.dtype.type(ys[p]) - cs[p]
                    v = v if ms[p] else zero
                    w = us[p] * v
                    vv = v * v
                    s0 += w
                    s1 += (cs[p] - mean) * v
                    s2 += v
                    s3 += vv
                    s5 += vv * ts[p]
                    s6 += w * ts[p]
            a0 += s0
            a1 += s1
            a2 += s2
            a3 += s3
            a5 += s5
            a6 += s6
        out[i, 0] += a0
        out[i, 1] += a1
        out[i, 2] += a2
        out[i, 4] += a3
        out[i, 5] += a5
        out[i, 6] += a6


def _exact(y, centre, mean, u1, coef, t, mask, out):  # pragma: no cover
    """Compiled by :func:`jit`; see :func:`exact_sums`."""
    rows, n_px = y.shape
    zero = centre.dtype.type(0)
    for i in range(rows):
        c0 = centre.dtype.type(coef[i, 0])
        c1 = centre.dtype.type(coef[i, 1])
        c2 = centre.dtype.type(coef[i, 2])
        a0 = a1 = 0.0
        for p0 in range(0, n_px, _RUN):
            p1 = min(p0 + _RUN, n_px)
            ys, cs, us, ms = y[i, p0:p1], centre[p0:p1], u1[p0:p1], mask[p0:p1]
            s0 = s1 = 0.0
            if t is None:
                for p in range(p1 - p0):
                    c = cs[p]
                    r = (centre.dtype.type(ys[p]) - c) - (
                        c0 * us[p] + c1 * (c - mean) + c2
                    )
                    r = r if ms[p] else zero
                    rr = np.float64(r) * np.float64(r)
                    s0 += rr
            else:
                ts = t[p0:p1]
                for p in range(p1 - p0):
                    c = cs[p]
                    r = (centre.dtype.type(ys[p]) - c) - (
                        c0 * us[p] + c1 * (c - mean) + c2
                    )
                    r = r if ms[p] else zero
                    rr = np.float64(r) * np.float64(r)
                    s0 += rr
                    s1 += rr * ts[p]
            a0 += s0
            a1 += s1
        out[i, 0] += a0
        out[i, 1] += a1
