"""The streaming kernel: per-slice sums of cache-sized blocks, on threads.

numpy and memmap stacks, zarr arrays (and dask arrays read piece by piece)
are walked block by block (see :mod:`napari_mixcoef._chunks`), and runs of
blocks are spread over a persistent pool of two threads.  Each block is
reduced in one compiled pass (:mod:`napari_mixcoef._fused`) or, without
numba, cast and centred into a per-thread buffer and reduced by a few
numpy calls that release the GIL.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import _fused
from ._chunks import Block, as_numpy, read_runs
from ._design import Design

#: Columns of the per-slice sums: u1ᵀy_c, u2ᵀy_c, Σy_c, Σy_c², the
#: magnitude behind Σy_c² (what the SSR guard compares with), and for the
#: spatial HAC errors Σy_c²·t, Σy_c·u1·t (see :meth:`Kernel.hac`) and, on
#: the raw float64 path, Σy·M·t to centre them.
N_SUMS = 8


class Kernel:
    """Per-slice sums of blocks, one working buffer per thread.

    :meth:`accumulate` adds a block's sums into the rows of a
    ``(n, N_SUMS)`` float64 array; :meth:`centred_sums` turns them into the
    sums of the centred slice.  Each block costs a few numpy calls that
    release the GIL, so the Python overhead per block stays far below its
    arithmetic.
    """

    def __init__(
        self, stack, design: Design, lead_shape, ref_shape, chunk_bytes
    ):
        self.stack = stack
        self.design = design
        self.lead_shape = lead_shape
        self.ref_shape = ref_shape
        self.row_len = math.prod(ref_shape[1:])  # pixels per reference row
        slice_bytes = math.prod(ref_shape) * design.dtype.itemsize
        self.sub_rows = max(1, chunk_bytes // max(1, slice_bytes))
        self._local = threading.local()
        self._hac_sq = self._hac_lin = None
        self.hac_terms = None  # (t, u1·t) in the working dtype, for dask
        self.fused = _fused.available(np.dtype(stack.dtype))
        # float64 data stored as C-ordered slices needs neither a cast nor
        # centring (its products with M are exact enough to centre
        # afterwards): the kernel reads it in place, saving a pass.
        self.rows = None
        if self.fused:
            self._fused_vectors()
        elif design.dtype == np.float64 and design.mask is None:
            self.rows = as_rows(stack, math.prod(lead_shape))
        self._set_basis()

    def _fused_vectors(self) -> None:
        # M, mean(M), u1, t (None until hac() asks for the sandwich terms)
        # as flat contiguous rows; the mask as runs of fitted pixels, per
        # band (see _band_vectors)
        d = self.design
        n = d.basis.shape[1]
        mask = np.ones(n, bool) if d.mask is None else d.mask.reshape(-1)
        # (M outside the mask, inf or NaN from a reference there, is never
        # read: the kernels visit the runs of fitted pixels only)
        centre = d.centre.reshape(-1)
        # u2 = M − mean (as prepare() rounds it, to within an ulp of M);
        # the mean as np.mean forms it, a sum over n
        fitted = centre.astype(np.float64)
        if d.mask is not None:
            fitted = fitted[mask]
        mean = d.dtype.type(fitted.sum() / fitted.size)
        self._vectors = [
            np.ascontiguousarray(centre),
            mean,
            np.ascontiguousarray(d.basis[0]),
            None,
        ]
        self._mask = mask
        self._segments: dict[tuple[int, int], np.ndarray] = {}

    def _band_vectors(self, px: slice) -> list:
        """Return the compiled kernels' vectors over one band's pixels.

        The last is the band's runs of fitted pixels (made once per band).
        """
        key = (px.start, px.stop)
        segs = self._segments.get(key)
        if segs is None:
            segs = self._segments[key] = _fused.segments(self._mask[px])
        vectors = [
            v[px] if isinstance(v, np.ndarray) else v for v in self._vectors
        ]
        return [*vectors, segs]

    def _set_basis(self) -> None:
        d = self.design
        if self.rows is not None:
            # [u1, 1, M]: three columns keep OpenBLAS on its fast path
            # (four cost 3.5× here); u2ᵀy = Mᵀy − mean(M)·Σy afterwards
            basis = np.stack([d.basis[0], d.basis[2], d.centre.reshape(-1)])
        else:
            basis = d.basis
        self._basis_t = basis.T  # (n_ref, 3), F-ordered view

    def hac(self, t: np.ndarray) -> None:
        """Also gather ``Σy_c²·t`` and ``Σy_c·u1·t`` (mix-model HAC terms).

        ``t`` (n_ref) holds the sandwich terms ``d·(ρ⋆d)`` of
        :mod:`napari_mixcoef._spatial`; with them the robust variance of
        ``δ`` is ``(Σy_c²t − 2δΣy_c d t + δ²Σd²t) / (dᵀd)²`` (expanded
        residuals), so the errors stay a one-pass sum: per block one
        square and two more small BLAS products (the square's product
        also yields ``Σy²``).
        """
        d = self.design
        t = np.asarray(t, d.dtype)
        ut = t * d.basis[0]
        self.hac_terms = (t, ut)
        if self.fused:  # the compiled kernel reads t itself
            self._vectors[3] = np.ascontiguousarray(t)
            return
        self._hac_sq = np.stack([t, np.ones_like(t)], axis=1)  # (n, 2)
        if self.rows is not None:  # raw y: also Σy·M·t, to centre later
            self._hac_lin = np.stack([ut, t * d.centre.reshape(-1)], axis=1)
        else:
            self._hac_lin = ut[:, None]

    def _buffer(
        self, rows: int, shape: tuple[int, ...], band: slice
    ) -> np.ndarray:
        # With a mask only the fitted pixels are ever written, so the rest
        # must start (and stay) zero: one buffer per thread and block shape
        # and, with a mask, per band (bands of one shape differ in which
        # pixels are fitted; sharing a buffer left stale values in pixels
        # masked in one band but not in the other).
        buffers = getattr(self._local, 'buffers', None)
        if buffers is None:
            buffers = self._local.buffers = {}
        key = (rows, *shape)
        if self.design.mask is not None and self.ref_shape:
            key += tuple(band.indices(self.ref_shape[0])[:2])
        buf = buffers.get(key)
        if buf is None:
            buf = buffers[key] = np.zeros((rows, *shape), self.design.dtype)
        return buf

    def _square(self, y: np.ndarray) -> np.ndarray:
        squares = getattr(self._local, 'squares', None)
        if squares is None or squares.shape != y.shape:
            squares = self._local.squares = np.empty_like(y)
        return np.square(y, out=squares)

    def pixel_range(self, block: Block) -> slice:
        if not self.ref_shape:
            return slice(None)
        start, stop, _ = block.band.indices(self.ref_shape[0])
        return slice(start * self.row_len, stop * self.row_len)

    def _centre_and_where(self, band: slice):
        d = self.design
        if not self.ref_shape:
            return d.centre, True if d.mask is None else d.mask
        where = True if d.mask is None else d.mask[band]
        return d.centre[band], where

    def _band_shape(self, band: slice) -> tuple[int, ...]:
        if not self.ref_shape:
            return ()
        n = len(range(*band.indices(self.ref_shape[0])))
        return (n, *self.ref_shape[1:])

    def centred_pieces(self, block: Block):
        """Yield ``(row0, y_c)`` for cache-sized runs of the block's rows.

        Each storage read (a zarr chunk can hold many slices) is cast and
        centred a few slices at a time into the thread's buffer, so the
        products that follow read it from the L2 cache.
        """
        centre, where = self._centre_and_where(block.band)
        shape = self._band_shape(block.band)
        for r0, r1, piece in read_runs(self.stack, self.lead_shape, block):
            piece = as_numpy(piece)
            for s0 in range(0, r1 - r0, self.sub_rows):
                sub = piece[s0 : s0 + self.sub_rows]
                buf = self._buffer(len(sub), shape, block.band)
                if sub.dtype == buf.dtype:
                    np.subtract(sub, centre, out=buf, where=where)
                else:
                    # a plain cast and an in-cache subtraction take 2/3 of
                    # the time of one subtraction that casts as it goes
                    np.copyto(buf, sub, casting='unsafe', where=where)
                    np.subtract(buf, centre, out=buf, where=where)
                yield r0 + s0, buf.reshape(len(sub), -1)

    def raw_pieces(self, block: Block):
        """Yield ``(row0, y)``: the block's slices as stored, C-ordered 2-D.

        In-memory stacks give views (a strided one is copied per piece).
        """
        for r0, r1, piece in read_runs(self.stack, self.lead_shape, block):
            y = as_numpy(piece).reshape(r1 - r0, -1)
            yield r0, np.ascontiguousarray(y)

    def centred(self, block: Block) -> np.ndarray:
        """Read one block and centre it on M: ``(rows, n_band_pixels)``."""
        rows = block.stop - block.start
        out = np.zeros(
            (rows, math.prod(self._band_shape(block.band))), self.design.dtype
        )
        for r0, yc in self.centred_pieces(block):
            out[r0 : r0 + len(yc)] = yc
        return out

    def centred_slices(self, indices) -> np.ndarray:
        """Read whole slices (flat indices) centred on M: ``(len, n_ref)``.

        For a few slices picked across the stack: one cast and one
        subtraction for all of them (per-slice blocks cost ~70 µs each).
        """
        d = self.design
        rows = flat_rows(self.stack, math.prod(self.lead_shape))
        if rows is not None:  # one gather instead of a read per slice
            y = rows[np.asarray(indices, dtype=np.intp)]
        else:
            y = np.stack(
                [
                    as_numpy(self.stack[np.unravel_index(i, self.lead_shape)])
                    for i in indices
                ]
            ).reshape(len(indices), -1)
        centre = d.centre.reshape(-1)
        with np.errstate(invalid='ignore', over='ignore'):  # reported later
            if d.mask is None:
                return np.subtract(y, centre, dtype=d.dtype)
            out = np.zeros(y.shape, d.dtype)
            np.subtract(y, centre, out=out, where=d.mask.reshape(-1))
        return out

    def accumulate(self, block: Block, out: np.ndarray) -> None:
        """Add the block's sums to ``out[block.start:block.stop]``."""
        px = self.pixel_range(block)
        if self.fused:
            vectors = self._band_vectors(px)
            for r0, y in self.raw_pieces(block):
                rows = slice(block.start + r0, block.start + r0 + len(y))
                _fused.block_sums(y, *vectors, out[rows])
            return
        basis_t = self._basis_t[px]
        if self.rows is not None:
            pieces = [(0, self.rows[block.start : block.stop, px])]
        else:
            pieces = self.centred_pieces(block)
        for r0, y in pieces:
            rows = slice(block.start + r0, block.start + r0 + len(y))
            # np.dot (not @: numpy's matmul keeps the GIL) runs one small
            # BLAS GEMM against the transposed basis without copying it.
            out[rows, :3] += np.dot(y, basis_t)
            if self._hac_sq is None:
                out[rows, 4] += np.vecdot(y, y)
                continue
            # Σy²·t and Σy² from one product with the squares
            squares = np.dot(self._square(y), self._hac_sq[px])
            out[rows, 5] += squares[:, 0]
            out[rows, 4] += squares[:, 1]
            lin = np.dot(y, self._hac_lin[px])
            out[rows, 6] += lin[:, 0]
            if lin.shape[1] > 1:
                out[rows, 7] += lin[:, 1]

    def centred_sums(self, sums: np.ndarray) -> np.ndarray:
        """Turn accumulated sums into centred ones (in place), see above."""
        if self.rows is None:
            sums[:, 3] = sums[:, 4]
            return sums
        # Sums over raw float64 y, columns u1ᵀy, Σy, Mᵀy: centre them with
        # Σ(y − M)² = Σy² − 2 Mᵀy + MᵀM, u2ᵀy = Mᵀy − mean(M)·Σy, ...
        d = self.design
        centre = d.centre.reshape(-1)
        u1y, total, my = (sums[:, j].copy() for j in range(3))
        mean = float(centre.mean())
        with np.errstate(invalid='ignore'):  # inf data is reported later
            sums[:, 0] = u1y - d.basis[0] @ centre
            sums[:, 1] = (my - mean * total) - d.basis[1] @ centre
            sums[:, 2] = total - centre.sum()
            sums[:, 3] = sums[:, 4] - 2 * my + centre @ centre
            if self.hac_terms is not None:
                t, ut = (a.astype(np.float64) for a in self.hac_terms)
                sums[:, 5] += -2 * sums[:, 7] + centre**2 @ t
                sums[:, 6] -= centre @ ut
        return sums

    def exact_sums(
        self, block: Block, delta_basis: np.ndarray, out: np.ndarray
    ) -> None:
        """Add ``Σr²`` and ``Σr²·t`` of the explicit residuals into ``out``.

        ``delta_basis`` (rows, 3): each slice's ``δ`` on the basis; ``out``
        (rows, 2) float64 (``Σr²·t`` only after :meth:`hac`).
        """
        px = self.pixel_range(block)
        if self.fused:
            centre, mean, u1, t, segs = self._band_vectors(px)
            for r0, y in self.raw_pieces(block):
                rows = slice(r0, r0 + len(y))
                _fused.exact_sums(
                    y, centre, mean, u1, delta_basis[rows], t, segs, out[rows]
                )
            return
        yc = self.centred(block)
        basis = self.design.basis[:, px]
        # Pixels outside the mask are zero in both yc and the basis.
        resid = (yc - delta_basis.astype(yc.dtype) @ basis).astype(np.float64)
        squares = np.square(resid)
        out[:, 0] += squares.sum(axis=1)
        if self.hac_terms is not None:
            out[:, 1] += squares @ self.hac_terms[0][px].astype(np.float64)

    def residual_terms(
        self,
        block: Block,
        delta_basis: np.ndarray,
        terms: np.ndarray,
        out: np.ndarray,
    ) -> None:
        """Add ``Σr²`` and ``Σr²·terms[m]`` of the explicit residuals.

        Compiled kernel only (see :func:`_fused.exact_terms`):
        ``delta_basis`` (rows, 3), ``terms`` (6, n_ref) in the working
        dtype, ``out`` (rows, 7) float64.
        """
        px = self.pixel_range(block)
        centre, mean, u1, _, segs = self._band_vectors(px)
        band_terms = np.ascontiguousarray(terms[:, px])
        for r0, y in self.raw_pieces(block):
            rows = slice(r0, r0 + len(y))
            _fused.exact_terms(
                y,
                centre,
                mean,
                u1,
                delta_basis[rows],
                band_terms,
                segs,
                out[rows],
            )


