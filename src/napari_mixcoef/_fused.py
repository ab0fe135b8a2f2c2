"""The fused per-slice sums: one compiled pass over each block (numba).

Least squares with honest errors needs seven sums per slice (see
:data:`napari_mixcoef._kernel.N_SUMS`).  numpy gets them in several passes
(cast, centre, a BLAS product, squares, more products), each a read of the
block; this kernel reads each pixel once, casts and centres it in a
register and adds it into all seven sums, so a fit costs about one read of
the stack.  It runs on the caller's threads (``nogil``).

numba is imported on first use, not with the package: importing it and
starting LLVM take seconds, which the GUI spends in a background thread
(:func:`warm_up`).  The kernels' bodies live in
:mod:`napari_mixcoef._fused_sums`, which imports numba.  Without numba,
for a dtype it cannot take, or with ``NAPARI_MIXCOEF_KERNEL=numpy`` in the
environment, :func:`available` says no and the numpy kernel of
:mod:`napari_mixcoef._kernel` does the work (the tests hold both to the
same results).
"""

from __future__ import annotations

import functools
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
#: take them: the compiler gets a loop it can vectorize, and float32 keeps
#: ~7 digits over a few hundred terms (with 1024 the uint16 test's x
#: drifted to 1.4e-5 of its standard error from a float64 fit; as fast).
_RUN = 512

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
        and _kernel(dtype) is not None
    )


def warm_up(dtypes=(np.uint16, np.float32)) -> None:
    """Import numba and compile (or load from its cache) the default fits.

    Runs tiny fits of each dtype, with robust and textbook errors, so that
    every kernel they use (the sums here, the lag sums of the noise's
    correlation, the residual pass of robust errors for the scaled and
    offset models, the per-slice fit of the Poisson and Huber models) is
    ready.  Costs a few seconds the first time in a process; the widget
    calls it in a background thread so the first fit does not pay for it
    (compiling holds the GIL: the first Poisson fit after installing froze
    the window for 13 s when this skipped it).
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
        fit_stack(noisy, a, b, model='scaled')
        fit_stack(noisy, a, b, noise='poisson')  # Huber shares its kernel


def segments(mask: np.ndarray, run: int = _RUN) -> np.ndarray:
    """Return the runs of fitted pixels, cut at every multiple of ``run``.

    Parameters
    ----------
    mask : ndarray of bool, shape (n_px,)
        Fitted pixels.
    run : int
        Longest run.

    Returns
    -------
    ndarray of int64, shape (n_runs, 2)
        ``start, stop`` of each run of consecutive fitted pixels, none
        crossing a multiple of ``run``.  The kernels loop over these instead
        of testing every pixel: a per-pixel select cost a third of the
        kernel's arithmetic, and masked pixels (which may hold NaN or inf)
        are never read.
    """
    mask = np.asarray(mask, bool).reshape(-1)
    if mask.all():  # no mask: the same runs for every fit of this size
        return _full_runs(mask.size, run).copy()
    edges = np.flatnonzero(np.diff(mask.astype(np.int8), prepend=0, append=0))
    cuts = np.arange(run, len(mask), run)
    bounds = np.union1d(edges, cuts)
    lo, hi = bounds[:-1], bounds[1:]
    inside = mask[lo]  # a piece between bounds is all in or all out
    return np.stack([lo[inside], hi[inside]], axis=1).astype(np.int64)


@functools.lru_cache(maxsize=8)
def _full_runs(n_px: int, run: int) -> np.ndarray:
    # segments() of n_px fitted pixels: made once, as its general form
    # took ~0.45 ms with caches cold, in each thread's first block of a fit
    starts = np.arange(0, n_px, run, dtype=np.int64)
    return np.stack([starts, np.minimum(starts + run, n_px)], axis=1)


def block_sums(y, centre, mean, u1, t, segs, out) -> None:
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
    segs : ndarray of int64, shape (n_runs, 2)
        The fitted pixels as runs, from :func:`segments`; the others are
        never read.
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

    Float data is summed four slices side by side (three with the HAC
    sums, whose accumulators would not fit the registers): they share each
    load of the vectors, and several streams of data keep more reads in
    flight than one (a plain sum streamed one slice at a time at half the
    speed of OpenBLAS's GEMV here, four at a time at its speed).  8- and
    16-bit integer data goes one slice at a time: in a whole fit of 2000 ×
    256 × 256 uint16 slices four side by side took 1.3-1.5× as long (the
    cause is not pinned down; three took as long as one), while float32
    and float64 fits were 5-20 % faster.
    """
    _kernel(y.dtype)(y, centre, mean, u1, t, segs, out)


