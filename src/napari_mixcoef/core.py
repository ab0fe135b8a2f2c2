"""Fit every slice of a stack as a mix of two reference images.

numpy/scipy, with numba kernels (imported on the first fit; a numpy path
without it): importing this module imports neither napari nor Qt.

How the fit works
-----------------
Every slice ``y`` (``n`` fitted pixels) is regressed on the same design
``D`` (``n × k``), so the ``k × k`` Gram matrix ``DᵀD`` is computed and
inverted once, from the references alone.  The stack is read once, in
cache-sized blocks spread over two threads (:mod:`._kernel`); each block is
cast to the working float type while it is centred on the mean reference
``M = (A + B) / 2``.

* ``stderr="ols"`` with Gaussian noise needs only sums per slice: one small
  BLAS product with the basis ``u1 = A − B``, ``u2 = M − mean(M)``,
  ``u3 = 1`` (the avg/diff basis of the pair) and one dot product give
  every statistic of every model, whose designs are fixed linear maps of
  that basis.  Sums add up over pixels, so slices may be split into bands
  and dask blocks may split the image axes (:mod:`._dask`).
* Everything else (the default robust errors, Poisson and Huber fits)
  needs each slice's residuals: blocks hold whole slices and
  :mod:`._estimators` fits them, vectorized over the block's slices; the
  noise's spatial correlation is estimated once from a few slices
  (:mod:`._spatial`).

Accuracy
--------
``SSR = y_cᵀy_c − δᵀ(Dᵀy_c)`` subtracts two sums; the difference loses
about ``log10(y_cᵀy_c / SSR)`` digits.  Centring on ``M`` keeps that ratio
near ``1 + (x − ½)²‖A − B‖² / ‖noise‖²`` (small for real data) instead of
``‖image‖² / ‖noise‖²``.  Slices where the ratio still exceeds
``1 / _GUARD`` (nearly noise-free data, R² ≈ 1) are recomputed from their
explicit residuals in a second pass over those slices only; the residual
path computes SSR from explicit residuals anyway.  Measured against
float64 ``scipy.linalg.lstsq`` (see ``tests/test_core.py``): about 1e-12
relative for float64 input and better than 2e-5 for 16-bit/float32 input,
whose working type is float32.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._chunks import (
    DEFAULT_CHUNK_BYTES,
    Block,
    as_numpy,
    plan_blocks,
    storage_chunk_length,
)
from ._dask import dask_fit_blocks, dask_residuals, dask_sums, is_dask
from ._design import MODELS, Design, check_stack, diagnose, prepare
from ._estimators import (
    BlockDesign,
    NoiseSpec,
    block_residuals,
    check_spec,
    fit_block,
    sandwich,
    split_output,
)
from ._fused_irls import covers, fit_block_fused
from ._kernel import (
    N_SUMS,
    Kernel,
    check_finite,
    one_blas_thread,
    thread_run,
)
from ._spatial import noise_correlation, pair_index, sandwich_terms, smoothed

__all__ = [
    'MODELS',
    'MixFit',
    'fit_stack',
    'iter_fit',
    'reference_diagnostics',
    'residuals',
    'warm_up',
    'write_csv',
    'write_provenance',
]

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
    noise : str
        Noise model of the fit (``"gaussian"``, ``"poisson"``, ``"huber"``).
    stderr_mode : str
        ``"auto"`` (sandwich errors, robust to unequal variances and
        spatially correlated noise) or ``"ols"`` (textbook).
    noise_kernel : ndarray or None
        The noise's estimated spatial correlation ``ρ(h)`` (``"auto"``).
    detector : dict
        ``gain``, ``camera_offset``, ``read_noise`` of the fit.
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
    noise: str = 'gaussian'
    stderr_mode: str = 'ols'
    noise_kernel: NDArray[np.float64] | None = field(default=None, repr=False)
    detector: dict = field(default_factory=dict, repr=False)
    _design: Design | None = field(default=None, repr=False)

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

    def provenance(self) -> dict:
        """Return what the fit knows of how it was made, JSON-ready.

        Returns
        -------
        dict
            Package version, model and coefficient names, noise model and
            detector settings, error mode, pixels per slice and the slice
            layout.  :meth:`to_csv` adds the caller's names (stack,
            references, mask) and writes it beside the table.
        """
        from . import __version__

        return {
            'napari_mixcoef_version': __version__,
            'model': self.model,
            'names': list(self.names),
            'noise': self.noise,
            'detector': dict(self.detector),
            'stderr_mode': self.stderr_mode,
            'n_pixels': int(self.n_pixels),
            'lead_shape': list(self.lead_shape),
        }

    def to_csv(
        self,
        path: str | os.PathLike,
        *,
        columns: dict[str, ArrayLike] | None = None,
        provenance: dict | None = None,
    ) -> None:
        """Write one row per slice to a CSV file, and a JSON file beside it.

        Parameters
        ----------
        path : str or path-like
            Output file; columns as in :meth:`table`.  Written as given
            (no suffix is added).
        columns : dict of str to (n_slices,) array_like, optional
            Extra columns appended after the fit's (e.g. ``"outlier"``).
        provenance : dict, optional
            Merged into :meth:`provenance` and written to ``<path without
            its suffix>.json``: e.g. ``"stack"``, ``"references"`` and
            ``"mask"`` names, ``"outliers"`` (flagged slice indices).
        """
        table = self.table()
        if columns:
            n = self.x.size
            for name, values in columns.items():
                values = np.asarray(values).reshape(-1)
                if values.size != n:
                    raise ValueError(
                        f'column {name!r} has {values.size} values but the '
                        f'fit has {n} slices; pass one value per slice'
                    )
                table[name] = values
        info = self.provenance()
        info.update(provenance or {})
        write_csv(path, table, provenance=info)


def write_csv(
    path: str | os.PathLike,
    columns: dict[str, ArrayLike],
    *,
    provenance: dict | None = None,
) -> None:
    """Write equal-length columns to a CSV file with a header row.

    Integers are written as such, floats with 10 significant digits (NaN
    as ``nan``), anything else as text (quoted where needed).  With
    ``provenance``, also write it as JSON to ``<path without its
    suffix>.json`` (numpy values converted).
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
    if provenance is not None:
        write_provenance(provenance_path(path), provenance)


