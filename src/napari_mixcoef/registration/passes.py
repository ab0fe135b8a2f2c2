"""The registration's options, its passes over the stack, and their fit.

The coarse estimate (:mod:`.coarse`), then :data:`PASSES` joint passes:
every slice read at its integer offset by the backend's
``window_products`` against its bin's shifted references, and the
Gauss–Newton fit of its coefficients and shift on the sums.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ..engine.blocks import plan_blocks, stored_rows
from ..engine.threads import pool, thread_run
from ..model import shifts as sm
from ..model.references import References
from ..model.windows import base_of, run_positions, window_runs
from .coarse import Coarse

__all__ = [
    'REGISTRATIONS',
    'Registration',
    'check_register',
    'register_stack',
]

#: What ``register`` may be (besides None).
REGISTRATIONS = ('translation',)
#: Joint passes over the stack after the coarse estimate: each reads
#: every so many rows of the box (first axis) with bins so many times
#: wider than the designs' (a subset of them), and iterates until its
#: steps are below so many pixels.  The first only has to bring the
#: coarse estimate (~0.4 px) to a few hundredths of a pixel; the last,
#: on every pixel and bin, sets the accuracy.
PASSES = ((4, 2, 1e-4), (1, 1, 1e-9))
#: A subsampled pass keeps at least this many rows of the box (a small
#: box is read whole: its pass is cheap and its few rows imprecise).
MIN_ROWS = 16
#: A slice whose pattern stands out of its noise by fewer standard errors
#: than this has no structure to register on.
STRUCTURE_Z = 8.0
#: A slice whose last joint fit moved further than this (pixels) from
#: its bin's centre has not settled (it left the box, or diverged).
UNSETTLED = 0.25
#: Working buffer of one block of a registration pass.
BLOCK_BYTES = 16 << 20


def check_register(register, max_shift, shape) -> float | None:
    """Check the registration options; return the shift bound (pixels).

    Raises
    ------
    ValueError
        An unknown ``register`` or a ``max_shift`` that is not positive.
    """
    if register is None:
        return None
    if register not in REGISTRATIONS:
        raise ValueError(
            f'unknown register {register!r}; choose None or "translation"'
        )
    if not shape:
        raise ValueError('registration needs references of at least 1-D')
    if max_shift is None:
        return max(1.0, min(shape) / 4)
    try:
        limit = float(max_shift)
    except (TypeError, ValueError):
        limit = math.nan
    if not (math.isfinite(limit) and limit > 0):
        raise ValueError(
            f'max_shift must be a positive number of pixels, not {max_shift!r}'
        )
    return limit


@dataclass
class Registration:
    """Per-slice translations and the joint fit they come from.

    ``shift`` (n, d) is NaN where ``failed``; ``offset``, ``key`` and
    ``delta`` place each slice's last joint fit (``theta``, ``ssr``,
    ``hessian``) in its bin; ``box`` is the fitted part of the grid.
    """

    shift: NDArray[np.float64]
    failed: NDArray[np.bool_]
    offset: NDArray[np.int64]
    key: NDArray[np.int64]
    delta: NDArray[np.float64]
    theta: NDArray[np.float64]
    ssr: NDArray[np.float64]
    hessian: NDArray[np.float64]
    box: tuple[slice, ...]
    designs: sm.ShiftedDesigns
    model: object
    dtype: np.dtype

    def box_references(self, refs: References) -> References:
        """Return the references and mask over the box."""
        images = np.ascontiguousarray(refs.images[(slice(None), *self.box)])
        mask = None if refs.mask is None else refs.mask[self.box]
        return References(images, mask, int(len(self.designs.fitted)))


def _on_threads(groups, work, n_slices):
    """Run ``work`` on every block on the chunk threads; yield ``(0, n)``.

    Progress stays at 0: the fit proper reports it.
    """
    for _ in thread_run(groups, work, lambda *_: None, n_slices):
        yield 0, n_slices


def _blocks(lead_shape, shape):
    return plan_blocks(lead_shape, shape, 8, BLOCK_BYTES, bands=False)


def _read(stack, lead_shape, shape, block):
    """Yield ``(first slice, y)``: a block as ``(m, *shape)`` arrays."""
    for r0, y in stored_rows(stack, lead_shape, block, 0):
        yield block.start + r0, y.reshape((len(y), *shape))


def _keys(key: NDArray) -> tuple[list, NDArray[np.int64]]:
    """Return the distinct bins of ``key`` (m, d) and each row's one."""
    values, which = np.unique(key, axis=0, return_inverse=True)
    keys = [tuple(int(v) for v in value) for value in values]
    return keys, which.reshape(-1).astype(np.int64)