def exact_sums(y, centre, mean, u1, coef, t, segs, out) -> None:
    """Add ``Σr²`` (and ``Σr²t``) of explicit residuals into ``out``.

    The guard of :func:`napari_mixcoef.core._fit_sums` for slices whose
    one-pass SSR cancels (R² ≈ 1).  ``y``, ``centre``, ``mean``, ``u1``,
    ``t`` and ``segs`` as in :func:`block_sums`; ``coef`` (rows, 3)
    float64 holds each slice's ``δ`` on the basis ``u1, u2, 1``; ``out``
    (rows, 2) float64.  The residual is formed in the working dtype as
    numpy's guard forms it, then squared and summed in float64.
    """
    _compiled('exact')(y, centre, mean, u1, coef, t, segs, out)


def exact_terms(y, centre, mean, u1, coef, terms, segs, out) -> None:
    """Add ``Σr²`` and ``Σr²·terms[m]`` of explicit residuals into ``out``.

    The second pass of robust (HAC) errors for two or three coefficients,
    whose sandwich does not expand into few per-slice sums.  ``y``,
    ``centre``, ``mean``, ``u1`` and ``segs`` as in :func:`block_sums`;
    ``coef`` (rows, 3) float64 holds each slice's ``δ`` on the basis
    ``u1, u2, 1``; ``terms`` (6, n_px) the sandwich terms of
    :func:`napari_mixcoef._spatial.sandwich_terms` in the working dtype,
    zero rows past ``k(k+1)/2``; ``out`` (rows, 7) float64.  Each run's
    sums are in the working dtype, their totals in float64.
    """
    _compiled('exact_terms')(y, centre, mean, u1, coef, terms, segs, out)


def lag_products(buf, n, offsets) -> np.ndarray | None:
    """``Σ_{p<n} buf[p]·buf[p+o]`` for each offset ``o``, or None.

    The lag sums of :func:`napari_mixcoef._spatial.noise_correlation` in
    one compiled call (None without numba: the caller then uses BLAS).
    ``buf`` (float32 or float64) is zero from ``n`` on and holds at least
    ``max(offsets) + 8`` elements past it; ``offsets`` ascending.  Each
    band's sums are in ``buf``'s dtype, their totals in float64.
    """
    func = _compiled('lag_products')
    if func is None:
        return None
    key = offsets.tobytes()
    if key not in _LAG_GROUPS:
        # offsets in groups of nine neighbours, each group from one start
        starts = []
        for o in offsets:
            if not starts or o > starts[-1] + 8:
                starts.append(int(o))
        starts = np.array(starts, np.int64)
        group = np.searchsorted(starts, offsets, side='right') - 1
        if len(_LAG_GROUPS) >= 8:
            _LAG_GROUPS.clear()
        _LAG_GROUPS[key] = starts, group * 9 + offsets - starts[group]
    starts, pick = _LAG_GROUPS[key]
    out = np.zeros((len(starts), 9))
    func(buf, n, starts, out)
    return out.reshape(-1)[pick]


_LAG_GROUPS: dict = {}  # offsets' bytes -> (starts, flat picks)


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


def _kernel(dtype=np.float32):
    """Return the compiled sums for a stack of ``dtype`` (see block_sums)."""
    dtype = np.dtype(dtype)
    small_int = dtype.kind in 'iu' and dtype.itemsize <= 2
    return _compiled('sums_one' if small_int else 'sums')


def _compiled(name: str):
    """Return kernel ``name`` of :mod:`._fused_sums` compiled, or None."""
    if not enabled():
        return None
    try:
        from . import _fused_sums  # imports numba
    except ImportError:
        return None
    func = getattr(_fused_sums, name)
    # made already: skip jit()'s second look at the environment (this runs
    # once per block, holding the GIL)
    return _JITTED[func] if func in _JITTED else jit(func)