def provenance_path(path: str | os.PathLike) -> str:
    """Return the JSON file written beside the CSV ``path`` (``.json``)."""
    root, _ = os.path.splitext(os.fspath(path))
    return root + '.json'


def write_provenance(path: str | os.PathLike, info: dict) -> None:
    """Write ``info`` as indented JSON, numpy scalars and arrays converted."""
    import datetime
    import json

    def plain(value):
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, np.ndarray):
            return plain(value.tolist())
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, float) and not math.isfinite(value):
            return None  # JSON has no NaN
        return value

    info = dict(info)
    info.setdefault(
        'written',
        datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec='seconds'
        ),
    )
    with open(path, 'w') as f:
        json.dump(plain(info), f, indent=2)
        f.write('\n')


def iter_fit(
    stack,
    ref1,
    ref2,
    *,
    model: str = 'mix',
    mask=None,
    chunk_bytes: int | None = None,
    noise: str = 'gaussian',
    gain: float = 1.0,
    camera_offset: float = 0.0,
    read_noise: float = 0.0,
    stderr: str = 'auto',
) -> Generator[tuple[int, int], None, MixFit]:
    """Fit the stack, yielding ``(done_slices, total_slices)`` as it goes.

    The generator form of :func:`fit_stack` (same arguments): a GUI worker
    yields each step to its event loop and can stop the fit between chunks
    by closing the generator.  The :class:`MixFit` is its return value
    (``fit = yield from iter_fit(...)``, or ``StopIteration.value``).
    """
    # BLAS on one thread throughout: see _kernel.one_blas_thread
    with one_blas_thread():
        spec = NoiseSpec(
            noise, stderr, float(gain), float(camera_offset), float(read_noise)
        )
        check_spec(spec)
        ref_shape = tuple(getattr(ref1, 'shape', np.shape(ref1)))
        stack = check_stack(stack, ref_shape)
        design = prepare(ref1, ref2, mask, model, np.dtype(stack.dtype))
        lead_shape = tuple(
            int(s) for s in stack.shape[: stack.ndim - len(ref_shape)]
        )
        block_bytes = chunk_bytes or DEFAULT_CHUNK_BYTES
        kernel = Kernel(stack, design, lead_shape, ref_shape, block_bytes)
        in_place = kernel.fused and isinstance(stack, np.ndarray)
        sums = _sums_suffice(spec, design, in_place)
        if chunk_bytes is None and in_place and sums:
            # nothing is copied: bigger blocks only mean fewer calls
            block_bytes = _IN_MEMORY_BLOCK_BYTES
        groups = plan_blocks(
            lead_shape,
            ref_shape,
            design.dtype.itemsize,
            block_bytes,
            align=storage_chunk_length(stack),
            bands=sums,
        )
        if sums:
            fit = yield from _fit_sums(stack, design, spec, kernel, groups)
        else:
            fit = yield from _fit_slices(stack, design, spec, kernel, groups)
        return fit


