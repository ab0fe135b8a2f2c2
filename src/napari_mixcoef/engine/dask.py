"""The dask executor: the backend's block functions mapped over blocks.

A dask stack is never gathered.  For additive sums every block (any
chunking, including chunks split along the image axes) is reduced by the
backend's ``block_sums`` over its own pixels, the partial sums of a slice
are added across its image blocks, and the result is computed with the
active scheduler -- a ``dask.distributed`` Client's cluster when one
exists.  The design travels as dask arrays chunked like the stack's image
axes, so each task receives only the pieces it needs.  Fits that need
whole slices rechunk the image axes whole and map the backend's
``fit_block``; the shared design then travels once, as a delayed object.
Tasks look the backend up by name where they run.
"""

from __future__ import annotations

import math
from collections.abc import Generator

import numpy as np

from ..model.design import DesignView
from ..model.sums import SliceSums, SumsLayout

__all__ = ['fits', 'sums']


def _backend(name: str):
    from ..backends import get_backend

    return get_backend(name)


def _block_sums(
    block,
    centre,
    fitted,
    *vectors,
    n_lead,
    k,
    mean,
    n_pixels,
    layout,
    backend,
):
    """Per-slice sums of one stack block, shaped for the reduction.

    ``vectors`` are the blocks of ``u2``, of the basis vectors, then (HAC)
    of the term.  Returns ``(*lead_block, 1, …, 1, width)``: the sums of
    this block's pixels only (those outside the mask have ``fitted``
    False).
    """
    lead = block.shape[:n_lead]
    m = math.prod(lead)
    keep = np.asarray(fitted, bool).reshape(-1)
    flat = [np.asarray(v).reshape(-1) for v in vectors]
    view = DesignView(
        centre=np.ascontiguousarray(centre).reshape(-1),
        mean=mean,
        spread=np.ascontiguousarray(flat[0]),
        basis=np.ascontiguousarray(np.stack(flat[1 : 1 + k])),
        fitted=None if keep.all() else keep,
        n_pixels=n_pixels,
        hac=np.ascontiguousarray(flat[1 + k]) if layout.hac else None,
    )
    y = np.ascontiguousarray(np.asarray(block).reshape(m, -1))
    out = layout.empty(m)
    _backend(backend).block_sums(y, view, out)
    n_ref = block.ndim - n_lead
    return out.raw.reshape(lead + (1,) * n_ref + (layout.width,))


def sums(
    stack,
    lead_shape: tuple[int, ...],
    views,
    backend,
    layout: SumsLayout,
    check,
    n_batches: int = 8,
) -> Generator[tuple[int, int], None, SliceSums]:
    """Every slice's sums of a dask stack, batch by batch of slices.

    Yields ``(done_slices, total_slices)`` after each batch (a slab of the
    first axis) so that progress and cancellation work as for in-memory
    stacks; returns the sums.
    """
    import dask
    import dask.array as da

    design = views.design
    n_lead = len(lead_shape)
    ref_chunks = stack.chunks[n_lead:]
    shape = design.shape
    fitted = np.ones(shape, bool) if design.mask is None else design.mask
    images = [design.centre, fitted, design.spread, *design.basis]
    if layout.hac:
        images.append(views(slice(None)).hac)
    pieces = [
        da.from_array(
            np.asarray(a).reshape(shape), chunks=ref_chunks, name=False
        )
        for a in images
    ]
    n_slices = math.prod(lead_shape)
    out = layout.empty(n_slices)
    if n_slices == 0:
        return out
    yield 0, n_slices
    for start, stop, rows in _batches(stack, lead_shape, n_batches):
        part = stack[start:stop] if n_lead else stack
        out_chunks = (
            part.chunks[:n_lead]
            + tuple((1,) * len(c) for c in ref_chunks)
            + ((layout.width,),)
        )
        blocks = da.map_blocks(
            _block_sums,
            part,
            *pieces,
            n_lead=n_lead,
            k=design.k,
            mean=design.dtype.type(design.mean),
            n_pixels=design.n_pixels,
            layout=layout,
            backend=backend.name,
            dtype=np.float64,
            chunks=out_chunks,
            new_axis=part.ndim,
        )
        axes = tuple(range(n_lead, n_lead + len(ref_chunks)))
        (result,) = dask.compute(blocks.sum(axis=axes))
        out.raw[rows] = np.asarray(result).reshape(-1, layout.width)
        check(out, rows.start, rows.stop)
        yield rows.stop, n_slices
    return out


def _block_fit(block, view, spec, constraint, *, n_lead, layout, backend):
    """Fit the whole slices of one block: ``(*lead_block, width)``."""
    lead = block.shape[:n_lead]
    m = math.prod(lead)
    y = np.ascontiguousarray(np.asarray(block).reshape(m, -1))
    fit = _backend(backend).fit_block(y, view, spec, constraint)
    return layout.pack(fit).reshape(lead + (layout.width,))


def fits(
    stack,
    lead_shape: tuple[int, ...],
    views,
    backend,
    spec,
    constraint,
    layout,
    check,
    n_batches: int = 8,
) -> Generator[tuple[int, int], None, np.ndarray]:
    """Per-slice fits of a dask stack that need whole slices.

    Yields progress per batch of the first axis; returns the rows of
    :class:`~napari_mixcoef.model.sums.FitLayout`.
    """
    import dask
    import dask.array as da

    n_lead = len(lead_shape)
    whole = {axis: -1 for axis in range(n_lead, stack.ndim)}
    stack = stack.rechunk(whole)
    shared = [
        dask.delayed(v, pure=True)
        for v in (views(slice(None)), spec, constraint)
    ]
    n_slices = math.prod(lead_shape)
    out = np.empty((n_slices, layout.width))
    if n_slices == 0:
        return out
    yield 0, n_slices
    for start, stop, rows in _batches(stack, lead_shape, n_batches):
        part = stack[start:stop] if n_lead else stack
        fitted = da.map_blocks(
            _block_fit,
            part,
            *shared,
            n_lead=n_lead,
            layout=layout,
            backend=backend.name,
            dtype=np.float64,
            chunks=part.chunks[:n_lead] + ((layout.width,),),
            drop_axis=list(range(n_lead, part.ndim)),
            new_axis=n_lead,
        )
        (result,) = dask.compute(fitted)
        out[rows] = np.asarray(result).reshape(-1, layout.width)
        check(out, rows.start, rows.stop)
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
