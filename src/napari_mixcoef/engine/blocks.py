"""Reading a stack block by block, whatever kind of array holds it.

The engine never needs the whole stack: it walks over *row groups* (runs of
consecutive slices in C order of the leading dimensions) and, when one slice
is larger than the chunk budget, over bands of rows within each slice.  This
module decides the blocks and reads each one as a small numpy array, using
only basic indexing so that numpy arrays, memmaps, zarr arrays and dask
arrays are all read the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..model.references import as_numpy

__all__ = [
    'DEFAULT_CHUNK_BYTES',
    'Block',
    'as_numpy',
    'flat_rows',
    'is_dask',
    'pixel_range',
    'plan_blocks',
    'read_runs',
    'read_slices',
    'storage_chunk_length',
    'stored_rows',
]

#: Default budget for one block of working floats (per thread).  A few
#: blocks must stay in the 2 MiB L2 cache of a core for the passes after the
#: first read to be cheap.
DEFAULT_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Block:
    """One block of the stack: slices ``start:stop`` and rows ``band``.

    ``start`` and ``stop`` index the flattened leading dimensions; ``band``
    is a slice of the first reference axis (all of it unless one slice does
    not fit the chunk budget).
    """

    start: int
    stop: int
    band: slice


def storage_chunk_length(stack) -> int:
    """Return the stack's storage chunk length along axis 0 (1 if none).

    zarr arrays give ``chunks`` as a tuple of ints, dask arrays as a tuple of
    tuples; reading across a storage chunk boundary decompresses the chunk
    twice, so row groups are aligned to it.
    """
    chunks = getattr(stack, 'chunks', None)
    if not chunks:
        return 1
    first = chunks[0]
    if isinstance(first, tuple):  # dask: sizes of every chunk on axis 0
        return int(first[0]) if first else 1
    return int(first)


def plan_blocks(
    lead_shape: tuple[int, ...],
    ref_shape: tuple[int, ...],
    itemsize: int,
    chunk_bytes: int,
    align: int = 1,
    bands: bool = True,
) -> list[list[Block]]:
    """Split a stack into row groups, each a list of bands.

    Parameters
    ----------
    lead_shape, ref_shape : tuple of int
        Leading (slice index) and trailing (image) shape of the stack.
    itemsize : int
        Bytes of one working float (4 or 8).
    chunk_bytes : int
        Budget of working floats per block.
    align : int
        Storage chunk length along axis 0; row groups of a 1-D lead are
        whole multiples of it, so each storage chunk is read once.
    bands : bool
        Whether a slice larger than the budget may be split into bands of
        rows (estimators that need whole slices say no).

    Returns
    -------
    list of list of Block
        One inner list per row group; its bands together cover whole slices,
        so a row group's statistics are complete once its blocks are.
    """
    n_slices = math.prod(lead_shape)
    slice_bytes = max(1, math.prod(ref_shape) * itemsize)
    rows = max(1, chunk_bytes // slice_bytes)
    if len(lead_shape) == 1 and align > 1:
        rows = align * max(1, rows // align)
    if bands and rows == 1 and slice_bytes > chunk_bytes and ref_shape:
        n_bands = min(ref_shape[0], math.ceil(slice_bytes / chunk_bytes))
        edges = np.linspace(0, ref_shape[0], n_bands + 1).astype(int)
        bands = [slice(int(a), int(b)) for a, b in zip(edges, edges[1:])]
    else:
        bands = [slice(None)]
    return [
        [Block(start, min(start + rows, n_slices), band) for band in bands]
        for start in range(0, n_slices, rows)
    ]


def read_runs(
    stack, lead_shape: tuple[int, ...], block: Block
) -> Iterator[tuple[int, int, object]]:
    """Yield the pieces of one block as ``(row0, row1, array_like)``.

    A block's slices are consecutive in the flattened leading dimensions;
    with more than one leading dimension they may wrap from one index of an
    outer axis to the next, so the block is read as runs along the last
    leading axis (basic indexing only, which every array kind supports).
    ``row0:row1`` are the rows of the block the piece fills.
    """
    ref_index = (block.band,)
    if not lead_shape:  # a single image: the whole stack is one slice
        yield 0, 1, stack[block.band][np.newaxis]
        return
    if len(lead_shape) == 1:
        yield (
            0,
            block.stop - block.start,
            stack[block.start : block.stop, block.band],
        )
        return
    last = lead_shape[-1]
    i = block.start
    while i < block.stop:
        outer, j = divmod(i, last) if last else (0, 0)
        n = min(block.stop - i, last - j)
        outer_index = np.unravel_index(outer, lead_shape[:-1])
        index = tuple(int(o) for o in outer_index) + (slice(j, j + n),)
        yield i - block.start, i - block.start + n, stack[index + ref_index]
        i += n


def stored_rows(
    stack, lead_shape: tuple[int, ...], block: Block, row_len: int
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(row0, y)``: a block's slices as stored, C-ordered 2-D.

    ``y`` is ``(rows, n_band_pixels)`` in the stack's dtype; in-memory
    stacks give views (a strided one is copied per piece), zarr and dask
    pieces are read (computed) here.
    """
    for r0, r1, piece in read_runs(stack, lead_shape, block):
        y = as_numpy(piece).reshape(r1 - r0, -1)
        yield r0, np.ascontiguousarray(y)


def read_slices(stack, lead_shape: tuple[int, ...], indices) -> np.ndarray:
    """Whole slices (flat indices) as stored, ``(len(indices), n_ref)``.

    One gather for an in-memory stack, a read per slice otherwise.
    """
    n_slices = math.prod(lead_shape)
    rows = flat_rows(stack, n_slices)
    if rows is not None:
        return rows[np.asarray(indices, dtype=np.intp)]
    if not lead_shape:
        return as_numpy(stack).reshape(1, -1)
    return np.stack(
        [
            as_numpy(stack[np.unravel_index(i, lead_shape)]).reshape(-1)
            for i in indices
        ]
    )


def flat_rows(stack, n_slices: int) -> np.ndarray | None:
    """Return a numpy ``stack`` as an ``(n_slices, n_ref)`` view, or None."""
    if not isinstance(stack, np.ndarray):
        return None
    try:
        return stack.reshape((n_slices, -1), copy=False)
    except (ValueError, TypeError):  # a copy would be needed
        return None


def is_dask(stack) -> bool:
    """Tell whether ``stack`` is a dask array (without importing dask)."""
    return type(stack).__module__.split('.')[0] == 'dask' and hasattr(
        stack, 'chunks'
    )


def pixel_range(block: Block, ref_shape: tuple[int, ...]) -> slice:
    """Return the block's band as a range of the flattened image."""
    if not ref_shape:
        return slice(None)
    start, stop, _ = block.band.indices(ref_shape[0])
    row_len = math.prod(ref_shape[1:])
    return slice(start * row_len, stop * row_len)
