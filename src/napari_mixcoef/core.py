"""Fit every slice of a stack as a mix of reference images: the public API.

``import napari_mixcoef`` imports numpy and scipy only (numba comes with
the first fit, napari and Qt never).

How a fit works
---------------
Every slice ``y`` (``n`` fitted pixels) is regressed on one design ``D``
(``n × k``) made from the references alone, factored once through an
orthonormal basis (:mod:`napari_mixcoef.model.design`), so that each
slice costs a handful of dot products and float64 input is solved as
accurately as LAPACK's ``lstsq``.  The stack is read once, in cache-sized
blocks spread over two threads (:mod:`napari_mixcoef.engine`), each
pixel cast to the working float type and centred on the mean reference
by a backend's kernel (:mod:`napari_mixcoef.backends`).  Robust errors
first estimate the noise's spatial correlation from a few slices'
residuals (:mod:`napari_mixcoef.model.spatial`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Generator

import numpy as np
from numpy.typing import ArrayLike

from .backends import select
from .engine.blocks import read_slices
from .engine.fit import iter_stats
from .engine.threads import fit_settings
from .model.constraints import (
    CONSTRAINTS,
    check_constraint,
    constraint_rows,
)
from .model.design import make_design
from .model.models import MODELS
from .model.noise import NOISE_MODELS, STDERR_MODES, NoiseSpec, check_spec
from .model.references import (
    CollinearityWarning,
    References,
    check_stack,
    checked_references,
    diagnose,
)
from .model.result import MixFit, write_csv, write_provenance
from .registration import (
    REGISTRATIONS,
    RegisteredStack,
    check_register,
    register_stack,
    shift_errors,
)
from .residuals import lazy_residuals

#: The spec a registration's reading backend is chosen for: its products
#: are plain sums whatever the fit's noise model.
PLAIN = NoiseSpec('gaussian', 'ols', 1.0, 0.0, 0.0)

__all__ = [
    'CONSTRAINTS',
    'MODELS',
    'NAN_POLICIES',
    'NOISE_MODELS',
    'REGISTRATIONS',
    'STDERR_MODES',
    'MixFit',
    'fit_stack',
    'iter_fit',
    'reference_diagnostics',
    'residuals',
    'warm_up',
    'write_csv',
    'write_provenance',
]

#: What a fit does with NaN or inf pixels in a slice.
NAN_POLICIES = ('raise', 'omit')

ProgressCallback = Callable[[int, int], object]


def iter_fit(
    stack: ArrayLike,
    *references: ArrayLike,
    model: str = 'mix',
    mask: ArrayLike | None = None,
    chunk_bytes: int | None = None,
    noise: str = 'gaussian',
    gain: float = 1.0,
    camera_offset: float = 0.0,
    read_noise: float = 0.0,
    stderr: str = 'auto',
    constraint: str | None = None,
    nan_policy: str = 'raise',
    backend: str | None = None,
    register: str | None = None,
    max_shift: float | None = None,
) -> Generator[tuple[int, int], None, MixFit]:
    """Fit the stack, yielding ``(done_slices, total_slices)`` as it goes.

    The generator form of :func:`fit_stack` (same arguments but
    ``progress``): a GUI worker yields each step to its event loop and can
    stop the fit between blocks by closing the generator.  The
    :class:`MixFit` is its return value (``fit = yield from
    iter_fit(...)``, or ``StopIteration.value``).
    """
    with fit_settings():
        spec = NoiseSpec(
            noise, stderr, float(gain), float(camera_offset), float(read_noise)
        )
        check_spec(spec)
        check_constraint(constraint)
        if nan_policy not in NAN_POLICIES:
            raise ValueError(
                f'unknown nan_policy {nan_policy!r}; choose "raise" or "omit"'
            )
        refs = checked_references(references, mask)
        limit = check_register(register, max_shift, refs.shape)
        stack = check_stack(stack, refs.shape)
        design = make_design(refs, model, np.dtype(stack.dtype), stacklevel=4)
        whole = design  # the residuals' design: the full reference grid
        lead_shape = tuple(
            int(s) for s in stack.shape[: stack.ndim - len(refs.shape)]
        )
        source, reg = stack, None
        if limit is not None:
            # the joint passes read the stack as stored, with any noise
            reads = select(backend, stack.dtype, 1, PLAIN, False)
            reg = yield from register_stack(
                stack,
                lead_shape,
                refs,
                design.model,
                limit,
                design.dtype,
                reads,
            )
            stack = RegisteredStack(
                source, lead_shape, reg, design.dtype, reads
            )
            with warnings.catch_warnings():  # the whole grid's warned once
                warnings.simplefilter('ignore', CollinearityWarning)
                design = make_design(
                    reg.box_references(refs), model, design.dtype
                )
        engine = select(
            backend, stack.dtype, design.k, spec, constraint is not None
        )
        rows = None if constraint is None else constraint_rows(design)
        outcome = yield from iter_stats(
            stack,
            design,
            spec,
            engine,
            lead_shape=lead_shape,
            chunk_bytes=chunk_bytes,
            constraint=rows,
            nan_policy=nan_policy,
            stacklevel=4,
        )
        arrays = outcome.arrays
        omitted = np.zeros(lead_shape, np.int64)
        if outcome.bad.size:
            _refit_omitted(
                stack,
                design,
                spec,
                engine,
                constraint,
                outcome,
                arrays,
                omitted,
                lead_shape,
                chunk_bytes,
            )
        shift = shift_stderr = failed = None
        if reg is not None:
            shift_stderr = shift_errors(
                reg, source, lead_shape, spec.stderr, outcome.rho, reads
            )
            shift = reg.shift.reshape(lead_shape + reg.shift.shape[1:])
            shift_stderr = shift_stderr.reshape(shift.shape)
            failed = reg.failed.reshape(lead_shape)
        return MixFit(
            model=design.model.name,
            names=design.model.names,
            coef=arrays['coef'],
            stderr=arrays['stderr'],
            x=arrays['x'],
            x_stderr=arrays['x_stderr'],
            r2=arrays['r2'],
            rmse=arrays['rmse'],
            n_pixels=design.n_pixels,
            n_references=refs.k,
            fractions=arrays['fractions'],
            fractions_stderr=arrays['fractions_stderr'],
            at_bound=arrays['at_bound'],
            constraint=constraint,
            noise=spec.noise,
            stderr_mode=spec.stderr,
            noise_kernel=outcome.rho,
            detector={
                'gain': spec.gain,
                'camera_offset': spec.camera_offset,
                'read_noise': spec.read_noise,
            },
            nan_policy=nan_policy,
            backend=engine.name,
            n_omitted=omitted,
            notes=tuple(outcome.notes),
            register=register,
            shift=shift,
            shift_stderr=shift_stderr,
            registration_failed=failed,
            _design=whole,
            _registration=reg,
            _residuals=_fit_residuals,
        )


def _refit_omitted(
    stack,
    design,
    spec,
    engine,
    constraint,
    outcome,
    arrays,
    omitted,
    lead_shape,
    chunk_bytes,
) -> None:
    """Fit each slice with NaN or inf pixels on its finite pixels alone.

    Each gets a design of its own (the mask less those pixels); slices
    left with too few pixels, or with references that no longer differ
    there, get NaN.
    """
    refs = design.refs
    fitted = (
        np.ones(refs.shape, bool) if refs.mask is None else refs.mask
    ).reshape(-1)
    for index in outcome.bad:
        y = read_slices(stack, lead_shape, [int(index)])
        ok = np.isfinite(y[0].astype(np.float64))
        keep = fitted & ok
        omitted.flat[index] = int(np.count_nonzero(fitted & ~ok))
        values = _fit_one(
            y,
            refs,
            keep,
            design,
            spec,
            engine,
            constraint,
            outcome.rho,
            chunk_bytes,
        )
        where = np.unravel_index(int(index), lead_shape)
        for key, array in arrays.items():
            array[where] = (
                values[key]
                if values is not None
                else (False if array.dtype == bool else np.nan)
            )


def _fit_one(y, refs, keep, design, spec, engine, constraint, rho, chunk):
    """Return the arrays of one slice fitted on ``keep`` (or None)."""
    n = int(keep.sum())
    if n < design.k:
        return None
    own = References(refs.images, keep.reshape(refs.shape), n)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', CollinearityWarning)
            one = make_design(own, design.model.name, y.dtype)
    except ValueError:
        return None
    rows = None if constraint is None else constraint_rows(one)
    steps = iter_stats(
        y,
        one,
        spec,
        engine,
        lead_shape=(1,),
        chunk_bytes=chunk,
        constraint=rows,
        nan_policy='raise',
        rho=rho,
    )
    try:
        while True:
            next(steps)
    except StopIteration as stop:
        outcome = stop.value
    return {key: value[0] for key, value in outcome.arrays.items()}


def _fit_residuals(stack, fit: MixFit):
    """``fit.residuals(stack)``: the residual with the fit's references."""
    refs = fit._design.refs
    stack = check_stack(stack, refs.shape)
    _check_fitted_stack(stack, fit)
    return lazy_residuals(stack, fit)