def register_stack(
    stack, lead_shape, refs: References, model, limit: float, dtype, backend
) -> Generator[tuple[int, int], None, Registration]:
    """Estimate every slice's shift; yield ``(0, n)`` per block.

    Parameters
    ----------
    stack : array_like
        Checked: ``lead_shape + refs.shape``; read block by block.
    lead_shape : tuple of int
        Its leading shape.
    refs : References
        The checked references and mask.
    model : Model
        The model whose coefficients are fitted with the shift.
    limit : float
        The largest shift (pixels) along any axis.
    dtype : dtype
        Working float type of the products (the engine's).
    backend : Backend
        Whose ``window_products`` reads the stack in the joint passes.

    Returns
    -------
    Registration
    """
    n_slices = math.prod(lead_shape)
    shape = refs.shape
    ndim = len(shape)
    coarse = np.zeros((n_slices, ndim))
    estimate = Coarse(refs, limit, backend)
    blocks = _blocks(lead_shape, shape)

    def work(block) -> None:
        for start, y in _read(stack, lead_shape, shape, block):
            with np.errstate(invalid='ignore', over='ignore'):
                coarse[start : start + len(y)] = estimate(y)

    yield from _on_threads(blocks, work, n_slices)
    inside = np.isfinite(coarse).all(axis=1)
    inside &= (np.abs(coarse) <= limit).all(axis=1)
    reach = math.ceil(limit) + 1
    if inside.any():
        low = np.maximum(np.floor(coarse[inside].min(axis=0)) - 1, -reach)
        high = np.minimum(np.ceil(coarse[inside].max(axis=0)) + 1, reach)
    else:
        low = high = np.zeros(ndim)
    box = sm.box_of(shape, low, high)
    designs = sm.ShiftedDesigns(
        refs.images, box, refs.mask, dtype, mapper=pool().map
    )
    shift = np.where(inside[:, None], coarse, 0.0)
    fit = None
    for stride, wider, settled in PASSES:
        fit = yield from _joint_pass(
            stack,
            lead_shape,
            shape,
            blocks,
            designs,
            model,
            shift,
            backend,
            stride,
            wider,
            settled,
        )
        shift = fit['shift']
    failed = ~np.isfinite(shift).all(axis=1)
    with np.errstate(invalid='ignore'):
        failed |= (np.abs(shift) > limit).any(axis=1)
        failed |= ~(fit['z'] >= STRUCTURE_Z)
    failed |= ~sm.margin_ok(fit['offset'], box, shape)
    # still far from its bin after the last pass: beyond the box's reach
    failed |= ~(np.abs(fit['delta']) <= UNSETTLED).all(axis=1)
    shift = np.where(failed[:, None], np.nan, shift)
    return Registration(
        shift=shift,
        failed=failed,
        offset=fit['offset'],
        key=fit['key'],
        delta=fit['delta'],
        theta=fit['theta'],
        ssr=fit['ssr'],
        hessian=fit['hessian'],
        box=box,
        designs=designs,
        model=model,
        dtype=np.dtype(dtype),
    )


