"""The three models for K references: names, design, fractions, image.

Every model is linear in its free parameters ``θ`` around the centre of
the references ``M = mean_k R_k``: a slice ``y`` is ``M + Dθ + noise``,
and the reported coefficients are ``β = β0 + Eθ``.

========  ==========================  =======================  ==========
model     image                       design columns ``D``     ``β``
========  ==========================  =======================  ==========
mix       ``Σ x_k R_k``, ``Σx_k = 1``  ``R_k − R_K``, k < K     fractions
scaled    ``Σ a_k R_k``                ``R_k``                  ``a``
offset    ``Σ a_k R_k + c``            ``R_k``, ``1``           ``a, c``
========  ==========================  =======================  ==========

For K = 2 the mix model reports ``x`` alone (its second fraction is
``1 − x``); from K = 3 on it reports all K fractions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ['MODELS', 'Model', 'make_model']

#: Coefficient names of each model with two references.
MODELS: dict[str, tuple[str, ...]] = {
    'mix': ('x',),
    'scaled': ('a', 'b'),
    'offset': ('a', 'b', 'c'),
}

#: Fewest references each model takes.
MIN_REFERENCES = {'mix': 2, 'scaled': 1, 'offset': 1}


def coefficient_names(model: str, k: int) -> tuple[str, ...]:
    """Names of the reported coefficients of ``model`` with k references."""
    if k == 2:
        return MODELS[model]
    if model == 'mix':
        return tuple(f'x{i + 1}' for i in range(k))
    if k == 1:
        return ('a',) if model == 'scaled' else ('a', 'c')
    names = tuple(f'a{i + 1}' for i in range(k))
    return names + (('c',) if model == 'offset' else ())


@dataclass(frozen=True, eq=False)
class Model:
    """One model with K references.

    Attributes
    ----------
    name : str
        ``"mix"``, ``"scaled"`` or ``"offset"``.
    n_references : int
        K.
    names : tuple of str
        Reported coefficients (``m`` of them).
    beta0 : (m,) ndarray
        Coefficients of the centre ``M`` itself (``θ = 0``).
    expand : (m, k) ndarray
        ``E``: reported coefficients from free parameters.
    weight0, weight_map : (K,) and (K, k) ndarray
        Each reference's weight in the image, ``w = w0 + Wθ``: the
        fractions (mix) or the ``a_k``.  ``constraint="nonneg"`` holds
        ``w ≥ 0`` (the offset ``c`` stays free).
    """

    name: str
    n_references: int
    names: tuple[str, ...]
    beta0: NDArray[np.float64]
    expand: NDArray[np.float64]
    weight0: NDArray[np.float64]
    weight_map: NDArray[np.float64]

    @property
    def k(self) -> int:
        """Number of free parameters (columns of the design)."""
        return self.expand.shape[1]

    @property
    def m(self) -> int:
        """Number of reported coefficients."""
        return self.expand.shape[0]

    def held(self, active: NDArray[np.bool_]) -> NDArray[np.bool_]:
        """Tell which reported coefficients active constraints hold fixed.

        Parameters
        ----------
        active : (n, K) ndarray of bool
            Weights at their bound.

        Returns
        -------
        (n, m) ndarray of bool
        """
        if self.name == 'mix' and self.n_references == 2:
            return active.any(axis=1, keepdims=True)  # x or 1 − x is 0
        out = np.zeros((active.shape[0], self.m), bool)
        out[:, : self.n_references] = active
        return out

    def snap(self, coef: NDArray, active: NDArray[np.bool_]) -> NDArray:
        """Coefficients with the weights at their bound exactly there.

        A constrained fit holds an active weight at 0 only to rounding; the
        reported coefficient is the bound itself (as ``nnls`` gives it).

        Parameters
        ----------
        coef : (n, m) ndarray
            Reported coefficients (modified in place and returned).
        active : (n, K) ndarray of bool
            Weights at their bound.
        """
        if self.name == 'mix' and self.n_references == 2:
            x = coef[:, 0]
            x[active[:, 0]] = 0.0
            x[active[:, 1]] = 1.0  # 1 − x is held at 0
            return coef
        block = coef[:, : self.n_references]
        block[active] = 0.0
        return coef

    def design(self, fitted: NDArray[np.float64]) -> NDArray[np.float64]:
        """Design columns as rows, ``(k, n)``, from fitted reference pixels.

        Parameters
        ----------
        fitted : (K, n) ndarray of float64
            The references over the fitted pixels.
        """
        if self.name == 'mix':
            return fitted[:-1] - fitted[-1]
        if self.name == 'scaled':
            return fitted.copy()
        return np.vstack([fitted, np.ones((1, fitted.shape[1]))])

    def weights(self, coef: NDArray) -> tuple[NDArray, NDArray | None]:
        """Each reference's weight in the model image, and the offset.

        Parameters
        ----------
        coef : (..., m) ndarray
            Reported coefficients.

        Returns
        -------
        weights : (..., K) ndarray
            ``x_k`` (mix) or ``a_k``.
        offset : (...) ndarray or None
            ``c`` for the offset model.
        """
        coef = np.asarray(coef)
        k = self.n_references
        if self.name == 'mix':
            if k == 2:
                x = coef[..., :1]
                return np.concatenate([x, 1.0 - x], axis=-1), None
            return coef, None
        offset = coef[..., k] if self.name == 'offset' else None
        return coef[..., :k], offset

    def fractions(
        self, coef: NDArray, cov: NDArray | None = None
    ) -> tuple[NDArray, NDArray | None]:
        """Each reference's share of the image, and its covariance.

        Parameters
        ----------
        coef : (n, m) ndarray
            Reported coefficients.
        cov : (n, m, m) ndarray, optional
            Their covariance.

        Returns
        -------
        fractions : (n, K) ndarray
            Mix: ``x_k``; scaled and offset: ``a_k / Σ_j a_j``.
        cov : (n, K, K) ndarray or None
            By the delta method with the full covariance.
        """
        w, _ = self.weights(coef)
        k = self.n_references
        if self.name == 'mix':
            jac = np.array([[1.0], [-1.0]]) if k == 2 else np.eye(k)  # (K, m)
            fcov = None if cov is None else jac @ cov @ jac.T
            return w, fcov
        total = w.sum(axis=-1, keepdims=True)
        with np.errstate(divide='ignore', invalid='ignore'):
            fractions = w / total
            if cov is None:
                return fractions, None
            # ∂f_i/∂a_j = (δ_ij − f_i) / Σa; ∂f/∂c = 0
            jac = np.zeros(coef.shape[:-1] + (k, self.m))
            jac[..., :, :k] = (np.eye(k) - fractions[..., :, None]) / total[
                ..., None
            ]
            fcov = jac @ cov @ np.swapaxes(jac, -1, -2)
        return fractions, fcov

    def image(self, coef: NDArray, images: NDArray, dtype) -> NDArray:
        """Model images for coefficients of shape ``(..., m)``.

        Parameters
        ----------
        coef : (..., m) array_like
            Reported coefficients, one row per slice.
        images : (K, *shape) ndarray
            The references.
        dtype : dtype
            Working float type of the result.

        Returns
        -------
        (..., *shape) ndarray
        """
        w, offset = self.weights(np.asarray(coef, dtype=np.float64))
        refs = np.asarray(images, dtype)
        out = np.tensordot(w.astype(dtype), refs, axes=(-1, 0))
        if offset is not None:
            expand = (Ellipsis,) + (np.newaxis,) * (refs.ndim - 1)
            out = out + offset.astype(dtype)[expand]
        return out


def check_model(name: str, k: int) -> None:
    """Raise ValueError for an unknown model or too few references."""
    if name not in MODELS:
        raise ValueError(
            f'unknown model {name!r}; choose one of '
            + ', '.join(repr(m) for m in MODELS)
        )
    need = MIN_REFERENCES[name]
    if k < need:
        raise ValueError(
            f'the {name!r} model needs at least {need} reference image'
            f'{"s" if need > 1 else ""}, got {k}'
            + (
                '; with one reference use model="scaled" or "offset"'
                if name == 'mix'
                else ''
            )
        )


def make_model(name: str, k: int) -> Model:
    """Return the model ``name`` for k references (checked)."""
    check_model(name, k)
    names = coefficient_names(name, k)
    weight0 = np.full(k, 1.0 / k)
    if name == 'mix':
        free = k - 1
        weight_map = np.vstack([np.eye(free), -np.ones((1, free))])
        expand = weight_map[:1] if k == 2 else weight_map
        beta0 = weight0[: expand.shape[0]]
    else:
        m = k + (name == 'offset')
        expand = np.eye(m)
        beta0 = np.zeros(m)
        beta0[:k] = weight0
        weight_map = expand[:k]
    return Model(name, k, names, beta0, expand, weight0, weight_map)
