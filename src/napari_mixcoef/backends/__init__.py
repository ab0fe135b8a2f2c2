"""One interface, one home per backend: numpy (the reference) and numba.

A backend reduces blocks of slices, read as stored (any real dtype, 2-D
``(rows, n_px)`` C-ordered), against a :class:`~..model.design.DesignView`:

``block_sums(y, view, sums)``
    add each row's ``Qᵀy_c``, ``Σy_c²`` (and with ``sums.layout.hac`` the
    one-pass HAC sums, from ``view.hac``) into ``sums`` (its rows match
    ``y``'s);
``residual_sums(y, view, z, terms, out)``
    add ``Σr²`` and ``Σr²·terms[m]`` of ``r = y_c − Q_k z`` into ``out``
    (rows, 1 + P); ``terms`` (P, n_px) or None;
``fit_block(y, view, spec, constraint)``
    fit whole slices by the noise model's estimator:
    :class:`~..model.noise.BlockFit`;
``fit_pixels(y, maps, out)``
    fit slices of a few pixels one by one and write their reported
    numbers (:func:`~..model.pixelwise.fit_pixels`);
``lag_products(buf, n, offsets)``
    the lag sums of :func:`~..model.spatial.noise_correlation`;
``correlate(images, kernel)``
    the images of :func:`~..model.spatial.smoothed` (the sandwich terms);
``window_products(y, base, which, runs, centre, columns, b, yy)``
    the registration's products of slices read over a moved box
    (:mod:`~..model.windows`);
``window_fill(y, base, which, runs, coef, rows, out)``
    the registered slices: read over a moved box plus a correction;
``window_meat(y, base, which, runs, v, columns, twhich, terms, out)``
    the sandwich sums ``Σ r²·terms`` of the joint fit's residuals;
``block_means(y, factor, out)``
    the coarse estimate's block means of images ``y`` (m, *shape);
``supports(dtype, k, spec, constrained)``
    whether it does all of the above for a fit like that.

The engine asks :func:`select` for the backend of each fit: the one the
caller or the environment (``NAPARI_MIXCOEF_BACKEND=numpy|numba``, read
once; ``NAPARI_MIXCOEF_KERNEL=numpy`` is an old alias) prefers when it
supports the fit, else numpy.  Backends are registered by name with a
factory that is called on first use (numba is imported only then).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

__all__ = ['BACKENDS', 'Backend', 'get_backend', 'register', 'select']


class Backend(Protocol):
    """What every backend offers (see the module notes)."""

    name: str

    def supports(
        self, dtype: np.dtype, k: int, spec, constrained: bool
    ) -> bool:
        """Whether this backend does every step of such a fit."""

    def block_sums(self, y: NDArray, view, sums) -> None:
        """Add each row's sums into ``sums`` (rows of ``y``)."""

    def residual_sums(
        self, y: NDArray, view, z: NDArray, terms, out: NDArray
    ) -> None:
        """Add ``Σr²`` and ``Σr²·terms`` of explicit residuals into ``out``."""

    def fit_block(self, y: NDArray, view, spec, constraint):
        """Fit whole slices by the noise model's estimator."""

    def fit_pixels(self, y: NDArray, maps, out) -> None:
        """Fit slices of a few pixels and write their numbers into ``out``."""

    def lag_products(self, buf: NDArray, n: int, offsets: NDArray) -> NDArray:
        """``Σ_{p<n} buf[p]·buf[p+o]`` for each offset."""

    def correlate(self, images: NDArray, kernel: NDArray) -> NDArray:
        """Each image correlated with the kernel, zero outside it."""

    def window_products(
        self, y, base, which, runs, centre, columns, b, yy
    ) -> None:
        """Add each slice's products over its moved box into ``b``, ``yy``."""

    def window_fill(self, y, base, which, runs, coef, rows, out) -> None:
        """Write each slice over its moved box plus its correction."""

    def window_meat(
        self, y, base, which, runs, v, columns, twhich, terms, out
    ) -> None:
        """Add each slice's ``Σ r²·terms`` over its moved box to ``out``."""

    def block_means(self, y: NDArray, factor: int, out: NDArray) -> None:
        """Write the means of ``factor``-sided blocks of ``y`` into ``out``."""

    def warm_up(self) -> None:
        """Prepare (compile) what the default fits use."""


_FACTORIES: dict[str, Callable[[], Backend | None]] = {}
_MADE: dict[str, Backend | None] = {}
_LOCK = threading.Lock()
_PREFERRED: list[str] = []  # the environment's choice, read once


def register(name: str, factory: Callable[[], Backend | None]) -> None:
    """Register a backend factory (called once, on first use).

    The factory returns the backend, or None when what it needs is not
    installed.
    """
    with _LOCK:
        _FACTORIES[name] = factory
        _MADE.pop(name, None)


def _numpy_factory() -> Backend:
    from .numpy import NumpyBackend

    return NumpyBackend()


def _numba_factory() -> Backend | None:
    from .numba import make_backend

    return make_backend()


register('numpy', _numpy_factory)
register('numba', _numba_factory)

#: Registered backend names.
BACKENDS = tuple(_FACTORIES)


def get_backend(name: str) -> Backend | None:
    """Return the backend ``name`` (made once), or None if unavailable.

    Raises
    ------
    ValueError
        An unknown name.
    """
    if name not in _FACTORIES:
        raise ValueError(
            f'unknown backend {name!r}; choose one of '
            + ', '.join(repr(n) for n in _FACTORIES)
        )
    if name not in _MADE:
        with _LOCK:
            if name not in _MADE:
                _MADE[name] = _FACTORIES[name]()
    return _MADE[name]


def preferred() -> str:
    """Return the environment's backend (read once)."""
    if not _PREFERRED:
        name = os.environ.get('NAPARI_MIXCOEF_BACKEND', '').strip().lower()
        if not name and os.environ.get('NAPARI_MIXCOEF_KERNEL') == 'numpy':
            name = 'numpy'
        _PREFERRED.append(name or 'numba')
    return _PREFERRED[0]


def select(
    name: str | None, dtype: np.dtype, k: int, spec, constrained: bool
) -> Backend:
    """Return the backend of one fit: ``name`` or the preferred one, if able.

    Parameters
    ----------
    name : str or None
        Asked for by the caller; None: the environment's choice.
    dtype : dtype
        The stack's dtype.
    k : int
        Free parameters of the model.
    spec : NoiseSpec
        Noise model and error mode.
    constrained : bool
        Whether a constraint applies.

    Raises
    ------
    ValueError
        ``name`` is unknown, or was asked for and is not installed.
    """
    asked = name
    name = name or preferred()
    backend = get_backend(name)
    if backend is None:
        if asked is not None:
            raise ValueError(
                f'the {name!r} backend is not available (is {name} '
                'installed?); use backend="numpy"'
            )
        backend = get_backend('numpy')
    if backend.supports(np.dtype(dtype), k, spec, constrained):
        return backend
    return get_backend('numpy')
