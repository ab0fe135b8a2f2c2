"""The threaded executor for in-memory, memmap and zarr stacks.

Blocks of slices (see :mod:`.blocks`) are read as stored and handed to the
backend on the two chunk threads (:mod:`.threads`); the backend writes
each block's rows of the shared result, so no block's numbers are ever
copied twice.  dask stacks have their own executor (:mod:`.dask`); the
guard's short pass reads their pieces through this one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..model.design import DesignView, make_view
from ..model.pixelwise import PixelOutputs
from ..model.sums import SliceSums, SumsLayout
from .blocks import (
    Block,
    flat_rows,
    pixel_range,
    plan_blocks,
    storage_chunk_length,
    stored_rows,
)
from .threads import thread_run

__all__ = ['Views', 'fits', 'pixels', 'residual_sums', 'sums']

#: Blocks of an in-memory stack for the compiled one-pass sums, which
#: read it in place: bigger blocks only mean fewer calls (see
#: benchmarks/README.md), and two of them still leave room in the L3 cache.
IN_MEMORY_BLOCK_BYTES = 16 << 20
#: Blocks of whole slices of an in-memory stack for fits that pass over
#: each block twice: both threads' blocks stay in the L3 cache between the
#: passes.
TWO_PASS_BLOCK_BYTES = 4 << 20
#: Blocks of slices of a few pixels, fitted one by one: the stored rows of
#: a block stay in the L2 cache while its outputs are written.
PIXEL_BLOCK_BYTES = 1 << 20


class Views:
    """The design over each band of pixels, made once per fit."""

    def __init__(self, design, hac=None, terms=None, calibrated=None) -> None:
        self.design = design
        self._hac, self._terms, self._calibrated = hac, terms, calibrated
        self._views: dict[tuple, DesignView] = {}

    def __call__(self, px: slice) -> DesignView:
        """Return the view of pixels ``px`` of the flattened image."""
        key = (px.start, px.stop)
        view = self._views.get(key)
        if view is None:
            whole = px == slice(None)
            view = self._views[key] = make_view(
                self.design,
                px,
                hac=self._hac,
                terms=self._terms,
                calibrated=self._calibrated if whole else None,
            )
        return view


def _walk(
    stack,
    lead_shape,
    design,
    chunk_bytes,
    *,
    bands: bool,
    in_place_bytes: int,
    per_block: Callable[[Block], Callable[[int, np.ndarray], None]],
    done: Callable[[int, int], None],
):
    """Hand every block's stored rows to the backend on the chunk threads.

    ``per_block(block)`` returns the call that takes the block's rows
    ``(start, y)`` as stored (``start`` the first slice's flat index);
    ``done(a, b)`` runs on each finished run of slices in the caller's
    thread.  A generator of ``(done, total)``; stacks read in place get
    bigger blocks (``in_place_bytes``) unless ``chunk_bytes`` is given.
    """
    from .blocks import DEFAULT_CHUNK_BYTES

    n_slices = math.prod(lead_shape)
    if chunk_bytes is None:
        in_place = flat_rows(stack, n_slices) is not None
        chunk_bytes = in_place_bytes if in_place else None
    groups = plan_blocks(
        lead_shape,
        design.shape,
        design.dtype.itemsize,
        chunk_bytes or DEFAULT_CHUNK_BYTES,
        align=storage_chunk_length(stack),
        bands=bands,
    )

    def work(block: Block) -> None:
        take = per_block(block)
        for r0, y in stored_rows(stack, lead_shape, block, 0):
            take(block.start + r0, y)

    yield from thread_run(groups, work, done, n_slices)


def sums(
    stack,
    lead_shape: tuple[int, ...],
    views: Views,
    backend,
    layout: SumsLayout,
    chunk_bytes: int | None,
    check: Callable[[SliceSums, int, int], None],
):
    """Every slice's sums, block by block on the chunk threads.

    A generator: yields ``(done, total)`` slices as runs of blocks finish
    (``check(sums, start, stop)`` runs on each finished run in the
    caller's thread and may raise), returns the :class:`SliceSums`.
    """
    design = views.design
    out = layout.empty(math.prod(lead_shape))

    def per_block(block: Block):
        view = views(pixel_range(block, design.shape))
        return lambda start, y: backend.block_sums(
            y, view, out.rows(start, start + len(y))
        )

    yield from _walk(
        stack,
        lead_shape,
        design,
        chunk_bytes,
        bands=True,
        in_place_bytes=IN_MEMORY_BLOCK_BYTES,
        per_block=per_block,
        done=lambda a, b: check(out, a, b),
    )
    return out


def fits(
    stack,
    lead_shape: tuple[int, ...],
    views: Views,
    backend,
    spec,
    constraint,
    layout,
    chunk_bytes: int | None,
    check: Callable[[np.ndarray, int, int], None],
):
    """Every slice fitted by the backend on whole slices, block by block.

    A generator like :func:`sums`; returns the ``(n, layout.width)`` rows
    of :class:`~napari_mixcoef.model.sums.FitLayout`.
    """
    out = np.empty((math.prod(lead_shape), layout.width))
    view = views(slice(None))

    def take(start: int, y: np.ndarray) -> None:
        fit = backend.fit_block(y, view, spec, constraint)
        out[start : start + len(y)] = layout.pack(fit)

    yield from _walk(
        stack,
        lead_shape,
        views.design,
        chunk_bytes,
        bands=False,
        in_place_bytes=TWO_PASS_BLOCK_BYTES,
        per_block=lambda block: take,
        done=lambda a, b: check(out, a, b),
    )
    return out


def pixels(
    stack,
    lead_shape: tuple[int, ...],
    design,
    maps,
    backend,
    chunk_bytes: int | None,
    check: Callable[[object, int, int], None],
):
    """Every slice of a few pixels fitted by the backend, block by block.

    A generator like :func:`sums`; returns the
    :class:`~napari_mixcoef.model.pixelwise.PixelOutputs`, every row
    written by the backend's ``fit_pixels``.
    """
    out = PixelOutputs.empty(math.prod(lead_shape), maps)

    def take(start: int, y: np.ndarray) -> None:
        backend.fit_pixels(y, maps, out.rows(start, start + len(y)))

    yield from _walk(
        stack,
        lead_shape,
        design,
        chunk_bytes,
        bands=False,
        in_place_bytes=PIXEL_BLOCK_BYTES,
        per_block=lambda block: take,
        done=lambda a, b: check(out, a, b),
    )
    return out


def residual_sums(
    stack,
    lead_shape: tuple[int, ...],
    views: Views,
    backend,
    rows: np.ndarray,
    z: np.ndarray,
    terms,
    chunk_bytes: int | None,
) -> np.ndarray:
    """``Σr²`` (and ``Σr²·terms``) of some slices' explicit residuals.

    Parameters
    ----------
    rows : (n_slices,) ndarray of bool
        The slices to pass over (the guard's suspects).
    z : (n_slices, k) ndarray
        Every slice's fit.
    terms : (P, n_ref) ndarray or None
        Terms to weigh the squares with.

    Returns
    -------
    (n_slices, 1 + P) ndarray
        Zero outside ``rows``.
    """
    design = views.design
    n_slices = math.prod(lead_shape)
    width = 1 + (0 if terms is None else terms.shape[0])
    out = np.zeros((n_slices, width))
    groups = plan_blocks(
        lead_shape,
        design.shape,
        design.dtype.itemsize,
        chunk_bytes or (1 << 20),
        align=storage_chunk_length(stack),
    )
    todo = [g for g in groups if rows[g[0].start : g[0].stop].any()]

    def work(block: Block) -> None:
        px = pixel_range(block, design.shape)
        view = views(px)
        band_terms = None
        if terms is not None:
            band_terms = np.ascontiguousarray(terms[:, px])
        for r0, y in stored_rows(stack, lead_shape, block, 0):
            a = block.start + r0
            b = a + len(y)
            backend.residual_sums(y, view, z[a:b], band_terms, out[a:b])

    for _ in thread_run(todo, work, lambda *_: None, n_slices):
        pass
    return out