def flat_rows(stack, n_slices: int) -> np.ndarray | None:
    """Return a numpy ``stack`` as an ``(n_slices, n_ref)`` view, or None."""
    if not isinstance(stack, np.ndarray):
        return None
    try:
        return stack.reshape((n_slices, -1), copy=False)
    except (ValueError, TypeError):  # a copy would be needed
        return None


def as_rows(stack, n_slices: int) -> np.ndarray | None:
    """``stack`` as a C-ordered ``(n_slices, n_ref)`` float64 view, or None."""
    if getattr(stack, 'dtype', None) != np.float64:
        return None
    return flat_rows(stack, n_slices)


def _n_threads() -> int:
    return max(1, min(2, os.cpu_count() or 1))


_POOL: ThreadPoolExecutor | None = None
_BLAS: list = []  # threadpoolctl's controllers of the loaded BLAS libraries
_POOL_LOCK = threading.Lock()


def pool_and_blas():
    """Return the shared chunk threads and BLAS libraries' controllers.

    Made once: starting threads and scanning the loaded libraries for BLAS
    take longer than fitting a small stack.
    """
    global _POOL, _BLAS
    with _POOL_LOCK:
        if _POOL is None:
            from threadpoolctl import ThreadpoolController

            controller = ThreadpoolController().select(user_api='blas')
            _BLAS = controller.lib_controllers
            _POOL = ThreadPoolExecutor(
                _n_threads(), thread_name_prefix='mixcoef'
            )
    return _POOL, _BLAS