#: Blocks of an in-memory stack for the compiled one-pass sums (which read
#: the stack in place).  A compiled call costs ~10 µs alone but ~70 µs
#: while the other chunk thread is in one too, so big blocks pay: at
#: 16 MiB the pass over 5000 × 64 × 64 float64 slices took ~2-3 ms (15-20
#: %) less than at 4 MiB and 2000 × 256 × 256 float32 or uint16 fits
#: ~15 % less.  Bigger still would leave too few tasks to balance the two
#: threads on the small stack, and make the guard re-read more.
_IN_MEMORY_BLOCK_BYTES = 16 << 20


def _sums_suffice(spec: NoiseSpec, design: Design, in_place: bool) -> bool:
    """Whether per-slice sums (any blocks) give the whole fit.

    Least squares with textbook errors always; with robust errors for one
    coefficient (the mix model), whose sandwich expands into sums.  With
    robust errors for two or three, a second pass of the compiled kernel
    over the explicit residuals: only for stacks in memory, where reading
    twice is cheaper than numpy's per-slice path (a zarr or dask stack
    would be read and decompressed twice).
    """
    if spec.noise != 'gaussian':
        return False
    return spec.stderr == 'ols' or design.k == 1 or in_place


def _fit_sums(stack, design: Design, spec: NoiseSpec, kernel: Kernel, groups):
    """Least squares from one pass of additive per-slice sums.

    Robust errors for two or three coefficients add a second pass, over
    the residuals (see :func:`_residual_pass`).
    """
    lead_shape = kernel.lead_shape
    n_slices = math.prod(lead_shape)
    rho = hac_const = terms = None  # terms: robust errors, k > 1
    if spec.stderr == 'auto':
        bd = _block_design(design, kernel.ref_shape, None)
        rho = _noise_kernel(kernel, bd, spec, n_slices)
        columns = bd.design_t.astype(np.float64)
        terms = _terms(columns, kernel.ref_shape, rho).astype(design.dtype)
        if design.k == 1:  # the sandwich expands into the pass's sums
            t = terms[:, 0]
            kernel.hac(t)
            u1 = design.basis[0].astype(np.float64)
            hac_const = float(np.sum(u1 * u1 * t.astype(np.float64)))
            terms = None
    # with terms, a second pass over the residuals (below) has half the work
    share = 1 if terms is None else 2
    if is_dask(stack):
        # block-wise on the active dask scheduler, never gathered here
        raw = yield from dask_sums(stack, design, lead_shape, kernel.hac_terms)
        check_finite(raw[:, 4], 0, lead_shape)
    else:
        raw = np.zeros((n_slices, N_SUMS))
        for done, total in thread_run(
            groups,
            lambda block: kernel.accumulate(block, raw),
            lambda start, stop: check_finite(
                raw[start:stop, 4], start, lead_shape
            ),
            n_slices,
        ):
            yield done // share, total
    kernel.centred_sums(raw)
    g = raw[:, :3] @ design.transform  # Dᵀ y_c, (n, k)
    delta = g @ design.gram_inv  # gram_inv is symmetric
    n, k = design.n_pixels, design.k
    if terms is not None:
        ssr, cov = yield from _residual_pass(kernel, groups, delta, terms)
        sst = _centred_total(raw[:, 3], raw[:, 2], raw[:, 1], design)
        return _assemble(design, lead_shape, delta, cov, ssr, sst, spec, rho)
    ssr = raw[:, 3] - np.einsum('ij,ij->i', delta, g)
    omega = None
    if hac_const is not None:  # Σ r²t with r = y_c − δ·u1, expanded
        d = delta[:, 0]
        omega = raw[:, 5] - 2 * d * raw[:, 6] + d * d * hac_const
    # Guard the expansions where they cancel (R² ≈ 1): recompute those
    # slices from their explicit residuals, a second pass over them only.
    suspect = ssr < _GUARD[design.dtype] * raw[:, 4]
    if suspect.any():
        delta_basis = np.ascontiguousarray(delta @ design.transform.T)
        exact = np.zeros((len(ssr), 2))

        def guard(block: Block) -> None:
            # a group's bands add into the same rows: thread_run runs a
            # whole group in one thread
            rows = slice(block.start, block.stop)
            kernel.exact_sums(block, delta_basis[rows], exact[rows])

        todo = [g for g in groups if suspect[g[0].start : g[0].stop].any()]
        for _ in thread_run(todo, guard, lambda *_: None, len(ssr)):
            pass
        ssr[suspect] = exact[suspect, 0]
        if omega is not None:
            omega[suspect] = exact[suspect, 1]
    ssr = np.maximum(ssr, 0.0)
    if omega is None:
        cov = (ssr / (n - k))[:, None, None] * design.gram_inv
    else:
        inv = design.gram_inv[0, 0]
        cov = (np.maximum(omega, 0.0) * inv * inv * n / (n - k))[:, None, None]
    sst = _centred_total(raw[:, 3], raw[:, 2], raw[:, 1], design)
    return _assemble(design, lead_shape, delta, cov, ssr, sst, spec, rho)


