"""Reference images and mask: every check that needs no stack pixel.

The library, the command line and the widget raise the same errors because
they all go through :func:`checked_references` before anything is read.
:func:`diagnose` says how well K references can be told apart (seed 001's
avg/diff change of basis of a pair, generalised to K).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = [
    'CollinearityWarning',
    'References',
    'as_array_like',
    'as_numpy',
    'check_real',
    'check_stack',
    'checked_mask',
    'checked_references',
    'diagnose',
    'reference_names',
    'working_dtype',
]

#: Above this condition number of the unit-normalised design a warning
#: says the coefficients are poorly determined (cosine similarity of two
#: references above ~0.998).
WARN_COND = math.sqrt(1e3)


class CollinearityWarning(UserWarning):
    """The references are nearly collinear; fractions are poorly determined."""


def reference_names(k: int) -> list[str]:
    """``ref1`` … ``refK``: how messages name the references."""
    return [f'ref{i + 1}' for i in range(k)]


def as_numpy(piece) -> np.ndarray:
    """Materialise an array-like (numpy, memmap, zarr, dask) as numpy.

    dask pieces are computed here, with the active scheduler.
    """
    if hasattr(piece, 'compute') and not isinstance(piece, np.ndarray):
        piece = piece.compute()
    return np.asarray(piece)


def check_real(name: str, dtype: np.dtype) -> None:
    """Raise TypeError unless ``dtype`` is a real integer or float type."""
    if dtype.kind not in 'iuf':
        what = {
            'b': 'boolean',
            'c': 'complex',
            'O': 'object',
        }.get(dtype.kind, f'non-numeric ({dtype})')
        hint = {
            'b': f'convert it, e.g. {name}.astype(np.uint8)',
            'c': f'fit the real part or the magnitude (np.abs({name}))',
        }.get(dtype.kind, 'convert it to a real numeric dtype')
        raise TypeError(
            f'{name} has {what} dtype {dtype}; a real numeric dtype '
            f'(int, uint or float) is needed: {hint}'
        )


def as_array_like(a, name: str, *, check_dtype: bool = True):
    """Return ``a`` unchanged if array-like enough, else ``np.asarray(a)``."""
    if a is None:
        raise TypeError(f'{name} is None; pass an array')
    if not (hasattr(a, 'shape') and hasattr(a, 'dtype')):
        a = np.asarray(a)
    if check_dtype:
        check_real(name, np.dtype(a.dtype))
    return a


def working_dtype(dtype: np.dtype) -> np.dtype:
    """float32 where it holds every input value exactly, else float64.

    float32 represents all integers up to 2**24, so 8/16-bit integers,
    float16 and float32 lose nothing; float64 and 32/64-bit integers keep
    float64, for their accuracy.
    """
    dtype = np.dtype(dtype)
    if dtype.kind == 'f' and dtype.itemsize <= 4:
        return np.dtype(np.float32)
    if dtype.kind in 'iu' and dtype.itemsize <= 2:
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def checked_mask(mask, shape: tuple[int, ...]) -> NDArray[np.bool_] | None:
    """Return the mask as booleans (nonzero = fitted), shape checked."""
    if mask is None:
        return None
    mask = as_numpy(as_array_like(mask, 'mask', check_dtype=False))
    if mask.shape != tuple(shape):
        raise ValueError(
            f'mask has shape {mask.shape} but the references have shape '
            f'{tuple(shape)}; the mask must have the shape of one reference'
        )
    return mask != 0


def check_stack(stack, ref_shape: tuple[int, ...]):
    """Return ``stack`` as an array-like whose last axes are ``ref_shape``."""
    stack = as_array_like(stack, 'stack')
    r = len(ref_shape)
    if stack.ndim < r or tuple(stack.shape[stack.ndim - r :]) != ref_shape:
        raise ValueError(
            f'stack has shape {tuple(stack.shape)} but the references have '
            f'shape {ref_shape}; the references must match the last {r} '
            'axes of the stack'
        )
    return stack


@dataclass(frozen=True, eq=False)
class References:
    """K checked reference images and the mask of fitted pixels.

    Attributes
    ----------
    images : (K, *shape) ndarray of float64
        Copies of the references (the caller's arrays are never touched).
    mask : (*shape) ndarray of bool or None
        Fitted pixels; None when every pixel is fitted.
    n_pixels : int
        Number of fitted pixels.
    """

    images: NDArray[np.float64]
    mask: NDArray[np.bool_] | None
    n_pixels: int

    @property
    def k(self) -> int:
        """Number of references."""
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one reference image."""
        return self.images.shape[1:]

    @property
    def names(self) -> list[str]:
        """How messages name them: ``ref1`` … ``refK``."""
        return reference_names(self.k)

    def fitted(self) -> NDArray[np.float64]:
        """Return the fitted pixels of each reference, ``(K, n_pixels)``."""
        flat = self.images.reshape(self.k, -1)
        return flat if self.mask is None else flat[:, self.mask.reshape(-1)]

    def same_images(self, other_images) -> bool:
        """Whether ``other_images`` are these references, pixel for pixel."""
        if len(other_images) != self.k:
            return False
        return all(
            np.array_equal(
                np.asarray(as_numpy(o), dtype=np.float64), self.images[i]
            )
            for i, o in enumerate(other_images)
        )


def checked_references(
    references, mask=None, *, what: str = 'the fit'
) -> References:
    """Check K references and a mask; copy them to float64.

    Parameters
    ----------
    references : sequence of (*shape) array_like
        At least one; all of one shape, real dtypes.
    mask : (*shape) array_like of bool, optional
        Fitted pixels (nonzero); all of them when None or all True.
    what : str
        What needs them, for the messages.

    Returns
    -------
    refs : References
        Checked float64 copies and the mask.

    Raises
    ------
    TypeError
        A reference of complex, boolean or non-numeric dtype.
    ValueError
        No reference, references of different shapes, a mask of another
        shape or selecting no pixel, NaN or inf in a fitted pixel.
    """
    names = reference_names(len(references))
    if not references:
        raise ValueError(f'{what} needs at least one reference image')
    arrays = [as_array_like(r, n) for r, n in zip(references, names)]
    shape = tuple(arrays[0].shape)
    for name, a in zip(names[1:], arrays[1:]):
        if tuple(a.shape) != shape:
            raise ValueError(
                f'{names[0]} has shape {shape} but {name} has shape '
                f'{tuple(a.shape)}; all references must have the same shape'
            )
    images = np.empty((len(arrays), *shape))
    for i, a in enumerate(arrays):
        images[i] = as_numpy(a)
    mask = checked_mask(mask, shape)
    if mask is not None:
        n = int(mask.sum())
        if n == 0:
            raise ValueError(
                'the mask selects no pixel; select the pixels to fit '
                '(nonzero) in the mask, or fit without one'
            )
        if mask.all():
            mask = None
    else:
        n = math.prod(shape)
    refs = References(images, mask, n)
    fitted = refs.fitted()
    finite = np.isfinite(fitted)
    for name, ok in zip(names, finite):
        if not ok.all():
            bad = int(ok.size - ok.sum())
            raise ValueError(
                f'{name} has {bad} NaN or inf value(s) in the fitted '
                'pixels; replace them or leave those pixels out with a mask'
            )
    return refs


def unit_cond(columns: NDArray[np.float64]) -> float:
    """Condition number of ``(m, n)`` rows scaled to unit norm (inf: 0 row).

    The ratio of the largest to the smallest singular value, from the QR
    of the columns (no Gram matrix, whose condition is the square).
    """
    norms = np.sqrt(np.einsum('ij,ij->i', columns, columns))
    if columns.shape[0] == 0:
        return 1.0
    if not np.all(norms > 0):
        return math.inf
    if columns.shape[0] == 1:
        return 1.0
    unit = columns / norms[:, None]
    r = np.linalg.qr(unit.T, mode='r')
    s = np.linalg.svd(r, compute_uv=False)
    return math.inf if s[-1] <= 0 else float(s[0] / s[-1])


def singular_cond(dtype: np.dtype) -> float:
    """Condition number from which a design is singular in ``dtype``.

    Beyond it the coefficients' rounding error exceeds ~1/64 of their
    scale: they would be rounding noise.
    """
    return 1.0 / (64.0 * float(np.finfo(dtype).eps))


def affine_distances(fitted: NDArray[np.float64]) -> NDArray[np.float64]:
    """Distance of each reference from the affine hull of the others.

    Parameters
    ----------
    fitted : (K, n) ndarray
        The references' fitted pixels.

    Returns
    -------
    (K,) ndarray
        ``‖R_k − P_k(R_k)‖`` with ``P_k`` the projection onto the affine
        hull of the other references (for K = 2 that is ``‖A − B‖``; for
        K = 1 the reference's own norm).
    """
    k = fitted.shape[0]
    if k == 1:
        return np.sqrt(np.einsum('ij,ij->i', fitted, fitted))
    out = np.empty(k)
    for i in range(k):
        others = np.delete(fitted, i, axis=0)
        base = others[-1]
        diffs = (others[:-1] - base).T  # (n, K - 2)
        target = fitted[i] - base
        if diffs.shape[1]:
            coef, *_ = np.linalg.lstsq(diffs, target, rcond=None)
            target = target - diffs @ coef
        out[i] = float(np.sqrt(target @ target))
    return out


def diagnose(references, mask=None, *, dtype=np.float64) -> dict[str, object]:
    """See :func:`napari_mixcoef.core.reference_diagnostics`."""
    refs = checked_references(references, mask, what='the diagnostics')
    fitted = refs.fitted()
    k = refs.k
    cond = unit_cond(fitted)
    distances = affine_distances(fitted)
    if k == 1:
        spread = distances
    else:
        spread = np.array(
            [
                np.linalg.norm(fitted[i] - np.delete(fitted, i, 0).mean(0))
                for i in range(k)
            ]
        )
    with np.errstate(divide='ignore', invalid='ignore'):
        unique = np.where(spread > 0, (distances / spread) ** 2, 0.0)
        per_noise = np.where(distances > 0, 1.0 / distances, np.inf)
    out: dict[str, object] = {
        'condition_number': cond,
        'unique_energy_fraction': np.minimum(unique, 1.0),
        'fraction_stderr_per_noise': per_noise,
        'collinear': bool(cond >= singular_cond(np.dtype(dtype))),
        'nearly_collinear': bool(cond > WARN_COND),
        'n_pixels': refs.n_pixels,
        'n_references': k,
    }
    if k == 2:
        a, b = fitted
        total = 2.0 * (float(a @ a) + float(b @ b))
        diff = a - b
        out['diff_energy_fraction'] = (
            float(diff @ diff) / total if total > 0 else 0.0
        )
        out['x_stderr_per_noise'] = float(per_noise[0])
        if a.size > 1 and np.std(a) > 0 and np.std(b) > 0:
            out['correlation'] = float(np.corrcoef(a, b)[0, 1])
        else:
            out['correlation'] = math.nan
    return out


def warn_if_ill_conditioned(
    refs: References, cond: float, stacklevel: int
) -> None:
    """Warn (CollinearityWarning) naming the least separable reference."""
    if cond <= WARN_COND:
        return
    fitted = refs.fitted()
    names = refs.names
    if refs.k == 2:
        a, b = fitted
        total = 2.0 * (float(a @ a) + float(b @ b))
        share = float((a - b) @ (a - b)) / total if total > 0 else 0.0
        message = (
            f'{names[0]} and {names[1]} are nearly collinear (condition '
            f'number {cond:.3g}; their difference holds {100 * share:.2g} % '
            'of their energy): x is poorly determined and sensitive to any '
            'change of brightness; see reference_diagnostics()'
        )
    else:
        distances = affine_distances(fitted)
        norms = np.sqrt(np.einsum('ij,ij->i', fitted, fitted))
        with np.errstate(divide='ignore', invalid='ignore'):
            share = np.where(norms > 0, distances / norms, 0.0)
        worst = int(np.argmin(share))
        others = ', '.join(n for i, n in enumerate(names) if i != worst)
        message = (
            f'{names[worst]} is nearly a combination of the other '
            f'references ({others}): only {100 * share[worst] ** 2:.2g} % '
            'of its energy lies outside them (condition number '
            f'{cond:.3g}), so its fraction is poorly determined; see '
            'reference_diagnostics()'
        )
    warnings.warn(message, CollinearityWarning, stacklevel=stacklevel)
