"""Fit every slice of a stack as a mix of two reference images.

Pure numpy/scipy: importing this module imports neither napari nor Qt.

How the fit works
-----------------
Every slice ``y`` (``n`` fitted pixels) is regressed on the same design
``D`` (``n × k``), so the ``k × k`` Gram matrix ``DᵀD`` is computed and
inverted once, from the references alone.  Each slice then needs only a few
numbers -- its *sufficient statistics* -- gathered in one streaming pass:

* the pixels are centred on the mean reference ``M = (A + B) / 2`` while
  they are cast to the working float type (one ufunc call per block);
* three BLAS matrix-vector products with the basis ``u1 = A − B``,
  ``u2 = M − mean(M)``, ``u3 = 1`` (the avg/diff basis of the pair);
* one BLAS dot product per slice for ``Σ y_c²``.

Every model's design is a fixed linear map of that basis, so the statistics
of all three models follow from the same four numbers per slice.

Accuracy
--------
``SSR = y_cᵀy_c − δᵀ(Dᵀy_c)`` subtracts two sums; the difference loses
about ``log10(y_cᵀy_c / SSR)`` digits.  Centring on ``M`` keeps that ratio
near ``1 + (x − ½)²‖A − B‖² / ‖noise‖²`` (small for real data) instead of
``‖image‖² / ‖noise‖²``.  Slices where the ratio still exceeds
``1 / _GUARD`` (nearly noise-free data, R² ≈ 1) are recomputed from their
explicit residuals in a second pass over those slices only.  Measured
against float64 ``scipy.linalg.lstsq`` (see ``tests/test_core.py``): about
1e-12 relative for float64 input and better than 2e-5 for 16-bit/float32
input, whose working type is float32.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._chunks import (
    DEFAULT_CHUNK_BYTES,
    Block,
    as_numpy,
    plan_blocks,
    read_runs,
    storage_chunk_length,
)
from ._dask import dask_residuals, dask_sums, is_dask

__all__ = ['MODELS', 'MixFit', 'fit_stack', 'residuals', 'write_csv']

#: Coefficient names of each model.
MODELS: dict[str, tuple[str, ...]] = {
    'mix': ('x',),
    'scaled': ('a', 'b'),
    'offset': ('a', 'b', 'c'),
}

# Above this condition number of the unit-normalised Gram matrix the
# references cannot be told apart: coefficients would be rounding noise.
_COLLINEAR_COND = 1e6
# Recompute SSR explicitly where SSR < _GUARD · Σ y_c² (see module notes).
_GUARD = {np.dtype(np.float32): 1e-2, np.dtype(np.float64): 1e-6}

ProgressCallback = Callable[[int, int], object]


@dataclass(frozen=True, eq=False)
class MixFit:
    """Per-slice result of :func:`fit_stack`.

    Attributes
    ----------
    model : str
        ``"mix"``, ``"scaled"`` or ``"offset"``.
    names : tuple of str
        Coefficient names, ``k`` of them.
    coef, stderr : (*lead, k) ndarray of float64
        Coefficients and their OLS standard errors.
    x, x_stderr : (*lead) ndarray of float64
        Mixing coefficient (``a / (a + b)`` for the free models) and its
        standard error (delta method for the free models).
    r2 : (*lead) ndarray of float64
        Centred coefficient of determination, per slice.
    rmse : (*lead) ndarray of float64
        ``sqrt(SSR / n_pixels)``, per slice.
    n_pixels : int
        Number of fitted pixels per slice.
    """

    model: str
    names: tuple[str, ...]
    coef: NDArray[np.float64]
    stderr: NDArray[np.float64]
    x: NDArray[np.float64]
    x_stderr: NDArray[np.float64]
    r2: NDArray[np.float64]
    rmse: NDArray[np.float64]
    n_pixels: int
    _design: _Design = field(repr=False)

    @property
    def lead_shape(self) -> tuple[int, ...]:
        """Shape of the leading (slice index) dimensions."""
        return self.x.shape

    def table(self) -> dict[str, NDArray]:
        """Return the per-slice columns of :meth:`to_csv`, flattened.

        Returns
        -------
        dict of str to (n_slices,) ndarray
            ``index_0``, ``index_1``, … (int64), then ``x``, ``x_stderr``,
            each coefficient and its ``<name>_stderr`` (not repeated for
            ``"mix"``, whose coefficient is ``x``), ``r2`` and ``rmse``.
        """
        n = self.x.size
        columns: dict[str, NDArray] = {}
        index = np.unravel_index(np.arange(n), self.lead_shape)
        for axis, values in enumerate(index):
            columns[f'index_{axis}'] = values.astype(np.int64)
        columns['x'] = self.x.reshape(n)
        columns['x_stderr'] = self.x_stderr.reshape(n)
        if self.model != 'mix':
            coef = self.coef.reshape(n, -1)
            stderr = self.stderr.reshape(n, -1)
            for j, name in enumerate(self.names):
                columns[name] = coef[:, j]
                columns[f'{name}_stderr'] = stderr[:, j]
        columns['r2'] = self.r2.reshape(n)
        columns['rmse'] = self.rmse.reshape(n)
        return columns

    def to_csv(self, path: str | os.PathLike) -> None:
        """Write one row per slice to a CSV file.

        Parameters
        ----------
        path : str or path-like
            Output file; columns as in :meth:`table`.
        """
        write_csv(path, self.table())


def write_csv(path: str | os.PathLike, columns: dict[str, ArrayLike]) -> None:
    """Write equal-length columns to a CSV file with a header row.

    Integers are written as such, floats with 10 significant digits (NaN
    as ``nan``), anything else as text (quoted where needed).
    """
    import csv

    cells = []
    for values in columns.values():
        values = np.asarray(values)
        if values.dtype.kind in 'iub':
            cells.append(values.astype(np.int64).astype(str))
        elif values.dtype.kind == 'f':
            cells.append(np.char.mod('%.10g', values))
        else:
            cells.append(values.astype(str))
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f, lineterminator='\n')
        writer.writerow(list(columns))
        writer.writerows(zip(*cells))


@dataclass(frozen=True, eq=False)
class _Design:
    """Everything about the references that every slice shares.

    ``basis`` holds ``u1 = A − B``, ``u2 = M − mean(M)`` and ``u3 = 1`` as
    rows of length ``n_ref`` (zero outside the mask), in the working dtype;
    ``transform`` (3 × k) maps basis coefficients to the model's design,
    ``D = basis.T @ transform``; ``coef0`` are the model's coefficients of
    ``M`` itself, so that ``coef = coef0 + δ`` where ``δ`` regresses the
    centred slice on ``D``.
    """

    model: str
    ref1: NDArray  # float64, reference shape
    ref2: NDArray
    mask: NDArray[np.bool_] | None
    n_pixels: int
    dtype: np.dtype  # working float type
    centre: NDArray  # M in the working dtype, reference shape
    basis: NDArray  # (3, n_ref) working dtype
    basis_gram: NDArray[np.float64]  # (3, 3)
    basis_u2_sum: float
    transform: NDArray[np.float64]  # (3, k)
    coef0: NDArray[np.float64]  # (k,)
    gram_inv: NDArray[np.float64]  # (k, k), inverse of DᵀD

    @property
    def k(self) -> int:
        return self.coef0.size


def _check_real(name: str, dtype: np.dtype) -> None:
    if dtype.kind not in 'iuf':
        what = {
            'b': 'boolean',
            'c': 'complex',
            'O': 'object',
        }.get(dtype.kind, f'non-numeric ({dtype})')
        hint = {
            'b': f'convert it, e.g. {name}.astype(np.uint8)',
            'c': f'fit the real part or the magnitude (np.abs({name}))',
        }.get(dtype.kind, 'convert it to a real numeric dtype')
        raise TypeError(
            f'{name} has {what} dtype {dtype}; a real numeric dtype '
            f'(int, uint or float) is needed: {hint}'
        )


def _as_array_like(a, name: str, *, check_dtype: bool = True):
    """Return ``a`` unchanged if array-like enough, else ``np.asarray(a)``."""
    if a is None:
        raise TypeError(f'{name} is None; pass an array')
    if not (hasattr(a, 'shape') and hasattr(a, 'dtype')):
        a = np.asarray(a)
    if check_dtype:
        _check_real(name, np.dtype(a.dtype))
    return a


def _working_dtype(dtype: np.dtype) -> np.dtype:
    """float32 where it holds every input value exactly, else float64.

    float32 represents all integers up to 2**24, so 8/16-bit integers,
    float16 and float32 lose nothing; float64 and 32/64-bit integers keep
    float64, for their accuracy.
    """
    if dtype.kind == 'f' and dtype.itemsize <= 4:
        return np.dtype(np.float32)
    if dtype.kind in 'iu' and dtype.itemsize <= 2:
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def _normalised_cond(columns: list[NDArray[np.float64]]) -> float:
    """Condition number of the Gram matrix of unit-normalised columns."""
    norms = [float(np.sqrt(c @ c)) for c in columns]
    if min(norms) == 0.0:
        return math.inf
    unit = np.stack([c / s for c, s in zip(columns, norms)])
    eig = np.linalg.eigvalsh(unit @ unit.T)
    return math.inf if eig[0] <= 0 else float(eig[-1] / eig[0])


def _prepare(ref1, ref2, mask, model: str, stack_dtype: np.dtype) -> _Design:
    """Check the references and mask; build the shared design."""
    if model not in MODELS:
        raise ValueError(
            f'unknown model {model!r}; choose one of '
            + ', '.join(repr(m) for m in MODELS)
        )
    ref1 = _as_array_like(ref1, 'ref1')
    ref2 = _as_array_like(ref2, 'ref2')
    if ref1.shape != ref2.shape:
        raise ValueError(
            f'ref1 has shape {ref1.shape} but ref2 has shape {ref2.shape}; '
            'the two references must have the same shape'
        )
    shape = tuple(ref1.shape)
    # float64 copies: the references are one slice each, and the caller's
    # arrays must never be touched.
    a = np.array(as_numpy(ref1), dtype=np.float64)
    b = np.array(as_numpy(ref2), dtype=np.float64)
    if mask is not None:
        mask = as_numpy(_as_array_like(mask, 'mask', check_dtype=False))
        if mask.shape != shape:
            raise ValueError(
                f'mask has shape {mask.shape} but the references have shape '
                f'{shape}; the mask must have the shape of one reference'
            )
        mask = mask != 0
        n = int(mask.sum())
        if mask.all():
            mask = None
    else:
        n = math.prod(shape)
    k = len(MODELS[model])
    if n <= k:
        where = 'the mask selects' if mask is not None else 'the images have'
        raise ValueError(
            f'{where} {n} pixel(s), but the {model!r} model has {k} '
            f'coefficient(s) and needs more than {k} fitted pixels; '
            'select more pixels in the mask'
        )
    fa, fb = (a, b) if mask is None else (a[mask], b[mask])
    for name, v in (('ref1', fa), ('ref2', fb)):
        if not np.isfinite(v).all():
            bad = int(np.size(v) - np.isfinite(v).sum())
            raise ValueError(
                f'{name} has {bad} NaN or inf value(s) in the fitted pixels; '
                'replace them (e.g. np.nan_to_num) or leave them out with '
                'mask='
            )
    cond = _normalised_cond([fa.ravel(), fb.ravel()])
    if cond > _COLLINEAR_COND:
        raise ValueError(
            'ref1 and ref2 are collinear (one is a multiple of the other '
            'over the fitted pixels; Gram condition number '
            f'{cond:.3g}), so their mix cannot be told apart from a change '
            'of brightness; choose two references that differ in pattern'
        )
    if model == 'offset':
        cond = _normalised_cond([fa.ravel(), fb.ravel(), np.ones(n)])
        if cond > _COLLINEAR_COND:
            raise ValueError(
                'ref1, ref2 and a constant offset are collinear (the '
                'references differ only by an offset and a scale; Gram '
                f'condition number {cond:.3g}); use model="scaled" or '
                '"mix", or choose references that differ in pattern'
            )

    dtype = _working_dtype(stack_dtype)
    centre64 = 0.5 * (a + b)
    centre_mean = float(
        centre64[mask].mean() if mask is not None else centre64.mean()
    )
    basis64 = np.stack(
        [
            (a - b).ravel(),
            (centre64 - centre_mean).ravel(),
            np.ones(a.size),
        ]
    )
    if mask is not None:
        basis64[:, ~mask.ravel()] = 0.0
    basis = basis64.astype(dtype)
    # The Gram matrix of the basis as the kernel will use it (rounded to the
    # working dtype), accumulated in float64.
    used = basis.astype(np.float64)
    basis_gram = used @ used.T
    m = centre_mean
    transform = {
        'mix': np.array([[1.0], [0.0], [0.0]]),
        'scaled': np.array([[0.5, -0.5], [1.0, 1.0], [m, m]]),
        'offset': np.array([[0.5, -0.5, 0.0], [1.0, 1.0, 0.0], [m, m, 1.0]]),
    }[model]
    coef0 = {'mix': [0.5], 'scaled': [0.5, 0.5], 'offset': [0.5, 0.5, 0.0]}
    gram = transform.T @ basis_gram @ transform
    return _Design(
        model=model,
        ref1=a,
        ref2=b,
        mask=mask,
        n_pixels=n,
        dtype=dtype,
        centre=centre64.astype(dtype),
        basis=basis,
        basis_gram=basis_gram,
        basis_u2_sum=float(used[1].sum()),
        transform=transform,
        coef0=np.array(coef0[model]),
        gram_inv=np.linalg.inv(gram),
    )


def _check_stack(stack, ref_shape: tuple[int, ...]):
    stack = _as_array_like(stack, 'stack')
    r = len(ref_shape)
    if stack.ndim < r or tuple(stack.shape[stack.ndim - r :]) != ref_shape:
        raise ValueError(
            f'stack has shape {tuple(stack.shape)} but the references have '
            f'shape {ref_shape}; the references must match the last {r} '
            'axes of the stack'
        )
    return stack


class _Kernel:
    """Per-slice sums of blocks, one working buffer per thread.

    :meth:`accumulate` adds a block's sums into the rows of a ``(n, 5)``
    float64 array; :meth:`centred_sums` turns them into ``u1ᵀy_c, u2ᵀy_c,
    Σy_c, Σy_c²`` plus the magnitude of the largest sum behind ``Σy_c²``
    (what the SSR guard compares with).  Each block costs two or three
    numpy calls that release the GIL, so the Python overhead per block
    stays far below its arithmetic.
    """

    def __init__(
        self, stack, design: _Design, lead_shape, ref_shape, chunk_bytes
    ):
        self.stack = stack
        self.design = design
        self.lead_shape = lead_shape
        self.ref_shape = ref_shape
        self.row_len = math.prod(ref_shape[1:])  # pixels per reference row
        slice_bytes = math.prod(ref_shape) * design.dtype.itemsize
        self.sub_rows = max(1, chunk_bytes // max(1, slice_bytes))
        self._local = threading.local()
        # float64 data stored as C-ordered slices needs neither a cast nor
        # centring (its products with M are exact enough to centre
        # afterwards): the kernel reads it in place, saving a pass.
        self.rows = None
        if design.dtype == np.float64 and design.mask is None:
            self.rows = _as_rows(stack, math.prod(lead_shape))
        basis = design.basis
        if self.rows is not None:
            basis = np.vstack([basis, design.centre.reshape(1, -1)])
        self._basis_t = basis.T  # (n_ref, 3 or 4), F-ordered view

    def _buffer(self, rows: int, shape: tuple[int, ...]) -> np.ndarray:
        # With a mask only the fitted pixels are ever written, so the rest
        # must start (and stay) zero: one buffer per thread and block shape.
        buffers = getattr(self._local, 'buffers', None)
        if buffers is None:
            buffers = self._local.buffers = {}
        key = (rows, *shape)
        buf = buffers.get(key)
        if buf is None:
            buf = buffers[key] = np.zeros(key, self.design.dtype)
        return buf

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

    def _centred_pieces(self, block: Block):
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
                buf = self._buffer(len(sub), shape)
                if sub.dtype == buf.dtype:
                    np.subtract(sub, centre, out=buf, where=where)
                else:
                    # a plain cast and an in-cache subtraction take 2/3 of
                    # the time of one subtraction that casts as it goes
                    np.copyto(buf, sub, casting='unsafe', where=where)
                    np.subtract(buf, centre, out=buf, where=where)
                yield r0 + s0, buf.reshape(len(sub), -1)

    def centred(self, block: Block) -> np.ndarray:
        """Read one block and centre it on M: ``(rows, n_band_pixels)``."""
        rows = block.stop - block.start
        out = np.zeros(
            (rows, math.prod(self._band_shape(block.band))), self.design.dtype
        )
        for r0, yc in self._centred_pieces(block):
            out[r0 : r0 + len(yc)] = yc
        return out

    def accumulate(self, block: Block, out: np.ndarray) -> None:
        """Add the block's sums to ``out[block.start:block.stop]``."""
        px = self.pixel_range(block)
        basis_t = self._basis_t[px]
        k = basis_t.shape[1]
        if self.rows is not None:
            pieces = [(0, self.rows[block.start : block.stop, px])]
        else:
            pieces = self._centred_pieces(block)
        for r0, y in pieces:
            rows = slice(block.start + r0, block.start + r0 + len(y))
            # np.dot (not @: numpy's matmul keeps the GIL) runs one small
            # BLAS GEMM against the transposed basis without copying it.
            out[rows, :k] += np.dot(y, basis_t)
            out[rows, 4] += np.vecdot(y, y)

    def centred_sums(self, sums: np.ndarray) -> np.ndarray:
        """Turn accumulated sums into centred ones (in place), see above."""
        if self.rows is None:
            sums[:, 3] = sums[:, 4]
            return sums
        # Sums over raw float64 y: Σ(y − M)² = Σy² − 2 Mᵀy + MᵀM, and so on.
        basis = self._basis_t.T
        with_centre = basis @ self.design.centre.reshape(-1)
        with np.errstate(invalid='ignore'):  # inf data is reported later
            sums[:, :3] -= with_centre[:3]
            sums[:, 3] = sums[:, 4] - 2 * sums[:, 3] + with_centre[3]
        return sums

    def exact_ssr(self, block: Block, delta_basis: np.ndarray) -> np.ndarray:
        """Σ (y_c − basis·δ)² per row, from the explicit residuals."""
        yc = self.centred(block)
        basis = self.design.basis[:, self.pixel_range(block)]
        # Pixels outside the mask are zero in both yc and the basis.
        resid = (yc - delta_basis.astype(yc.dtype) @ basis).astype(np.float64)
        return np.vecdot(resid, resid)