def _check_fitted_stack(stack, fit: MixFit) -> None:
    lead = tuple(stack.shape[: stack.ndim - len(fit._design.refs.shape)])
    if lead != fit.lead_shape:
        raise ValueError(
            f'the fit has {fit.lead_shape} slices but the stack has shape '
            f'{tuple(stack.shape)}; pass the stack that was fitted'
        )


def fit_stack(
    stack: ArrayLike,
    *references: ArrayLike,
    model: str = 'mix',
    mask: ArrayLike | None = None,
    chunk_bytes: int | None = None,
    progress: ProgressCallback | None = None,
    noise: str = 'gaussian',
    gain: float = 1.0,
    camera_offset: float = 0.0,
    read_noise: float = 0.0,
    stderr: str = 'auto',
    constraint: str | None = None,
    nan_policy: str = 'raise',
    backend: str | None = None,
    register: str | None = None,
    max_shift: float | None = None,
) -> MixFit:
    """Fit each slice of `stack` as a combination of reference images.

    Parameters
    ----------
    stack : (*lead, *ref.shape) array_like
        Any real dtype, byte order or memory layout; numpy array, memmap,
        dask or zarr array.  Every leading axis is a slice index.  Never
        modified, never copied whole: it is read once, block by block.
    *references : (*ref.shape) array_like
        The K reference images, positional: ``fit_stack(stack, A, B)``
        fits two (K ≥ 2 for ``"mix"``, K ≥ 1 for the free models).
    model : {"mix", "scaled", "offset"}
        ``"mix"``: ``I ≈ Σ x_k R_k`` with ``Σ x_k = 1`` (two references:
        ``x·A + (1−x)·B``); ``"scaled"``: ``I ≈ Σ a_k R_k``;
        ``"offset"``: ``I ≈ Σ a_k R_k + c``.
    mask : (*ref.shape) array_like of bool, optional
        Only True (nonzero) pixels enter the fit and the statistics.
    chunk_bytes : int, optional
        Working-buffer budget per block and thread (default 1 MiB, more
        for stacks in memory); blocks are aligned to zarr/dask chunks along
        the first axis.
    progress : callable, optional
        ``progress(done_slices, total_slices)``, called as blocks finish.
    noise : {"gaussian", "poisson", "huber"}
        ``"gaussian"``: least squares.  ``"poisson"``: photon counts
        ``(I − camera_offset) / gain`` with variance ``μ + read_noise²``
        (photons), fitted by iteratively reweighted least squares with
        weights from the model's μ (3 iterations).  ``"huber"``: robust
        IRLS (Huber weights on residuals scaled by their median absolute
        deviation) for hot pixels and debris.
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
    constraint : {None, "nonneg"}
        ``"nonneg"``: each reference's weight (the fractions of ``"mix"``,
        which then also sum to one; the ``a_k`` of the free models) is at
        least zero.  The exact constrained minimiser of each slice;
        ``fit.at_bound`` says where a constraint is active, and the
        errors of coefficients held at a bound are NaN.
    nan_policy : {"raise", "omit"}
        ``"raise"``: NaN or inf in a fitted pixel of the stack raises
        ValueError naming the slice.  ``"omit"``: each such slice is fitted
        on its finite pixels alone (``fit.n_omitted`` counts the others).
    backend : {None, "numba", "numpy"}
        The backend to compute with (None: ``NAPARI_MIXCOEF_BACKEND``, or
        numba when installed).  A fit the backend cannot do runs on numpy.
    register : {None, "translation"}
        ``"translation"``: each slice's sub-pixel translation relative to
        the references is estimated together with its coefficients
        (``fit.shift``, lead + (ndim,), pixels along each reference axis:
        a slice equal to ``scipy.ndimage.shift(model, s)`` has shift
        ``s``; ``fit.shift_stderr``).  Coefficients, statistics and
        residuals are those of the registered slice, fitted over the part
        of the grid every slice covers (``fit.n_pixels`` counts it).  A
        slice with no structure to register on, or shifted beyond
        ``max_shift``, is flagged in ``fit.registration_failed``: its
        shift is NaN and its coefficients those of the unregistered
        slice.  See :mod:`napari_mixcoef.registration`.
    max_shift : float, optional
        Largest shift (pixels) along any axis; default a quarter of the
        smallest reference axis.

    Returns
    -------
    MixFit
        ``x``, ``x_stderr``, ``r2``, ``rmse`` of shape ``lead``; ``coef``
        and ``stderr`` of shape ``lead + (m,)``; ``fractions`` and
        ``fractions_stderr`` of shape ``lead + (K,)``.

    Warns
    -----
    CollinearityWarning
        When the references are nearly collinear (the fractions are then
        poorly determined; see :func:`reference_diagnostics`).
    DetectorWarning
        When the camera offset is above most of the data (Poisson).

    Raises
    ------
    ValueError
        Shapes that do not match, too few references, collinear
        references, NaN or inf in the fitted pixels (with ``"raise"``),
        a mask with too few pixels, an unknown model, noise model, stderr
        mode or constraint, impossible detector parameters.
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
        *references,
        model=model,
        mask=mask,
        chunk_bytes=chunk_bytes,
        noise=noise,
        gain=gain,
        camera_offset=camera_offset,
        read_noise=read_noise,
        stderr=stderr,
        constraint=constraint,
        nan_policy=nan_policy,
        backend=backend,
        register=register,
        max_shift=max_shift,
    )
    try:
        while True:
            done, total = next(steps)
            if progress is not None:
                progress(done, total)
    except StopIteration as stop:
        return stop.value


def residuals(stack: ArrayLike, *references_and_fit):
    """Return the lazy residual stack ``I − model`` of a fit.

    Parameters
    ----------
    stack : (*lead, *ref.shape) array_like
        The stack that was fitted (numpy, memmap, zarr or dask).
    *references_and_fit
        The references of the fit, then the :class:`MixFit` itself:
        ``residuals(stack, A, B, fit)``.

    Returns
    -------
    array_like
        Of the stack's shape, float32: a ``ResidualStack`` whose slices are
        computed when read (``np.asarray(res[i])``), or a dask array for a
        dask stack.  The model is evaluated on every pixel, also outside
        the fit's mask.

    Raises
    ------
    ValueError
        A stack or references other than those fitted.
    """
    if not references_and_fit or not isinstance(
        references_and_fit[-1], MixFit
    ):
        raise TypeError(
            'pass the fit last: residuals(stack, *references, fit)'
        )
    *references, fit = references_and_fit
    refs = fit._design.refs
    if not refs.same_images(references):
        raise ValueError(
            'the references differ from those of the fit; pass the '
            'references that were fitted (or use fit.residuals(stack))'
        )
    return _fit_residuals(stack, fit)


def reference_diagnostics(
    *references: ArrayLike, mask: ArrayLike | None = None
) -> dict[str, object]:
    """Say how well K references can be told apart, before any fit.

    For two references, in the avg/diff basis of the pair, ``(A+B)/√2``
    and ``(A−B)/√2``, a mix moves only along the difference direction: the
    smaller its share of the pair's energy, the harder ``x`` is to
    measure.  For K references the same holds for each one's distance
    from the affine hull of the others.

    Parameters
    ----------
    *references : (*shape) array_like
        The references.
    mask : (*shape) array_like of bool, optional
        Only these pixels count.

    Returns
    -------
    dict
        ``"condition_number"``: of the references with each scaled to unit
        norm (≥ 1; inf for a zero reference);
        ``"unique_energy_fraction"`` (K,): each reference's squared
        distance from the affine hull of the others over its squared
        distance from their mean (1 for K = 2, near 0 when it is nearly an
        affine combination of them);
        ``"fraction_stderr_per_noise"`` (K,): 1 / that distance, the
        standard error of its fraction per unit of white-noise standard
        deviation (mix model);
        ``"collinear"``: whether a float64 fit would refuse them;
        ``"nearly_collinear"``: whether a fit would warn;
        ``"n_pixels"``, ``"n_references"``.  With two references also
        ``"diff_energy_fraction"`` (``‖A−B‖² / (2(‖A‖² + ‖B‖²))``, from 0
        for identical references to 1 for opposite ones),
        ``"x_stderr_per_noise"`` (``1/‖A−B‖``) and ``"correlation"``.
    """
    return diagnose(references, mask)


def warm_up(dtypes=(np.uint16, np.float32)) -> None:
    """Import numba and compile (or load) the kernels of the default fits.

    Takes a few seconds the first time after installing, well under a
    second later; call it in a background thread (as the widget does) so
    that the first fit does not wait for it.  Runs tiny fits of each
    default kind (both error modes, a noise-free stack for the guard, a
    scaled fit, a Poisson fit) so that every kernel they use is ready.

    Parameters
    ----------
    dtypes : sequence of dtype
        Stack dtypes to prepare (each compiles its own kernels).
    """
    rng = np.random.default_rng(0)
    a, b = rng.random((2, 16, 16)) * 100 + 100
    for dtype in dtypes:
        noisy = (rng.random((4, 16, 16)) * 100).astype(dtype)
        exact = (0.7 * a + 0.3 * b)[None].repeat(4, 0).astype(dtype)
        for stack in (noisy, exact):  # exact: R² ≈ 1 takes the guard
            for stderr in ('auto', 'ols'):
                fit_stack(stack, a, b, stderr=stderr)
        fit_stack(noisy, a, b, model='scaled')
        fit_stack(noisy, a, b, noise='poisson')  # Huber shares its kernel
