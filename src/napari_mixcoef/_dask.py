"""Block-wise sufficient statistics for dask arrays.

A dask stack is never gathered: every block (any chunking, including
chunks split along the image axes) reduces to per-slice sums for its
pixels, the partial sums of a slice are added across its image blocks, and
the result is computed with the active scheduler -- a
``dask.distributed`` Client's cluster when one exists.  The references
travel as dask arrays chunked like the stack's image axes, so each task
receives only the reference block it needs.
"""

from __future__ import annotations

import math
from collections.abc import Generator

import numpy as np

from ._kernel import N_SUMS


def is_dask(stack) -> bool:
    """Tell whether ``stack`` is a dask array (without importing dask)."""
    return type(stack).__module__.split('.')[0] == 'dask' and hasattr(
        stack, 'chunks'
    )


def _block_sums(block, centre, u1, u2, weight, *hac, n_lead: int, work: str):
    """Per-slice sums of one stack block, shaped for the reduction.

    Returns ``(*lead_block, 1, …, 1, 7)``: the columns of
    :data:`napari_mixcoef._kernel.N_SUMS` over this block's pixels only
    (``Σy_c²`` twice: the second is what the SSR guard compares with; the
    HAC sums only when ``hac`` holds the ``t`` and ``u1·t`` blocks);
    pixels with zero weight (outside the mask) are left out.
    """
    dtype = np.dtype(work)
    lead = block.shape[:n_lead]
    m = math.prod(lead)
    yc = np.zeros((m, *block.shape[n_lead:]), dtype)
    np.subtract(
        block.reshape(yc.shape),
        centre,
        out=yc,
        where=weight != 0,
        casting='unsafe',
    )
    yc = yc.reshape(m, -1)
    basis = np.stack([u1.ravel(), u2.ravel(), weight.ravel()], axis=1)
    out = np.zeros((m, N_SUMS))
    out[:, :3] = np.dot(yc, basis.astype(dtype))
    out[:, 3] = np.vecdot(yc, yc)
    out[:, 4] = out[:, 3]
    if hac:
        t, tu1 = (np.asarray(a, dtype).ravel() for a in hac)
        out[:, 5] = np.dot(np.square(yc), t)
        out[:, 6] = np.dot(yc, tu1)
    n_ref = block.ndim - n_lead
    return out.reshape(lead + (1,) * n_ref + (N_SUMS,))


def dask_sums(
    stack,
    design,
    lead_shape: tuple[int, ...],
    hac_terms=None,
    n_batches: int = 8,
) -> Generator[tuple[int, int], None, np.ndarray]:
    """Compute the ``(n_slices, 5)`` sums of a dask stack, batch by batch.

    Yields ``(done_slices, total_slices)`` after each batch of slices (a
    slab of the first axis) so that progress and cancellation work as for
    in-memory stacks; returns the sums.
    """
    import dask
    import dask.array as da

    n_lead = len(lead_shape)
    ref_chunks = stack.chunks[n_lead:]
    dtype = design.dtype
    weight = np.ones(design.centre.shape, dtype)
    if design.mask is not None:
        weight = design.mask.astype(dtype)
    shape = design.centre.shape
    refs = [
        da.from_array(a, chunks=ref_chunks, name=False)
        for a in (
            design.centre,
            design.basis[0].reshape(shape),
            design.basis[1].reshape(shape),
            weight,
            *(
                (term.reshape(shape) for term in hac_terms)
                if hac_terms is not None
                else ()
            ),
        )
    ]
    n_slices = math.prod(lead_shape)
    sums = np.empty((n_slices, N_SUMS))
    if n_slices == 0:
        return sums
    yield 0, n_slices
    for start, stop, rows in _batches(stack, lead_shape, n_batches):
        part = stack[start:stop] if n_lead else stack
        out_chunks = (
            part.chunks[:n_lead]
            + tuple((1,) * len(c) for c in ref_chunks)
            + ((N_SUMS,),)
        )
        blocks = da.map_blocks(
            _block_sums,
            part,
            *refs,
            n_lead=n_lead,
            work=dtype.str,
            dtype=np.float64,
            chunks=out_chunks,
            new_axis=part.ndim,
        )
        axes = tuple(range(n_lead, n_lead + len(ref_chunks)))
        (result,) = dask.compute(blocks.sum(axis=axes))
        sums[rows] = np.asarray(result).reshape(-1, N_SUMS)
        yield rows.stop, n_slices
    return sums