def _as_rows(stack, n_slices: int) -> np.ndarray | None:
    """``stack`` as a C-ordered ``(n_slices, n_ref)`` float64 view, or None."""
    if not isinstance(stack, np.ndarray) or stack.dtype != np.float64:
        return None
    try:
        return stack.reshape((n_slices, -1), copy=False)
    except (ValueError, TypeError):  # a copy would be needed
        return None


def _n_threads() -> int:
    return max(1, min(2, os.cpu_count() or 1))


_POOL: ThreadPoolExecutor | None = None
_BLAS = None
_POOL_LOCK = threading.Lock()


def _pool_and_blas():
    """Return the shared chunk threads and BLAS controller (made once).

    Starting threads and scanning the loaded libraries for BLAS take
    longer than fitting a small stack, so both are kept between fits.
    """
    global _POOL, _BLAS
    with _POOL_LOCK:
        if _POOL is None:
            from threadpoolctl import ThreadpoolController

            _BLAS = ThreadpoolController()
            _POOL = ThreadPoolExecutor(
                _n_threads(), thread_name_prefix='mixcoef'
            )
    return _POOL, _BLAS


def _thread_sums(kernel, groups, raw, lead_shape, n_slices):
    """Fill ``raw`` with every block's sums on the chunk threads.

    Yields ``(done_slices, total_slices)`` as runs of blocks finish.
    """
    stop_event = threading.Event()

    def run_task(task: list[list[Block]]) -> None:
        # Threads get runs of many blocks: a pool task costs tens of µs,
        # as much as the work on one cache-sized block.
        for group in task:
            if stop_event.is_set():
                return
            for block in group:
                kernel.accumulate(block, raw)

    tasks = _batch(groups)
    yield 0, n_slices
    pool, blas = _pool_and_blas()
    # BLAS runs single-threaded inside our chunk threads: nested threading
    # would only oversubscribe the cores.
    with blas.limit(limits=1, user_api='blas'):
        futures = [pool.submit(run_task, task) for task in tasks]
        try:
            for task, fut in zip(tasks, futures):
                fut.result()
                start, stop = task[0][0].start, task[-1][0].stop
                _check_finite(raw[start:stop], start, lead_shape)
                yield stop, n_slices
        finally:
            # a closed generator (cancelled fit) stops the other tasks too,
            # and waits for the running ones: they write into `raw`
            stop_event.set()
            for fut in futures:
                fut.cancel()
            for fut in futures:
                if not fut.cancelled():
                    fut.exception()