def _residual_pass(kernel: Kernel, groups, delta, terms):
    """SSR and robust (HAC) covariances from one pass over the residuals.

    The second half of a fit with robust errors for two or three
    coefficients, in memory: ``Σr²`` and ``Ω = Σ r²·terms`` per slice, as
    :func:`napari_mixcoef._estimators.fit_block` forms them from the same
    residuals (``terms`` (n_ref, k(k+1)/2), working dtype).  Yields the
    second half of the progress.
    """
    design = kernel.design
    n_slices = len(delta)
    p = terms.shape[1]
    padded = np.zeros((6, terms.shape[0]), design.dtype)
    padded[:p] = terms.T
    delta_basis = np.ascontiguousarray(delta @ design.transform.T)
    sums = np.zeros((n_slices, 7))

    def work(block: Block) -> None:
        # a group's bands add into the same rows: thread_run runs a whole
        # group in one thread
        rows = slice(block.start, block.stop)
        kernel.residual_terms(block, delta_basis[rows], padded, sums[rows])

    for done, total in thread_run(groups, work, lambda *_: None, n_slices):
        yield (total + done) // 2, total
    omega = sums[:, 1 : 1 + p]
    return sums[:, 0], sandwich(omega, design.gram_inv, design.n_pixels)


def _fit_slices(stack, design: Design, spec: NoiseSpec, kernel, groups):
    """Residual-based fits: whole slices per block (see _estimators)."""
    lead_shape = kernel.lead_shape
    n_slices = math.prod(lead_shape)
    bd = _block_design(design, kernel.ref_shape, None)
    rho = None
    if spec.stderr == 'auto':
        rho = _noise_kernel(kernel, bd, spec, n_slices)
        bd = _block_design(design, kernel.ref_shape, rho)
    k = design.k
    q_col = k + k * (k + 1) // 2 + 1
    if is_dask(stack):
        out = yield from dask_fit_blocks(stack, design, bd, spec, lead_shape)
        check_finite(out[:, q_col], 0, lead_shape)
    else:
        out = np.empty((n_slices, bd.n_out))

        # the compiled fit casts and centres the stored slices as it reads
        raw = kernel.fused and covers(stack.dtype, bd, spec, raw=True)

        def work(block: Block) -> None:
            if raw:
                for r0, y in kernel.raw_pieces(block):
                    rows = slice(block.start + r0, block.start + r0 + len(y))
                    out[rows] = fit_block_fused(y, bd, spec, raw=True)
                return
            for r0, yc in kernel.centred_pieces(block):
                rows = slice(block.start + r0, block.start + r0 + len(yc))
                out[rows] = fit_block(yc, bd, spec)

        yield from thread_run(
            groups,
            work,
            lambda start, stop: check_finite(
                out[start:stop, q_col], start, lead_shape
            ),
            n_slices,
        )
    delta, cov, ssr, q, s, h2 = split_output(out, k)
    sst = _centred_total(q, s, h2, design)
    return _assemble(design, lead_shape, delta, cov, ssr, sst, spec, rho)