def _placed(shift, box, shape, wider: int = 1):
    """Offsets, bins and rests of shifts, offsets held inside the box.

    Binned ``wider`` times coarser than the designs (keys in theirs).
    """
    offset, key, delta = sm.split_shift(
        np.nan_to_num(shift), sm.BINS // wider
    )
    key *= wider
    for j, (part, size) in enumerate(zip(box, shape)):
        held = np.clip(offset[:, j], -part.start, size - part.stop)
        delta[:, j] += offset[:, j] - held
        offset[:, j] = held
    return offset, key, delta


def _rows(runs, designs, stride: int):
    """Return the runs of every ``stride``-th row of the box, and pixels.

    The pixels are the runs' positions among the fitted pixels; None (and
    every run) when ``stride`` would leave fewer than :data:`MIN_ROWS`.
    """
    box_shape = designs.box_shape
    if stride == 1 or box_shape[0] // stride < MIN_ROWS:
        return runs, None
    first = designs.fitted[runs[:, 1]]
    row = np.unravel_index(first, box_shape)[0]
    runs = runs[row % stride == stride // 2]
    return runs, run_positions(runs)


def _joint_pass(
    stack,
    lead_shape,
    shape,
    blocks,
    designs,
    model,
    shift,
    backend,
    stride,
    wider,
    settled,
):
    """One pass: every slice's joint fit in the bin of its current shift.

    The pass only gathers each slice's products with its bin's columns
    (the backend's ``window_products``, every bin in one call) over every
    ``stride``-th row of the box, in bins ``wider`` times the designs';
    the Gauss–Newton iterations then run on all slices' sums at once,
    until their steps are below ``settled``.
    """
    n_slices = len(shift)
    offset, key, delta0 = _placed(shift, designs.box, shape, wider)
    keys, which = _keys(key)
    which = designs.slots(keys)[which]  # each slice's slot in the tables
    runs = window_runs(designs.box, shape, designs.fitted)
    runs, pixels = _rows(runs, designs, stride)
    tables, grams = designs.tables(pixels)
    base = base_of(offset, shape)
    b = np.zeros((n_slices, designs.width))
    yy = np.zeros(n_slices)

    def work(block) -> None:
        for start, y in _read(stack, lead_shape, shape, block):
            rows = slice(start, start + len(y))
            with np.errstate(invalid='ignore', over='ignore'):
                backend.window_products(
                    y.reshape(len(y), -1),
                    base[rows],
                    which[rows],
                    runs,
                    tables.centre,
                    tables.columns,
                    b[rows],
                    yy[rows],
                )

    yield from _on_threads(blocks, work, n_slices)
    with np.errstate(invalid='ignore', over='ignore'):
        tables.finish(which, b, yy)
    out = {'offset': offset, 'key': key}
    n = len(designs.fitted) if pixels is None else len(pixels)
    out.update(_fit_sums(b, yy, grams, which, model, delta0, n, settled))
    out['shift'] = offset + key / sm.BINS + out['delta']
    return out


#: Slices whose Gauss–Newton iterations run together (their temporaries
#: stay small).
_FIT_CHUNK = 4096


def _fit_sums(b, yy, grams, which, model, delta0, n: int, settled) -> dict:
    """Every slice's joint fit from its sums over ``n`` pixels."""
    n_slices, d = delta0.shape
    f = model.k + d
    out = {
        'delta': np.zeros((n_slices, d)),
        'theta': np.zeros((n_slices, model.k)),
        'ssr': np.zeros(n_slices),
        'hessian': np.zeros((n_slices, f, f)),
        'z': np.zeros(n_slices),
    }
    for start in range(0, n_slices, _FIT_CHUNK):
        rows = slice(start, start + _FIT_CHUNK)
        gram = grams[which[rows]]
        theta, delta, ssr, hess = sm.joint_fit(
            b[rows], yy[rows], gram, model, delta0[rows], settled
        )
        out['delta'][rows] = delta
        out['theta'][rows] = theta
        out['ssr'][rows] = ssr
        out['hessian'][rows] = hess
        out['z'][rows] = sm.structure_z(
            b[rows], gram, ssr, theta, delta, model, n
        )
    return out
