"""The lazy residual stack ``I − model`` of a fit (numpy and dask)."""

from __future__ import annotations

import math

import numpy as np

from .engine.blocks import as_numpy, is_dask
from .model.shifts import shifted_images

__all__ = ['ResidualStack', 'lazy_residuals']


class ResidualStack:
    """Lazy residual ``I − model`` of a fitted stack, float32.

    Behaves like a read-only array of the stack's shape: indexing computes
    only the slices it selects, so napari can display it slice by slice.
    ``np.asarray(res)`` computes everything.  The model is evaluated on
    every pixel, also outside the fit's mask.
    """

    def __init__(self, stack, fit) -> None:
        self._stack = stack
        self._fit = fit
        design = fit._design
        self._work = design.dtype
        self._images = design.refs.images.astype(design.dtype)
        self._model = design.model
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
        model = self._model.image(coef, self._images, self._work)
        shift = self._fit.shift
        # registered: the model moved onto the slice, as the fit saw it
        model = shifted_images(
            model, None if shift is None else shift[lead_key]
        )
        res = np.subtract(data, model, dtype=self._work)
        res = res.astype(np.float32, copy=False)
        kept = res.ndim - (self._images.ndim - 1)
        return res[(slice(None),) * kept + ref_key]

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out if dtype is None else out.astype(dtype)


def _residual_block(y, coef, images, *shift, model, work: str):
    dtype = np.dtype(work)
    image = model.image(coef, images, dtype)
    image = shifted_images(image, shift[0] if shift else None)
    res = np.subtract(y, image, dtype=dtype)
    return res.astype(np.float32, copy=False)


def _dask_residuals(stack, fit):
    """Return the lazy residual of a dask stack as a dask array (float32).

    Chunked like the stack; each block is computed from its stack block,
    the matching coefficients and reference blocks when it is read.
    """
    import dask.array as da

    design = fit._design
    n_lead = len(fit.lead_shape)
    n_ref = stack.ndim - n_lead
    if fit.shift is not None:  # moving the model needs whole images
        stack = stack.rechunk({n_lead + i: -1 for i in range(n_ref)})
    lead = ''.join(chr(ord('a') + i) for i in range(n_lead))
    ref = ''.join(chr(ord('n') + i) for i in range(n_ref))
    coef = da.from_array(
        fit.coef,
        chunks=stack.chunks[:n_lead] + (fit.coef.shape[-1],),
        name=False,
    )
    images = da.from_array(
        design.refs.images.astype(design.dtype),
        chunks=((design.refs.k,), *stack.chunks[n_lead:]),
        name=False,
    )
    extra = ()
    if fit.shift is not None:
        shift = da.from_array(
            fit.shift,
            chunks=stack.chunks[:n_lead] + (fit.shift.shape[-1],),
            name=False,
        )
        extra = (shift, lead + 'w')
    return da.blockwise(
        _residual_block,
        lead + ref,
        stack,
        lead + ref,
        coef,
        lead + 'z',
        images,
        'y' + ref,
        *extra,
        model=design.model,
        work=design.dtype.str,
        dtype=np.float32,
        concatenate=True,
    )


def lazy_residuals(stack, fit):
    """Return the residual of ``fit`` over ``stack`` (checked), lazily."""
    if is_dask(stack):
        return _dask_residuals(stack, fit)
    return ResidualStack(stack, fit)