class SharedSetting:
    """A process-wide setting changed while any of several users runs.

    ``with setting():`` around each user (a fit; fits may overlap in
    several threads).  The first one in calls ``apply()``, which changes
    the setting and returns what it replaced; the last one out passes that
    to ``restore``.  Each user restoring what it found itself would leave
    the setting changed for good when users end out of order.
    """

    def __init__(
        self, apply: Callable[[], object], restore: Callable[[object], object]
    ) -> None:
        self._apply, self._restore = apply, restore
        self._lock = threading.Lock()
        self._users = 0
        self._saved = None

    @contextlib.contextmanager
    def __call__(self):
        with self._lock:
            if self._users == 0:
                self._saved = self._apply()
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._restore(self._saved)
                    self._saved = None


def _blas_on_one_thread() -> list:
    """Put every BLAS library on one thread; return what to restore.

    The chunk threads are the parallelism: BLAS threads inside them would
    oversubscribe the cores, and after any multi-threaded BLAS call (even a
    small one while preparing the references) OpenBLAS's idle threads spin
    for about 0.1 s, taking the cores from the chunk threads (measured: a
    fit 1.5× slower).  Only the thread counts are read and set:
    threadpoolctl's ``limit()`` first gathers every library's whole
    description, which cost ~0.15 ms of each fit with caches cold.
    """
    _, blas = pool_and_blas()
    found = []
    for lib in blas:
        threads = lib.num_threads
        if threads != 1:
            lib.set_num_threads(1)
            found.append((lib, threads))
    return found


