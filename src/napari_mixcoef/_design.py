"""The shared design: checked references, mask and the model's basis.

Everything about the references that every slice shares is computed once
here, and every input check that does not need the stack's pixels lives
here too, so that the library, the command line and the widget raise the
same errors.  Pure numpy.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ._chunks import as_numpy

#: Coefficient names of each model.
MODELS: dict[str, tuple[str, ...]] = {
    'mix': ('x',),
    'scaled': ('a', 'b'),
    'offset': ('a', 'b', 'c'),
}

# Above this condition number of the unit-normalised Gram matrix the
# references cannot be told apart: coefficients would be rounding noise.
_COLLINEAR_COND = 1e6
# Above this one (cosine similarity > 0.998) x is still computed, with a
# warning: its error is then dominated by how alike the references are.
_WARN_COND = 1e3


class CollinearityWarning(UserWarning):
    """The references are nearly collinear; x is poorly determined."""


@dataclass(frozen=True, eq=False)
class Design:
    """Everything about the references that every slice shares.

    ``basis`` holds ``u1 = A − B``, ``u2 = M − mean(M)`` and ``u3 = 1`` as
    rows of length ``n_ref`` (zero outside the mask), in the working dtype;
    ``transform`` (3 × k) maps basis coefficients to the model's design,
    ``D = basis.T @ transform``; ``coef0`` are the model's coefficients of
    ``M`` itself, so that ``coef = coef0 + δ`` where ``δ`` regresses the
    centred slice on ``D``.
    """

    model: str
    ref1: NDArray  # float64, reference shape
    ref2: NDArray
    mask: NDArray[np.bool_] | None
    n_pixels: int
    dtype: np.dtype  # working float type
    centre: NDArray  # M in the working dtype, reference shape
    basis: NDArray  # (3, n_ref) working dtype
    basis_gram: NDArray[np.float64]  # (3, 3)
    basis_u2_sum: float
    transform: NDArray[np.float64]  # (3, k)
    coef0: NDArray[np.float64]  # (k,)
    gram_inv: NDArray[np.float64]  # (k, k), inverse of DᵀD

    @property
    def k(self) -> int:
        return self.coef0.size


def check_real(name: str, dtype: np.dtype) -> None:
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
    if dtype.kind == 'f' and dtype.itemsize <= 4:
        return np.dtype(np.float32)
    if dtype.kind in 'iu' and dtype.itemsize <= 2:
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def normalised_cond(columns: list[NDArray[np.float64]]) -> float:
    """Condition number of the Gram matrix of unit-normalised columns."""
    norms = [float(np.sqrt(c @ c)) for c in columns]
    if min(norms) == 0.0:
        return math.inf
    if len(columns) == 2:
        # [[1, c], [c, 1]] has eigenvalues 1 ± |c|: no LAPACK call, which
        # cost ~0.25 ms of every fit's set-up
        c = abs(float(columns[0] @ columns[1])) / (norms[0] * norms[1])
        return math.inf if c >= 1.0 else (1.0 + c) / (1.0 - c)
    unit = np.stack([c / s for c, s in zip(columns, norms)])
    eig = np.linalg.eigvalsh(unit @ unit.T)
    return math.inf if eig[0] <= 0 else float(eig[-1] / eig[0])


def checked_references(ref1, ref2) -> tuple[NDArray, NDArray]:
    """Return both references as float64 copies, dtype and shape checked.

    Copies: the references are one slice each, and the caller's arrays
    must never be touched.
    """
    ref1 = as_array_like(ref1, 'ref1')
    ref2 = as_array_like(ref2, 'ref2')
    if ref1.shape != ref2.shape:
        raise ValueError(
            f'ref1 has shape {ref1.shape} but ref2 has shape {ref2.shape}; '
            'the two references must have the same shape'
        )
    return (
        np.array(as_numpy(ref1), dtype=np.float64),
        np.array(as_numpy(ref2), dtype=np.float64),
    )


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


def prepare(ref1, ref2, mask, model: str, stack_dtype: np.dtype) -> Design:
    """Check the references and mask; build the shared design."""
    if model not in MODELS:
        raise ValueError(
            f'unknown model {model!r}; choose one of '
            + ', '.join(repr(m) for m in MODELS)
        )
    a, b = checked_references(ref1, ref2)
    shape = a.shape
    mask = checked_mask(mask, shape)
    if mask is not None:
        n = int(mask.sum())
        if mask.all():
            mask = None
    else:
        n = math.prod(shape)
    k = len(MODELS[model])
    if n <= k:
        where = 'the mask selects' if mask is not None else 'the images have'
        raise ValueError(
            f'{where} {n} pixel(s), but the {model!r} model has {k} '
            f'coefficient(s) and needs more than {k} fitted pixels; '
            'select more pixels in the mask'
        )
    fa, fb = (a, b) if mask is None else (a[mask], b[mask])
    for name, v in (('ref1', fa), ('ref2', fb)):
        if not np.isfinite(v).all():
            bad = int(np.size(v) - np.isfinite(v).sum())
            raise ValueError(
                f'{name} has {bad} NaN or inf value(s) in the fitted pixels; '
                'replace them (e.g. np.nan_to_num) or leave them out with '
                'mask='
            )
    pair_cond = normalised_cond([fa.ravel(), fb.ravel()])
    if pair_cond > _COLLINEAR_COND:
        raise ValueError(
            'ref1 and ref2 are collinear (one is a multiple of the other '
            'over the fitted pixels; Gram condition number '
            f'{pair_cond:.3g}), so their mix cannot be told apart from a '
            'change of brightness; choose two references that differ in '
            'pattern'
        )
    if model == 'offset':
        cond = normalised_cond([fa.ravel(), fb.ravel(), np.ones(n)])
        if cond > _COLLINEAR_COND:
            raise ValueError(
                'ref1, ref2 and a constant offset are collinear (the '
                'references differ only by an offset and a scale; Gram '
                f'condition number {cond:.3g}); use model="scaled" or '
                '"mix", or choose references that differ in pattern'
            )

    if pair_cond > _WARN_COND:
        warnings.warn(
            f'ref1 and ref2 are nearly collinear (Gram condition number '
            f'{pair_cond:.3g}; their difference holds '
            f'{100 * _diff_fraction(fa, fb):.2g} % of their energy): x is '
            'poorly determined and sensitive to any change of brightness; '
            'see reference_diagnostics()',
            CollinearityWarning,
            stacklevel=4,
        )

    dtype = working_dtype(stack_dtype)
    centre64 = 0.5 * (a + b)
    # the mean as np.mean forms it (a sum over n), without its Python
    # layers: each numpy call of the set-up costs tens of µs with caches
    # cold from the previous pass, and the set-up is most of a small fit
    fitted = centre64 if mask is None else centre64[mask]
    centre_mean = float(fitted.sum() / n)
    basis64 = np.empty((3, a.size))
    np.subtract(a.ravel(), b.ravel(), out=basis64[0])
    np.subtract(centre64.ravel(), centre_mean, out=basis64[1])
    basis64[2] = 1.0
    if mask is not None:
        basis64[:, ~mask.ravel()] = 0.0
    basis = basis64.astype(dtype)
    # The Gram matrix of the basis as the kernel will use it (rounded to the
    # working dtype), accumulated in float64.
    used = basis.astype(np.float64)
    basis_gram = used @ used.T
    m = centre_mean
    transform = {
        'mix': np.array([[1.0], [0.0], [0.0]]),
        'scaled': np.array([[0.5, -0.5], [1.0, 1.0], [m, m]]),
        'offset': np.array([[0.5, -0.5, 0.0], [1.0, 1.0, 0.0], [m, m, 1.0]]),
    }[model]
    coef0 = {'mix': [0.5], 'scaled': [0.5, 0.5], 'offset': [0.5, 0.5, 0.0]}
    gram = transform.T @ basis_gram @ transform
    return Design(
        model=model,
        ref1=a,
        ref2=b,
        mask=mask,
        n_pixels=n,
        dtype=dtype,
        centre=centre64.astype(dtype),
        basis=basis,
        basis_gram=basis_gram,
        basis_u2_sum=float(used[1].sum()),
        transform=transform,
        coef0=np.array(coef0[model]),
        # 1 / g is what LAPACK gives for one coefficient, without its call
        gram_inv=np.linalg.inv(gram) if gram.shape[0] > 1 else 1.0 / gram,
    )


def check_stack(stack, ref_shape: tuple[int, ...]):
    stack = as_array_like(stack, 'stack')
    r = len(ref_shape)
    if stack.ndim < r or tuple(stack.shape[stack.ndim - r :]) != ref_shape:
        raise ValueError(
            f'stack has shape {tuple(stack.shape)} but the references have '
            f'shape {ref_shape}; the references must match the last {r} '
            'axes of the stack'
        )
    return stack


def _diff_fraction(a: NDArray, b: NDArray) -> float:
    """Share of the pair's energy along (A−B)/√2 in the avg/diff basis."""
    a, b = np.ravel(a), np.ravel(b)
    total = 2.0 * (float(a @ a) + float(b @ b))
    diff = a - b
    return float(diff @ diff) / total if total > 0 else 0.0


def diagnose(ref1, ref2, mask=None) -> dict[str, float | bool | int]:
    """See :func:`napari_mixcoef.core.reference_diagnostics`."""
    a, b = checked_references(ref1, ref2)
    mask = checked_mask(mask, a.shape)
    if mask is not None:
        a, b = a[mask], b[mask]
    a, b = a.ravel(), b.ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    diff = float(np.sqrt(np.sum((a - b) ** 2)))
    cond = normalised_cond([a, b]) if a.size else math.inf
    if a.size > 1 and np.std(a) > 0 and np.std(b) > 0:
        corr = float(np.corrcoef(a, b)[0, 1])
    else:
        corr = math.nan
    return {
        'diff_energy_fraction': _diff_fraction(a, b),
        'x_stderr_per_noise': 1.0 / diff if diff > 0 else math.inf,
        'correlation': corr,
        'condition_number': cond,
        'collinear': bool(cond > _COLLINEAR_COND),
        'nearly_collinear': bool(cond > _WARN_COND),
        'n_pixels': int(a.size),
    }