def _fit_steps(
    stack,
    ref1,
    ref2,
    *,
    model: str = 'mix',
    mask=None,
    chunk_bytes: int | None = None,
) -> Generator[tuple[int, int], None, MixFit]:
    """Fit the stack, yielding ``(done_slices, total_slices)`` as it goes.

    The generator form of :func:`fit_stack`: a GUI worker yields each step
    to its event loop and can stop the fit between chunks by closing the
    generator.  The :class:`MixFit` is the generator's return value.
    """
    ref_shape = tuple(getattr(ref1, 'shape', np.shape(ref1)))
    stack = _check_stack(stack, ref_shape)
    design = _prepare(ref1, ref2, mask, model, np.dtype(stack.dtype))
    lead_shape = tuple(
        int(s) for s in stack.shape[: stack.ndim - len(ref_shape)]
    )
    n_slices = math.prod(lead_shape)
    groups = plan_blocks(
        lead_shape,
        ref_shape,
        design.dtype.itemsize,
        chunk_bytes or DEFAULT_CHUNK_BYTES,
        align=storage_chunk_length(stack),
    )
    chunk_bytes = chunk_bytes or DEFAULT_CHUNK_BYTES
    kernel = _Kernel(stack, design, lead_shape, ref_shape, chunk_bytes)
    raw = np.zeros((n_slices, 5))
    if is_dask(stack):
        # block-wise on the active dask scheduler, never gathered here
        raw = yield from dask_sums(stack, design, lead_shape)
        _check_finite(raw, 0, lead_shape)
    else:
        yield from _thread_sums(kernel, groups, raw, lead_shape, n_slices)
    kernel.centred_sums(raw)

    delta, ssr = _solve(raw, design)
    # Guard the SSR shortcut where it cancels (R² ≈ 1): recompute those
    # slices from their explicit residuals, a second pass over them only.
    suspect = ssr < _GUARD[design.dtype] * raw[:, 4]
    if suspect.any():
        delta_basis = delta @ design.transform.T  # δ in the basis, (n, 3)
        for group in groups:
            start, stop = group[0].start, group[0].stop
            rows = suspect[start:stop]
            if rows.any():
                exact = kernel.exact_ssr(group[0], delta_basis[start:stop])
                for block in group[1:]:
                    exact += kernel.exact_ssr(block, delta_basis[start:stop])
                ssr[start:stop][rows] = exact[rows]
    return _statistics(raw, delta, ssr, design, lead_shape)


