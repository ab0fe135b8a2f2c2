"""Each slice's sub-pixel translation, estimated with its mix.

How a registered fit works
--------------------------
1. **Coarse**: each slice's cross-correlation with the mean reference,
   by FFT over blocks of slices at a reduced resolution, gives its shift
   to about a pixel (the peak, refined by a parabola).
2. **Joint refinement**: :data:`PASSES` passes over the stack, each
   reading every slice once at its integer offset and fitting the model's
   coefficients and the rest of the shift together, by Gauss–Newton on
   the products with a design shared by all slices of a bin of fractional
   shifts (:mod:`napari_mixcoef.model.shifts`).
3. **The fit**: the engine fits the *registered stack*, a lazy view of
   each slice read at its integer offset plus the noise-free model's
   change over the fractional rest (:class:`RegisteredStack`), against
   the references over the box every slice covers: every model, noise
   model, error mode and constraint as without registration, and the
   slice's own noise untouched (no interpolation of the data).
4. **Errors of the shift** from the joint fit's Jacobian, with the same
   estimator as the coefficients' (textbook, or the sandwich with the
   noise's spatial correlation).

A slice with no structure to register on (its pattern does not stand out
of its noise), or shifted beyond ``max_shift``, is flagged in
``registration_failed``: its shift is NaN and its coefficients are those
of the unregistered slice over the same pixels.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft
from numpy.typing import NDArray

from .engine.blocks import plan_blocks, stored_rows
from .engine.threads import thread_run
from .model import shifts as sm
from .model.design import meat_sample
from .model.references import References
from .model.windows import WindowTables, base_of, window_runs

__all__ = [
    'REGISTRATIONS',
    'RegisteredStack',
    'Registration',
    'check_register',
    'register_stack',
    'shift_errors',
]

#: What ``register`` may be (besides None).
REGISTRATIONS = ('translation',)
#: Joint passes over the stack after the coarse estimate.
PASSES = 2
#: A slice whose pattern stands out of its noise by fewer standard errors
#: than this has no structure to register on.
STRUCTURE_Z = 8.0
#: A slice whose last joint fit moved further than this (pixels) from
#: its bin's centre has not settled (it left the box, or diverged).
UNSETTLED = 0.25
#: Coarse correlations run on images of about this many pixels a side.
COARSE_SIDE = 32
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


def _downsampled(images: NDArray, factor: int, ndim: int) -> NDArray:
    """Block means of ``factor`` pixels a side over the last ``ndim`` axes."""
    # float32: a coarse estimate needs no more, and halves the traffic
    if factor == 1:
        return images.astype(np.float32)
    lead = images.ndim - ndim
    keep = tuple(slice(0, (s // factor) * factor) for s in images.shape[lead:])
    x = images[(Ellipsis, *keep)]
    # an axis at a time, adding its strided views: a reduction over split
    # axes (mean(axis=...)) is several times slower
    for axis in range(images.ndim - 1, lead - 1, -1):
        shape = x.shape
        split = x.reshape(
            shape[:axis] + (shape[axis] // factor, factor) + shape[axis + 1 :]
        )
        at = (slice(None),) * (axis + 1)
        acc = split[(*at, 0)].astype(np.float32)
        for i in range(1, factor):
            acc += split[(*at, i)]
        x = acc
    return x / np.float32(factor**ndim)


def _window(shape) -> NDArray:
    """Return a separable Hann window (the wrap-around fades out)."""
    out = np.ones(shape)
    for j, size in enumerate(shape):
        w = np.hanning(size + 2)[1:-1]
        out = out * w.reshape((-1,) + (1,) * (len(shape) - j - 1))
    return out


class _Coarse:
    """FFT cross-correlation of slices with the mean reference."""

    def __init__(self, refs: References, limit: float) -> None:
        shape = refs.shape
        self.ndim = len(shape)
        self.factor = max(1, min(shape) // COARSE_SIDE)
        template = refs.images.mean(axis=0)
        self.mask = (
            None
            if refs.mask is None
            else _downsampled(
                refs.mask.astype(np.float64), self.factor, self.ndim
            )
        )
        self.window = _window(tuple(s // self.factor for s in shape)).astype(
            np.float32
        )
        small = self._prepared(template[None])[0]
        self.shape = small.shape
        self.axes = tuple(range(-self.ndim, 0))
        # scipy's FFT keeps float32 (numpy's works in float64)
        self.spectrum = np.conj(sfft.rfftn(small, axes=self.axes))
        reach = limit / self.factor + 1
        grid = np.meshgrid(
            *[np.fft.fftfreq(s, 1 / s) for s in self.shape], indexing='ij'
        )
        self.lags = np.stack([g.reshape(-1) for g in grid], axis=1)
        self.allowed = (np.abs(self.lags) <= reach).all(axis=1)

    def _prepared(self, images: NDArray) -> NDArray:
        small = _downsampled(images, self.factor, self.ndim)
        axes = tuple(range(1, small.ndim))
        small = small - small.mean(axis=axes, keepdims=True)
        if self.mask is not None:
            small = small * self.mask
        return small * self.window

    def __call__(self, y: NDArray) -> NDArray[np.float64]:
        """Shifts ``(m, d)`` of slices ``y`` (m, *shape), in pixels."""
        spec = sfft.rfftn(self._prepared(y), axes=self.axes)
        corr = sfft.irfftn(spec * self.spectrum, s=self.shape, axes=self.axes)
        flat = corr.reshape(len(y), -1)
        flat = np.where(self.allowed, flat, -np.inf)
        best = np.argmax(flat, axis=1)
        peak = self.lags[best].astype(np.float64)
        index = np.stack(np.unravel_index(best, self.shape), axis=1)
        rows = np.arange(len(y))
        for j, size in enumerate(self.shape):
            if size < 3:
                continue
            around = []
            for step in (-1, 0, 1):
                at = index.copy()
                at[:, j] = (at[:, j] + step) % size
                around.append(corr[(rows, *at.T)])
            lo, mid, hi = around
            curve = lo - 2 * mid + hi
            with np.errstate(invalid='ignore', divide='ignore'):
                frac = np.where(curve < 0, 0.5 * (lo - hi) / curve, 0.0)
            peak[:, j] += np.clip(np.nan_to_num(frac), -0.5, 0.5)
        return peak * self.factor


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
    estimate = _Coarse(refs, limit)
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
    designs = sm.ShiftedDesigns(refs.images, box, refs.mask)
    shift = np.where(inside[:, None], coarse, 0.0)
    fit = None
    for _ in range(PASSES):
        fit = yield from _joint_pass(
            stack,
            lead_shape,
            shape,
            blocks,
            designs,
            model,
            shift,
            dtype,
            backend,
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


def _placed(shift, box, shape):
    """Offsets, bins and rests of shifts, offsets held inside the box."""
    offset, key, delta = sm.split_shift(np.nan_to_num(shift))
    for j, (part, size) in enumerate(zip(box, shape)):
        held = np.clip(offset[:, j], -part.start, size - part.stop)
        delta[:, j] += offset[:, j] - held
        offset[:, j] = held
    return offset, key, delta


def _joint_pass(
    stack, lead_shape, shape, blocks, designs, model, shift, dtype, backend
):
    """One pass: every slice's joint fit in the bin of its current shift.

    The pass only gathers each slice's products with its bin's columns
    (the backend's ``window_products``, every bin in one call); the
    Gauss–Newton iterations then run on all slices' sums at once.
    """
    n_slices = len(shift)
    offset, key, delta0 = _placed(shift, designs.box, shape)
    keys, which = _keys(key)
    used = designs.get_many(keys)
    tables = WindowTables.of(used, keys, designs.k, dtype)
    runs = window_runs(designs.box, shape, designs.fitted)
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
    grams = np.stack([d.gram for d in used])
    out = {'offset': offset, 'key': key}
    out.update(_fit_sums(b, yy, grams, which, model, delta0, designs))
    out['shift'] = offset + key / sm.BINS + out['delta']
    return out


#: Slices whose Gauss–Newton iterations run together (their temporaries
#: stay small).
_FIT_CHUNK = 4096


def _fit_sums(b, yy, grams, which, model, delta0, designs) -> dict:
    """Every slice's joint fit from its sums, in chunks of slices."""
    n_slices, d = delta0.shape
    f = model.k + d
    out = {
        'delta': np.zeros((n_slices, d)),
        'theta': np.zeros((n_slices, model.k)),
        'ssr': np.zeros(n_slices),
        'hessian': np.zeros((n_slices, f, f)),
        'z': np.zeros(n_slices),
    }
    n = len(designs.fitted)
    for start in range(0, n_slices, _FIT_CHUNK):
        rows = slice(start, start + _FIT_CHUNK)
        gram = grams[which[rows]]
        theta, delta, ssr, hess = sm.joint_fit(
            b[rows], yy[rows], gram, model, delta0[rows]
        )
        out['delta'][rows] = delta
        out['theta'][rows] = theta
        out['ssr'][rows] = ssr
        out['hessian'][rows] = hess
        out['z'][rows] = sm.structure_z(
            b[rows], gram, ssr, theta, delta, model, n
        )
    return out


def shift_errors(
    reg: Registration, stack, lead_shape, stderr: str, rho, backend
) -> NDArray[np.float64]:
    """Return the shifts' standard errors, ``(n, d)`` (NaN where failed).

    ``stderr="ols"``: ``σ̂²H⁻¹`` of the joint fit.  ``"auto"``: the
    sandwich with the spatial HAC terms of the noise kernel ``rho`` (the
    coefficients' own), from one more pass over the residuals (the
    backend's ``window_meat``), summed over the engine's fixed sample of
    pixels (:func:`~.model.design.meat_sample`) where a slice has many.
    """
    designs = reg.designs
    n = len(designs.fitted)
    k = reg.model.k
    meat = None
    if stderr == 'auto' and rho is not None:
        meat = _meat(reg, stack, lead_shape, rho, backend)
    cov = sm.joint_covariance(reg.hessian, reg.ssr, n, meat)
    var = np.diagonal(cov, axis1=1, axis2=2)[:, k:]
    err = np.sqrt(np.maximum(var, 0.0))
    err[reg.failed] = np.nan
    return err


def _meat(reg: Registration, stack, lead_shape, rho, backend) -> NDArray:
    """Return the sandwich's middle of every joint fit, ``(n, f, f)``."""
    designs = reg.designs
    n = len(designs.fitted)
    shape = designs.box_shape
    full = designs.full_shape
    inside = np.zeros(math.prod(shape), bool)
    inside[designs.fitted] = True
    sample, scale = meat_sample(
        inside, inside.size, n, reg.model.k + len(shape)
    )
    picked = designs.fitted if sample is None else np.flatnonzero(sample)
    where = np.searchsorted(designs.fitted, picked)  # in the terms
    keys, which = _keys(reg.key)
    coarse, twhich = _keys(np.array([_coarser(key) for key in keys]))
    twhich = twhich[which]
    wt = reg.dtype
    # C order: the kernel reads each row along the pixels
    columns = np.ascontiguousarray(
        np.stack([designs.get(key).columns[:, picked] for key in keys]), wt
    )
    terms = np.ascontiguousarray(
        np.stack(
            [designs.get(key).terms(rho, shape)[:, where] for key in coarse]
        ),
        wt,
    )
    v = np.ascontiguousarray(sm._vector(reg.theta, reg.delta, reg.model), wt)
    runs = window_runs(designs.box, full, picked)
    base = base_of(reg.offset, full)
    sums = np.zeros((len(v), terms.shape[1]))

    def work(block) -> None:
        for start, y in _read(stack, lead_shape, full, block):
            rows = slice(start, start + len(y))
            with np.errstate(invalid='ignore', over='ignore'):
                backend.window_meat(
                    y.reshape(len(y), -1),
                    base[rows],
                    which[rows],
                    runs,
                    v[rows],
                    columns,
                    twhich[rows],
                    terms,
                    sums[rows],
                )

    for _ in _on_threads(_blocks(lead_shape, full), work, len(v)):
        pass
    with np.errstate(invalid='ignore', over='ignore'):
        return scale * sm.meat_of(sums, reg.theta, reg.delta, reg.model)


def _keys(key: NDArray) -> tuple[list, NDArray[np.int64]]:
    """Return the distinct bins of ``key`` (m, d) and each row's one."""
    values, which = np.unique(key, axis=0, return_inverse=True)
    keys = [tuple(int(v) for v in value) for value in values]
    return keys, which.reshape(-1).astype(np.int64)


#: The sandwich's terms vary slowly with the fractional shift: they are
#: shared by bins this many times wider than the design's.
TERMS_COARSER = 4


def _coarser(key: tuple[int, ...]) -> tuple[int, ...]:
    """Return the bin whose sandwich terms bin ``key`` borrows."""
    return tuple(int(round(k / TERMS_COARSER)) * TERMS_COARSER for k in key)


class RegisteredStack:
    """The stack as the registered fit sees it: a lazy, read-only array.

    Slice ``i`` over the box ``Ω``: ``y_i(p + n_i) + m̂_i(p) − m̂_i(p −
    f_i)`` for ``p ∈ Ω``: the slice read at its integer offset ``n_i``
    (its own noise, no interpolation), plus the noise-free model's change
    over the fractional rest ``f_i`` (the joint fit's coefficients).
    Failed slices are read unshifted.  Shape ``lead + box``, float in the
    working dtype; basic indexing as the engine's readers use it.
    """

    def __init__(
        self, stack, lead_shape, reg: Registration, dtype, backend
    ) -> None:
        self._stack = stack
        self._lead = tuple(lead_shape)
        self._reg = reg
        self._backend = backend
        self.dtype = np.dtype(dtype)
        designs = reg.designs
        self.shape = self._lead + designs.box_shape
        self.ndim = len(self.shape)
        full = reg.designs.full_shape
        live = ~reg.failed
        self._base = base_of(np.where(live[:, None], reg.offset, 0), full)
        self._runs = window_runs(
            designs.box, full, np.arange(math.prod(designs.box_shape))
        )
        # failed slices: read unshifted, no correction (weights 0)
        values, which = np.unique(reg.key[live], axis=0, return_inverse=True)
        self._which = np.zeros(len(live), np.int64)
        self._which[live] = which.reshape(-1)
        coef = sm.correction_coef(reg.theta, reg.delta, reg.model)
        self._coef = np.where(live[:, None], coef, 0.0).astype(self.dtype)
        self._rows = np.zeros(
            (max(len(values), 1), coef.shape[1], self._runs[:, 2].sum()),
            self.dtype,
        )
        for j, value in enumerate(values):
            design = designs.get(tuple(int(v) for v in value))
            self._rows[j] = sm.correction_rows(design)

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        n_lead = len(self._lead)
        lead_key, ref_key = key[:n_lead], key[n_lead:]
        flat = np.arange(math.prod(self._lead)).reshape(self._lead)
        picked = np.asarray(flat[lead_key])
        source = np.asarray(self._stack[lead_key])
        source = source.reshape((-1, *source.shape[picked.ndim :]))
        out = np.empty((picked.size, *self._reg.designs.box_shape), self.dtype)
        rows = picked.reshape(-1)
        self._fill(source, rows, out.reshape(len(rows), -1))
        out = out.reshape(picked.shape + out.shape[1:])
        return out[(Ellipsis, *ref_key)]

    def _fill(self, source, rows, out) -> None:
        with np.errstate(invalid='ignore', over='ignore'):
            self._backend.window_fill(
                source.reshape(len(source), -1),
                self._base[rows],
                self._which[rows],
                self._runs,
                self._coef[rows],
                self._rows,
                out,
            )

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out if dtype is None else out.astype(dtype)
