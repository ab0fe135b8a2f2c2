"""The passes of a fit: which sums, over which blocks, in what order.

Two ways through a stack, chosen by the estimator:

* **sums** (least squares with textbook errors, or with robust errors of a
  one-coefficient model, whose sandwich expands into two more sums): one
  pass of the backend's additive ``block_sums`` over blocks that may split
  slices into bands; the fit of every slice follows from its sums.  Where
  ``SSR = Σy_c² − ‖g‖²`` cancels (R² ≈ 1) a short second pass recomputes
  it from explicit residuals, over those slices only.
* **slices** (robust errors of several coefficients, Poisson, Huber): the
  backend's ``fit_block`` on blocks of whole slices, which passes over a
  block while it sits in the cache.
* **pixels** (least squares of slices of at most :data:`PIXEL_SLICE`
  fitted pixels, such as spectra): the backend's ``fit_pixels`` reads each
  slice once and writes its reported numbers at once
  (:mod:`napari_mixcoef.model.pixelwise`); the per-slice sums and their
  assembly would cost more than the fit.

Robust errors first estimate the noise's spatial correlation from a few
slices' residuals (:func:`noise_kernel`).  Pure walking: the maths is in
:mod:`napari_mixcoef.model`, the per-block work in the backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..backends.numpy import centred
from ..model import noise as noise_models
from ..model.assemble import stats_arrays
from ..model.constraints import solve
from ..model.design import calibrated_terms
from ..model.noise import NoiseSpec
from ..model.pixelwise import make_maps
from ..model.spatial import (
    MAX_LAG,
    noise_correlation,
    pair_index,
    sandwich_terms,
    smoothed,
    white_kernel,
)
from ..model.sums import (
    FitLayout,
    SliceStats,
    SumsLayout,
    expanded_meat,
    ols_stats,
    ssr_of,
    suspect,
)
from . import dask as dask_executor
from . import local
from .blocks import as_numpy, is_dask, read_slices

__all__ = ['FitOutcome', 'iter_stats', 'noise_kernel']

#: At most this many slices, and about this many pixels, estimate the
#: noise's spatial correlation.
KERNEL_SLICES = 16
KERNEL_PIXELS = 1 << 17
#: Fewer residual values than this leave independent noise assumed.
KERNEL_MIN_VALUES = 1024
#: Least-squares slices of at most this many fitted pixels are fitted one
#: by one (see benchmarks/bench_spectral.py).
PIXEL_SLICE = 64


@dataclass
class FitOutcome:
    """What the passes found: the reported arrays, noise kernel, notes.

    ``arrays`` are those of :func:`~..model.assemble.stats_arrays`
    (shaped to the stack's lead); ``bad`` the flat indices of slices with
    non-finite pixels (``nan_policy="omit"``).
    """

    arrays: dict[str, np.ndarray]
    rho: np.ndarray | None
    notes: list[str] = field(default_factory=list)
    bad: np.ndarray = field(default_factory=lambda: np.zeros(0, np.intp))


def nan_message(index: tuple[int, ...]) -> str:
    """Return the error for non-finite pixels in a slice (``"raise"``)."""
    return (
        f'stack slice {index} contains NaN or inf values in the fitted '
        'pixels; leave those pixels out with a mask, or skip them slice by '
        'slice (nan_policy="omit")'
    )


class _Finite:
    """Checks each finished run of slices for non-finite sums."""

    def __init__(self, lead_shape, policy: str) -> None:
        self.lead_shape = lead_shape
        self.policy = policy
        self.bad: list[np.ndarray] = []

    def __call__(self, values: np.ndarray, start: int) -> None:
        ok = np.isfinite(values)
        if ok.all():
            return
        where = start + np.flatnonzero(~ok)
        if self.policy == 'raise':
            index = np.unravel_index(int(where[0]), self.lead_shape)
            raise ValueError(nan_message(tuple(int(i) for i in index)))
        self.bad.append(where)

    def indices(self) -> np.ndarray:
        if not self.bad:
            return np.zeros(0, np.intp)
        return np.unique(np.concatenate(self.bad))


def noise_kernel(
    stack, lead_shape, design, spec: NoiseSpec, backend, policy: str, notes
) -> np.ndarray:
    """Pooled spatial correlation of a few slices' residuals.

    The residuals come from the same estimator as the fit (a robust fit's
    residuals do not carry the pattern that hot pixels pull into least
    squares).  Too few pixels for an estimate: independent noise, noted.
    """
    shape = design.shape
    n_slices = math.prod(lead_shape)
    if n_slices == 0 or not shape:
        return np.ones((1,) * len(shape))
    lag = tuple(min(MAX_LAG, s - 1) for s in shape)
    # enough pixels for lags to be precise, few enough to stay small
    count = min(max(KERNEL_PIXELS // math.prod(shape), 1), KERNEL_SLICES)
    picks = sorted(
        {(n_slices - 1) * i // max(count - 1, 1) for i in range(count)}
    )
    view = local.Views(design)(slice(None))
    y = read_slices(stack, lead_shape, picks)
    with np.errstate(invalid='ignore', over='ignore'):
        yc = centred(y, view, reuse=False)
        finite = np.isfinite(yc).all(axis=1)
    if not finite.all():
        if policy == 'raise':
            bad = int(picks[np.flatnonzero(~finite)[0]])
            index = np.unravel_index(bad, lead_shape)
            raise ValueError(nan_message(tuple(int(i) for i in index)))
        y, yc = y[finite], yc[finite]
    if yc.shape[0] * design.n_pixels < KERNEL_MIN_VALUES:
        notes.append(
            f'independent noise assumed: {design.n_pixels} fitted pixel(s) '
            f'per slice are too few to estimate how the noise correlates '
            'between neighbours'
        )
        return white_kernel(lag)
    with np.errstate(invalid='ignore', over='ignore'):
        if spec.noise == 'gaussian':
            z = np.dot(yc, view.basis.T).astype(np.float64)
        else:
            ols = NoiseSpec(**{**spec.__dict__, 'stderr': 'ols'})
            z = backend.fit_block(np.ascontiguousarray(y), view, ols, None).z
        resid = noise_models.residuals(yc, view.basis, z)
    resid = resid.reshape((len(resid), *shape))
    return noise_correlation(
        resid, design.mask, overwrite=True, lag_products=backend.lag_products
    )


def smoothed_basis(design, rho: np.ndarray, backend=None) -> np.ndarray:
    """``ρ ⋆ q`` of each basis vector, ``(k, n_ref)`` float64."""
    k = design.k
    columns = design.basis.astype(np.float64)
    correlate = None if backend is None else backend.correlate
    smooth = smoothed(columns.reshape((k, *design.shape)), rho, correlate)
    return smooth.reshape(k, -1)


def sandwich_rows(design, rho: np.ndarray, backend=None) -> np.ndarray:
    """Sandwich terms ``(k(k+1)/2, n_ref)`` of the basis, working dtype."""
    columns = design.basis.astype(np.float64)
    smooth = smoothed_basis(design, rho, backend)
    return sandwich_terms(columns, smooth, design.dtype)


def sample_terms(design, rho: np.ndarray, backend=None) -> np.ndarray:
    """Return the meat's calibrated terms at its sample only, ``(P, n_s)``.

    What :attr:`DesignView.meat_terms` makes from :func:`sandwich_rows`,
    without the terms at the other pixels: their sums over the image are
    the pairs of one ``k × k`` product ``Q (ρ⋆Q)ᵀ``.
    """
    columns = design.basis.astype(np.float64)
    smooth = smoothed_basis(design, rho, backend)
    index = np.flatnonzero(design.meat)
    picked = sandwich_terms(columns[:, index], smooth[:, index])
    gram = columns @ smooth.T
    a, b = np.array(pair_index(design.k)).T
    total = 0.5 * (gram[a, b] + gram[b, a])
    return calibrated_terms(picked, total, design.meat_scale, design.dtype)


def pixelwise(design, spec: NoiseSpec, constraint, stack) -> bool:
    """Whether the slices are fitted one by one (the **pixels** route)."""
    return (
        design.n_pixels <= PIXEL_SLICE
        and spec.noise == 'gaussian'
        and constraint is None
        and not is_dask(stack)
    )


def _detector_sample(stack, lead_shape, design) -> np.ndarray:
    """Fitted pixels of a few slices, for the detector check."""
    n_slices = math.prod(lead_shape)
    picks = sorted({(n_slices - 1) * i // 3 for i in range(4)})
    values = read_slices(stack, lead_shape, picks).astype(np.float64)
    if design.mask is not None:
        values = values[:, design.mask.reshape(-1)]
    return values[np.isfinite(values)]


def iter_stats(
    stack,
    design,
    spec: NoiseSpec,
    backend,
    *,
    lead_shape: tuple[int, ...],
    chunk_bytes: int | None,
    constraint,
    nan_policy: str,
    stacklevel: int = 2,
    rho: np.ndarray | None = None,
):
    """Walk the stack; yield ``(done, total)``; return a FitOutcome.

    Parameters
    ----------
    stack : array_like
        Checked: its last axes are the references' shape.
    design : Design
        The shared design.
    spec : NoiseSpec
        Noise model and error mode (checked).
    backend : Backend
        The backend that supports this fit.
    lead_shape : tuple of int
        The stack's leading shape.
    chunk_bytes : int or None
        Working-buffer budget per block (None: the executor's default).
    constraint : (C, d) or None
        Inequalities on the basis coordinates.
    nan_policy : {"raise", "omit"}
        Non-finite fitted pixels raise ValueError, or mark their slice
        for a fit of its own (``FitOutcome.bad``).
    stacklevel : int
        The user's frame, for warnings.
    rho : ndarray, optional
        A noise kernel estimated already (a slice refitted on its own):
        neither it nor the detector is looked at again.
    """
    notes: list[str] = []
    k = design.k
    n_slices = math.prod(lead_shape)
    fresh = rho is None
    if fresh and spec.noise == 'poisson' and n_slices:
        noise_models.check_detector(
            spec,
            _detector_sample(stack, lead_shape, design),
            stacklevel + 1,
        )
    terms = None
    if spec.stderr == 'auto' and fresh:
        rho = noise_kernel(
            stack, lead_shape, design, spec, backend, nan_policy, notes
        )
    finite = _Finite(lead_shape, nan_policy)
    if pixelwise(design, spec, constraint, stack):
        smooth = None
        if spec.stderr == 'auto':
            smooth = smoothed_basis(design, rho, backend)

        def check_rows(out, a, b):
            finite(out.rmse[a:b], a)

        out = yield from local.pixels(
            stack,
            lead_shape,
            design,
            make_maps(design, smooth),
            backend,
            chunk_bytes,
            check_rows,
        )
        return FitOutcome(out.arrays(lead_shape), rho, notes, finite.indices())
    dask = is_dask(stack)
    sums_only = spec.noise == 'gaussian' and (spec.stderr == 'ols' or k == 1)
    calibrated = None
    if spec.stderr == 'auto':
        if sums_only or design.meat is None:
            terms = sandwich_rows(design, rho, backend)
        else:  # the meat reads its sample's terms only
            calibrated = sample_terms(design, rho, backend)
    hac = terms[0] if (terms is not None and sums_only) else None
    views = local.Views(design, hac=hac, terms=terms, calibrated=calibrated)
    if sums_only:
        layout = SumsLayout(k, hac=hac is not None)

        def check(out, a, b):
            finite(out.yy[a:b], a)

        if dask:
            steps = dask_executor.sums(
                stack, lead_shape, views, backend, layout, check
            )
        else:
            steps = local.sums(
                stack, lead_shape, views, backend, layout, chunk_bytes, check
            )
        sums = yield from steps
        stats = _stats_from_sums(
            stack,
            lead_shape,
            views,
            backend,
            sums,
            constraint,
            hac,
            chunk_bytes,
        )
    else:
        layout = FitLayout(
            k,
            0 if constraint is None else len(constraint[1]),
            # Huber's textbook errors have no bread: a packed zero one
            # would make every error zero
            bread=spec.noise == 'poisson'
            or (spec.noise == 'huber' and spec.stderr == 'auto'),
        )
        yy = layout._spans()['yy'][0]

        def check(rows, a, b):
            finite(rows[a:b, yy], a)

        if dask:
            steps = dask_executor.fits(
                stack,
                lead_shape,
                views,
                backend,
                spec,
                constraint,
                layout,
                check,
            )
        else:
            steps = local.fits(
                stack,
                lead_shape,
                views,
                backend,
                spec,
                constraint,
                layout,
                chunk_bytes,
                check,
            )
        rows = yield from steps
        fit = layout.unpack(rows, sandwich=spec.stderr == 'auto')
        stats = SliceStats(
            z=fit.z,
            ssr=np.maximum(fit.ssr, 0.0),
            sst=design.centred_total(fit.s, fit.h, fit.yy),
            meat=fit.meat,
            bread=fit.bread,
            sandwich=fit.sandwich,
            active=fit.active,
        )
    arrays = stats_arrays(design, stats, lead_shape)
    return FitOutcome(arrays, rho, notes, finite.indices())


def _stats_from_sums(
    stack, lead_shape, views, backend, sums, constraint, hac, chunk_bytes
) -> SliceStats:
    """Each slice's least-squares fit from its sums (and the guard)."""
    design = views.design
    k = design.k
    active = None
    with np.errstate(invalid='ignore', over='ignore'):
        if constraint is None:
            z = np.ascontiguousarray(sums.g)
        else:
            z, active = solve(sums.g, *constraint)
        ssr = ssr_of(sums, k, z if constraint is not None else None)
        meat = None
        if hac is not None:
            hq = design.basis[0].astype(np.float64)
            hac_const = float(np.sum(hq * hq * hac.astype(np.float64)))
            meat = expanded_meat(sums, z, hac_const)
        # Guard the expansions where they cancel (R² ≈ 1): recompute those
        # slices from their explicit residuals, a second pass over them.
        bad = suspect(sums, ssr, design.dtype) & np.isfinite(ssr)
    if bad.any():
        terms = None if hac is None else hac[None]
        exact = local.residual_sums(
            stack, lead_shape, views, backend, bad, z, terms, chunk_bytes
        )
        ssr[bad] = exact[bad, 0]
        if meat is not None:
            meat[bad, 0] = np.maximum(exact[bad, 1], 0.0)
    return ols_stats(sums, design, z=z, ssr=ssr, meat=meat, active=active)


def stored_slice(stack, lead_shape, index: int) -> np.ndarray:
    """One slice (flat index) as stored, with its own leading axis."""
    if not lead_shape:
        return as_numpy(stack)[np.newaxis]
    where = tuple(int(i) for i in np.unravel_index(index, lead_shape))
    return as_numpy(stack[where])[np.newaxis]