def _batch(groups) -> list[list[list[Block]]]:
    """Split row groups into runs of ~16 chunk budgets of work each.

    Few enough that pool overhead vanishes, many enough (≥ 8 when there
    is work for it) for progress, cancellation and load balance.
    """
    per_task = max(1, min(16, len(groups) // 8))
    return [groups[i : i + per_task] for i in range(0, len(groups), per_task)]


def _check_finite(values: np.ndarray, start: int, lead_shape) -> None:
    q = values[:, 4]
    if not np.isfinite(q).all():
        bad = start + int(np.flatnonzero(~np.isfinite(q))[0])
        index = tuple(int(i) for i in np.unravel_index(bad, lead_shape))
        raise ValueError(
            f'stack slice {index} contains NaN or inf values in the fitted '
            'pixels; replace them (e.g. np.nan_to_num) or leave those '
            'pixels out with mask='
        )


def _solve(raw: np.ndarray, design: _Design):
    """Coefficient offsets δ and the shortcut SSR from the sums."""
    g = raw[:, :3] @ design.transform  # Dᵀ y_c, (n, k)
    delta = g @ design.gram_inv  # gram_inv is symmetric
    ssr = raw[:, 3] - np.einsum('ij,ij->i', delta, g)
    return delta, ssr


def _statistics(raw, delta, ssr, design: _Design, lead_shape) -> MixFit:
    n, k = design.n_pixels, design.k
    ssr = np.maximum(ssr, 0.0)
    coef = design.coef0 + delta
    sigma2 = ssr / (n - k)
    var = sigma2[:, None] * np.diag(design.gram_inv)
    stderr = np.sqrt(var)
    if design.model == 'mix':
        x = coef[:, 0]
        x_stderr = stderr[:, 0]
    else:
        a, b = coef[:, 0], coef[:, 1]
        with np.errstate(divide='ignore', invalid='ignore'):
            total = a + b
            x = a / total
            jac = np.zeros_like(coef)
            jac[:, 0] = b / total**2
            jac[:, 1] = -a / total**2
        quad = np.einsum('ij,jk,ik->i', jac, design.gram_inv, jac)
        x_stderr = np.sqrt(sigma2 * quad)
    s = raw[:, 2]
    sst = (
        raw[:, 3]
        - s * s / n
        + 2.0 * (raw[:, 1] - s / n * design.basis_u2_sum)
        + design.basis_gram[1, 1]
    )
    with np.errstate(divide='ignore', invalid='ignore'):
        r2 = np.where(sst > 0, 1.0 - ssr / sst, np.nan)
    rmse = np.sqrt(ssr / n)

    def shaped(v, extra=()):
        return np.ascontiguousarray(v).reshape(lead_shape + extra)

    return MixFit(
        model=design.model,
        names=MODELS[design.model],
        coef=shaped(coef, (k,)),
        stderr=shaped(stderr, (k,)),
        x=shaped(x),
        x_stderr=shaped(x_stderr),
        r2=shaped(r2),
        rmse=shaped(rmse),
        n_pixels=n,
        _design=design,
    )


def fit_stack(
    stack: ArrayLike,
    ref1: ArrayLike,
    ref2: ArrayLike,
    *,
    model: str = 'mix',
    mask: ArrayLike | None = None,
    chunk_bytes: int | None = None,
    progress: ProgressCallback | None = None,
) -> MixFit:
    """Fit each slice of `stack` as a combination of two reference images.

    Parameters
    ----------
    stack : (*lead, *ref.shape) array_like
        Any real dtype, byte order or memory layout; numpy array, memmap,
        dask or zarr array.  Every leading axis is a slice index.  Never
        modified, never copied whole: it is read once, block by block.
    ref1, ref2 : (*ref.shape) array_like
        The reference images A and B.
    model : {"mix", "scaled", "offset"}
        ``"mix"``: ``I ≈ x·A + (1−x)·B``; ``"scaled"``: ``I ≈ a·A + b·B``;
        ``"offset"``: ``I ≈ a·A + b·B + c``.  For the free models
        ``x = a / (a + b)``.
    mask : (*ref.shape) array_like of bool, optional
        Only True (nonzero) pixels enter the fit and the statistics.
    chunk_bytes : int, optional
        Working-buffer budget per block and thread (default 1 MiB); blocks
        are aligned to zarr/dask chunks along the first axis.
    progress : callable, optional
        ``progress(done_slices, total_slices)``, called as blocks finish.

    Returns
    -------
    MixFit
        ``x``, ``x_stderr``, ``r2``, ``rmse`` of shape ``lead``; ``coef``
        and ``stderr`` of shape ``lead + (k,)``.

    Raises
    ------
    ValueError
        Shapes that do not match, collinear references, NaN or inf in the
        fitted pixels, a mask with too few pixels, an unknown model.
    TypeError
        Complex, boolean or non-numeric dtypes.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> A, B = rng.random((2, 32, 32))
    >>> x = np.array([0.4, 0.5, 0.7])
    >>> stack = x[:, None, None] * A + (1 - x[:, None, None]) * B
    >>> fit = fit_stack(stack + rng.normal(0, 0.01, stack.shape), A, B)
    >>> np.round(fit.x, 2)
    array([0.4, 0.5, 0.7])
    """
    steps = _fit_steps(
        stack, ref1, ref2, model=model, mask=mask, chunk_bytes=chunk_bytes
    )
    try:
        while True:
            done, total = next(steps)
            if progress is not None:
                progress(done, total)
    except StopIteration as stop:
        return stop.value


def model_images(model: str, coef, ref1, ref2, dtype) -> np.ndarray:
    """Model images for coefficients of shape ``(..., k)``.

    Parameters
    ----------
    model : str
        A key of :data:`MODELS`.
    coef : (..., k) ndarray
        Coefficients, one row per slice.
    ref1, ref2 : (*ref.shape) ndarray
        The references A and B.
    dtype : dtype
        Working float type of the result.

    Returns
    -------
    (..., *ref.shape) ndarray
        ``x·A + (1−x)·B``, ``a·A + b·B`` or ``a·A + b·B + c``.
    """
    c = np.asarray(coef).astype(dtype)
    a, b = np.asarray(ref1, dtype), np.asarray(ref2, dtype)
    expand = (Ellipsis,) + (np.newaxis,) * a.ndim
    if model == 'mix':
        return b + c[..., 0][expand] * (a - b)
    out = c[..., 0][expand] * a + c[..., 1][expand] * b
    if model == 'offset':
        out = out + c[..., 2][expand]
    return out


class ResidualStack:
    """Lazy residual ``I − model`` of a fitted stack, float32.

    Behaves like a read-only array of the stack's shape: indexing computes
    only the slices it selects, so napari can display it slice by slice.
    ``np.asarray(res)`` computes everything.
    """

    def __init__(self, stack, fit: MixFit):
        self._stack = stack
        self._fit = fit
        d = fit._design
        self._work = d.dtype
        self._ref1 = d.ref1.astype(d.dtype)
        self._ref2 = d.ref2.astype(d.dtype)
        self.shape = tuple(int(s) for s in stack.shape)
        self.dtype = np.dtype(np.float32)
        self.ndim = len(self.shape)
        self._lead_ndim = len(fit.lead_shape)

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f'ResidualStack(shape={self.shape}, dtype=float32)'

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = next(i for i, k in enumerate(key) if k is Ellipsis)
            fill = self.ndim - (len(key) - 1 - sum(k is None for k in key))
            key = key[:i] + (slice(None),) * fill + key[i + 1 :]
        if any(k is None for k in key):
            raise IndexError('ResidualStack does not support np.newaxis')
        key = key + (slice(None),) * (self.ndim - len(key))
        lead_key, ref_key = key[: self._lead_ndim], key[self._lead_ndim :]
        data = as_numpy(self._stack[lead_key])
        coef = self._fit.coef[lead_key]
        model = model_images(
            self._fit.model, coef, self._ref1, self._ref2, self._work
        )
        res = np.subtract(data, model, dtype=self._work)
        res = res.astype(np.float32, copy=False)
        kept = res.ndim - self._ref1.ndim
        return res[(slice(None),) * kept + ref_key]

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out if dtype is None else out.astype(dtype)


def residuals(
    stack: ArrayLike, ref1: ArrayLike, ref2: ArrayLike, fit: MixFit
) -> ResidualStack:
    """Return the lazy residual stack ``I − model`` of a fit.

    Parameters
    ----------
    stack : (*lead, *ref.shape) array_like
        The stack that was fitted (numpy, memmap, zarr or dask).
    ref1, ref2 : (*ref.shape) array_like
        The references of the fit.
    fit : MixFit
        Result of :func:`fit_stack` on these arrays.

    Returns
    -------
    ResidualStack
        Array-like of the stack's shape, float32; each slice is computed
        only when it is read (``np.asarray(res[i])``).  The model is
        evaluated on every pixel, also outside the fit's mask.
    """
    ref_shape = tuple(getattr(ref1, 'shape', np.shape(ref1)))
    stack = _check_stack(stack, ref_shape)
    if tuple(stack.shape[: stack.ndim - len(ref_shape)]) != fit.lead_shape:
        raise ValueError(
            f'the fit has {fit.lead_shape} slices but the stack has shape '
            f'{tuple(stack.shape)}; pass the stack that was fitted'
        )
    design = fit._design
    a = np.asarray(as_numpy(ref1), dtype=np.float64)
    b = np.asarray(as_numpy(ref2), dtype=np.float64)
    if not (np.array_equal(a, design.ref1) and np.array_equal(b, design.ref2)):
        raise ValueError(
            'ref1/ref2 differ from the references of the fit; pass the '
            'references that were fitted'
        )
    if is_dask(stack):
        return dask_residuals(stack, fit)
    return ResidualStack(stack, fit)