def _blas_restore(found: list) -> None:
    for lib, threads in found:
        lib.set_num_threads(threads)


#: Context: BLAS on one thread while a fit runs (see _blas_on_one_thread).
one_blas_thread = SharedSetting(_blas_on_one_thread, _blas_restore)


def thread_run(
    groups: list[list[Block]],
    work: Callable[[Block], None],
    check: Callable[[int, int], None],
    n_slices: int,
) -> Generator[tuple[int, int], None, None]:
    """Run ``work`` on every block on the chunk threads, in runs.

    ``check(start, stop)`` runs in the caller's thread on each finished run
    of slices (it may raise, which stops the rest).  Yields
    ``(done_slices, total_slices)`` as runs finish, in order.  Run it
    inside :func:`one_blas_thread`.
    """
    stop_event = threading.Event()

    def run_task(task: list[list[Block]]) -> None:
        # Threads get runs of many blocks: a pool task costs tens of µs,
        # as much as the work on one cache-sized block.
        for group in task:
            if stop_event.is_set():
                return
            for block in group:
                work(block)

    tasks = batch(groups)
    yield 0, n_slices
    pool, _ = pool_and_blas()
    futures = [pool.submit(run_task, task) for task in tasks]
    try:
        for task, fut in zip(tasks, futures):
            fut.result()
            start, stop = task[0][0].start, task[-1][0].stop
            check(start, stop)
            yield stop, n_slices
    finally:
        # a closed generator (cancelled fit) stops the other tasks too,
        # and waits for the running ones: they write into the results
        stop_event.set()
        for fut in futures:
            fut.cancel()
        for fut in futures:
            if not fut.cancelled():
                fut.exception()


def batch(groups) -> list[list[list[Block]]]:
    """Split row groups into runs of ~16 chunk budgets of work each.

    Few enough that pool overhead vanishes, many enough (≥ 8 when there
    is work for it) for progress, cancellation and load balance.
    """
    per_task = max(1, min(16, len(groups) // 8))
    return [groups[i : i + per_task] for i in range(0, len(groups), per_task)]


def check_finite(q: np.ndarray, start: int, lead_shape) -> None:
    """Raise ValueError naming the first slice whose ``Σy²`` is not finite."""
    if not np.isfinite(q).all():
        bad = start + int(np.flatnonzero(~np.isfinite(q))[0])
        index = tuple(int(i) for i in np.unravel_index(bad, lead_shape))
        raise ValueError(
            f'stack slice {index} contains NaN or inf values in the fitted '
            'pixels; replace them (e.g. np.nan_to_num) or leave those '
            'pixels out with mask='
        )