#: At most this many slices, and about this many pixels, estimate the
#: noise's spatial correlation.
_KERNEL_SLICES = 16
_KERNEL_PIXELS = 1 << 17


def _noise_kernel(
    kernel: Kernel, bd: BlockDesign, spec: NoiseSpec, n_slices: int
):
    """Pooled spatial correlation of a few slices' residuals.

    The residuals come from the same estimator as the fit (a robust fit's
    residuals do not carry the pattern that hot pixels pull into OLS).
    """
    shape = kernel.ref_shape
    if n_slices == 0 or not shape:
        return np.ones((1,) * len(shape))
    # enough pixels for lags to be precise, few enough to stay small
    count = min(max(_KERNEL_PIXELS // math.prod(shape), 1), _KERNEL_SLICES)
    picks = sorted(
        {(n_slices - 1) * i // max(count - 1, 1) for i in range(count)}
    )
    yc = kernel.centred_slices(picks)
    with np.errstate(invalid='ignore', over='ignore'):  # NaN: below
        # least squares as the sums fit (no need of fit_block's whole
        # statistics), else the fit's own estimator
        delta = None
        if spec.noise != 'gaussian':
            delta = fit_block(yc, bd, replace(spec, stderr='ols'))[:, : bd.k]
        resid = block_residuals(yc, bd, delta)
    finite = np.isfinite(resid).all(axis=1)
    if not finite.all():
        bad = int(picks[np.flatnonzero(~finite)[0]])
        check_finite(np.array([np.nan]), bad, kernel.lead_shape)
    resid = resid.reshape((len(picks), *shape))
    return noise_correlation(resid, kernel.design.mask, overwrite=True)


def _block_design(design: Design, ref_shape, rho) -> BlockDesign:
    """Return the design as :func:`fit_block` wants it (working dtype)."""
    dtype = design.dtype
    columns = design.transform.T @ design.basis.astype(np.float64)  # (k, n)
    k = len(columns)
    pairs = np.stack([columns[a] * columns[b] for a, b in pair_index(k)], 1)
    terms = None if rho is None else _terms(columns, ref_shape, rho)
    inside = None if design.mask is None else np.flatnonzero(design.mask)
    fitted = np.arange(columns.shape[1]) if inside is None else inside
    sample = fitted[:: max(1, len(fitted) // 2048)]
    return BlockDesign(
        design_t=columns.astype(dtype),
        pairs=pairs.astype(dtype),
        terms=None if terms is None else terms.astype(dtype),
        centre=design.centre.reshape(-1),
        gram_inv=design.gram_inv,
        inside=inside,
        n_pixels=design.n_pixels,
        basis_t=design.basis.T,
        transform=design.transform,
        sample=sample,
    )


def _terms(columns: np.ndarray, ref_shape, rho) -> np.ndarray:
    """Per-pixel sandwich terms (n, k(k+1)/2) of the design columns (k, n)."""
    k = len(columns)
    smooth = smoothed(columns.reshape((k, *ref_shape)), rho)
    return sandwich_terms(columns, smooth.reshape(k, -1))


def _centred_total(q, s, h2, design: Design) -> np.ndarray:
    """Σ (y − mean y)² per slice from sums over the centred slice.

    With y = y_c + M and u2 = M − mean(M): the centred total is
    ``Σy_c² − (Σy_c)²/n + 2(u2ᵀy_c − Σy_c·Σu2/n) + ‖u2‖²``.
    """
    n = design.n_pixels
    return (
        q
        - s * s / n
        + 2.0 * (h2 - s / n * design.basis_u2_sum)
        + design.basis_gram[1, 1]
    )


def _assemble(
    design: Design, lead_shape, delta, cov, ssr, sst, spec: NoiseSpec, rho
) -> MixFit:
    """Coefficients, errors and fit quality of every slice, as a MixFit."""
    n, k = design.n_pixels, design.k
    coef = design.coef0 + delta
    stderr = np.sqrt(np.maximum(np.diagonal(cov, axis1=-2, axis2=-1), 0))
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
            quad = np.einsum('ij,ijk,ik->i', jac, cov, jac)
        x_stderr = np.sqrt(np.maximum(quad, 0))
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
        noise=spec.noise,
        stderr_mode=spec.stderr,
        noise_kernel=rho,
        detector={
            'gain': spec.gain,
            'camera_offset': spec.camera_offset,
            'read_noise': spec.read_noise,
        },
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
    noise: str = 'gaussian',
    gain: float = 1.0,
    camera_offset: float = 0.0,
    read_noise: float = 0.0,
    stderr: str = 'auto',
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
    noise : {"gaussian", "poisson", "huber"}
        ``"gaussian"``: ordinary least squares.  ``"poisson"``: photon
        counts ``(I − camera_offset) / gain`` with variance ``μ +
        read_noise²`` (photons), fitted by iteratively reweighted least
        squares with weights from the model's μ (3 iterations).
        ``"huber"``: robust IRLS (Huber weights on residuals scaled by their
        median absolute deviation) for hot pixels and debris.
    gain, camera_offset, read_noise : float
        Detector for ``noise="poisson"``: counts per photon, counts at zero
        light, read noise in photons (rms).
    stderr : {"auto", "ols"}
        ``"auto"`` (default): sandwich standard errors, robust to noise
        whose variance varies from pixel to pixel (photon counts) and to
        noise correlated between neighbouring pixels (optics), whose
        spatial correlation is estimated from a few slices' residuals; it
        assumes the variance varies slowly over the correlation length
        and that the correlation is the same in every slice.  ``"ols"``:
        the textbook ``σ̂²(DᵀD)⁻¹``, right for independent Gaussian noise
        of equal variance only (one pass; the fastest).

    Returns
    -------
    MixFit
        ``x``, ``x_stderr``, ``r2``, ``rmse`` of shape ``lead``; ``coef``
        and ``stderr`` of shape ``lead + (k,)``.

    Warns
    -----
    CollinearityWarning
        When the references are nearly collinear (x is then poorly
        determined; see :func:`reference_diagnostics`).

    Raises
    ------
    ValueError
        Shapes that do not match, collinear references, NaN or inf in the
        fitted pixels, a mask with too few pixels, an unknown model, noise
        model or stderr mode, impossible detector parameters.
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
    steps = iter_fit(
        stack,
        ref1,
        ref2,
        model=model,
        mask=mask,
        chunk_bytes=chunk_bytes,
        noise=noise,
        gain=gain,
        camera_offset=camera_offset,
        read_noise=read_noise,
        stderr=stderr,
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
    stack = check_stack(stack, ref_shape)
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


def reference_diagnostics(
    ref1: ArrayLike, ref2: ArrayLike, mask: ArrayLike | None = None
) -> dict[str, float | bool | int]:
    """Say how well two references can be told apart, before any fit.

    In the avg/diff basis of the pair, ``(A+B)/√2`` and ``(A−B)/√2``, a
    mix moves only along the difference direction: the smaller its share
    of the pair's energy, the harder ``x`` is to measure.

    Parameters
    ----------
    ref1, ref2 : (*shape) array_like
        The references A and B.
    mask : (*shape) array_like of bool, optional
        Only these pixels count.

    Returns
    -------
    dict
        ``"diff_energy_fraction"``: ``‖A−B‖² / (2(‖A‖² + ‖B‖²))``, from 0
        (identical) to 1 (opposite);
        ``"x_stderr_per_noise"``: ``1/‖A−B‖``, the standard error of ``x``
        per unit of white-noise standard deviation (mix model);
        ``"correlation"``: Pearson correlation of A and B;
        ``"condition_number"``: of the unit-normalised Gram matrix of A, B;
        ``"collinear"``: whether a fit would refuse them;
        ``"nearly_collinear"``: whether a fit would warn;
        ``"n_pixels"``: pixels counted.
    """
    return diagnose(ref1, ref2, mask)


def warm_up() -> None:
    """Import numba and compile (or load) the kernels of the default fits.

    Takes a few seconds the first time after installing, well under a
    second later; call it in a background thread (as the widget does) so
    that the first fit does not wait for it.  Does nothing without numba.
    """
    from . import _fused

    _fused.warm_up()