def _residual_block(y, coef, ref1, ref2, *, model: str, work: str):
    from .core import model_images

    dtype = np.dtype(work)
    res = np.subtract(
        y, model_images(model, coef, ref1, ref2, dtype), dtype=dtype
    )
    return res.astype(np.float32, copy=False)


def dask_residuals(stack, fit):
    """Return the lazy residual of a dask stack as a dask array (float32).

    Chunked like the stack; each block is computed from its stack block,
    the matching coefficients and reference blocks when it is read.
    """
    import dask.array as da

    design = fit._design
    n_lead = len(fit.lead_shape)
    lead = ''.join(chr(ord('a') + i) for i in range(n_lead))
    ref = ''.join(chr(ord('n') + i) for i in range(stack.ndim - n_lead))
    coef = da.from_array(
        fit.coef,
        chunks=stack.chunks[:n_lead] + (fit.coef.shape[-1],),
        name=False,
    )
    refs = [
        da.from_array(
            r.astype(design.dtype), chunks=stack.chunks[n_lead:], name=False
        )
        for r in (design.ref1, design.ref2)
    ]
    return da.blockwise(
        _residual_block,
        lead + ref,
        stack,
        lead + ref,
        coef,
        lead + 'z',
        refs[0],
        ref,
        refs[1],
        ref,
        model=fit.model,
        work=design.dtype.str,
        dtype=np.float32,
        concatenate=True,
    )


def _block_fit(block, bd, spec, *, n_lead: int, work: str):
    """Fit the whole slices of one block: ``(*lead_block, n_out)``."""
    from ._estimators import fit_block

    dtype = np.dtype(work)
    lead = block.shape[:n_lead]
    m = math.prod(lead)
    yc = np.zeros((m, math.prod(block.shape[n_lead:])), dtype)
    where = True if bd.inside is None else _inside_mask(bd, yc.shape[1])
    np.subtract(
        block.reshape(m, -1), bd.centre, out=yc, where=where, casting='unsafe'
    )
    return fit_block(yc, bd, spec).reshape(lead + (bd.n_out,))


def _inside_mask(bd, n: int) -> np.ndarray:
    inside = np.zeros(n, bool)
    inside[bd.inside] = True
    return inside


def dask_fit_blocks(
    stack, design, bd, spec, lead_shape: tuple[int, ...], n_batches: int = 8
) -> Generator[tuple[int, int], None, np.ndarray]:
    """Per-slice fits of a dask stack that need whole slices (IRLS, HAC).

    The image axes are rechunked whole (each task then holds complete
    slices); the shared design travels once, as one delayed object.
    Yields progress per batch of the first axis; returns the rows of
    :func:`napari_mixcoef._estimators.fit_block`.
    """
    import dask
    import dask.array as da

    n_lead = len(lead_shape)
    whole = {axis: -1 for axis in range(n_lead, stack.ndim)}
    stack = stack.rechunk(whole)
    shared = dask.delayed(bd, pure=True), dask.delayed(spec, pure=True)
    n_slices = math.prod(lead_shape)
    out = np.empty((n_slices, bd.n_out))
    if n_slices == 0:
        return out
    yield 0, n_slices
    for start, stop, rows in _batches(stack, lead_shape, n_batches):
        part = stack[start:stop] if n_lead else stack
        fits = da.map_blocks(
            _block_fit,
            part,
            *shared,
            n_lead=n_lead,
            work=design.dtype.str,
            dtype=np.float64,
            chunks=part.chunks[:n_lead] + ((bd.n_out,),),
            drop_axis=list(range(n_lead, part.ndim)),
            new_axis=n_lead,
        )
        (result,) = dask.compute(fits)
        out[rows] = np.asarray(result).reshape(-1, bd.n_out)
        yield rows.stop, n_slices
    return out


def _batches(stack, lead_shape, n_batches):
    """``(start, stop, rows)``: slabs of whole first-axis chunks."""
    n_lead = len(lead_shape)
    n_slices = math.prod(lead_shape)
    if not n_lead:
        yield 0, 1, slice(0, 1)
        return
    bounds = np.cumsum((0,) + stack.chunks[0])
    step = max(1, math.ceil((len(bounds) - 1) / n_batches))
    edges = list(bounds[::step])
    if edges[-1] != bounds[-1]:
        edges.append(bounds[-1])
    per_first = n_slices // max(1, lead_shape[0])
    for start, stop in zip(edges[:-1], edges[1:]):
        rows = slice(int(start) * per_first, int(stop) * per_first)
        yield int(start), int(stop), rows
