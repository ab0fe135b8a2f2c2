"""The result of a fit, :class:`MixFit`, and its table (CSV and JSON)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ['MixFit', 'provenance_path', 'write_csv', 'write_provenance']


def package_version() -> str:
    """Return the installed version (``"unknown"`` from a bare tree)."""
    try:
        from .._version import version
    except ImportError:  # a source tree that was never installed
        return 'unknown'
    return version


@dataclass(frozen=True, eq=False)
class MixFit:
    """Per-slice result of :func:`napari_mixcoef.fit_stack`.

    ``lead`` below is the leading (slice index) shape of the stack, ``m``
    the number of reported coefficients and ``K`` of references.

    Attributes
    ----------
    model : str
        ``"mix"``, ``"scaled"`` or ``"offset"``.
    names : tuple of str
        Coefficient names, ``m`` of them.
    coef, stderr : (*lead, m) ndarray of float64
        Coefficients and their standard errors (NaN where a constraint
        holds the coefficient at its bound).
    x, x_stderr : (*lead) ndarray of float64
        The first reference's share (``a / (a + b)`` for the free models
        with two references) and its standard error.
    r2 : (*lead) ndarray of float64
        Centred coefficient of determination, per slice.
    rmse : (*lead) ndarray of float64
        ``sqrt(SSR / n_pixels)``, per slice.
    n_pixels : int
        Number of fitted pixels per slice (the mask's count).
    n_references : int
        K.
    fractions, fractions_stderr : (*lead, K) ndarray of float64
        Each reference's share (mix: ``x_k``; scaled and offset:
        ``a_k / Σ_j a_j``) and its error (delta method, full covariance).
    at_bound : (*lead) ndarray of bool
        Where a constraint is active (all False without one).
    constraint : str or None
        ``"nonneg"`` or None.
    noise : str
        Noise model of the fit (``"gaussian"``, ``"poisson"``, ``"huber"``).
    stderr_mode : str
        ``"auto"`` (sandwich errors, robust to unequal variances and
        spatially correlated noise) or ``"ols"`` (textbook).
    noise_kernel : ndarray or None
        The noise's estimated spatial correlation ``ρ(h)`` (``"auto"``).
    detector : dict
        ``gain``, ``camera_offset``, ``read_noise`` of the fit.
    nan_policy : str
        ``"raise"`` or ``"omit"``.
    backend : str
        The backend that computed it (``"numba"``, ``"numpy"``).
    n_omitted : (*lead) ndarray of int64
        Non-finite pixels left out of each slice's fit (``"omit"``).
    notes : tuple of str
        What the fit had to decide for itself (e.g. independent noise
        assumed because too few pixels remained to estimate its
        correlation).
    shift, shift_stderr : (*lead, ndim) ndarray or None
        Registration (``register="translation"``); None without.
    registration_failed : (*lead) ndarray of bool or None
        Slices whose translation could not be estimated.
    """

    model: str
    names: tuple[str, ...]
    coef: NDArray[np.float64]
    stderr: NDArray[np.float64]
    x: NDArray[np.float64]
    x_stderr: NDArray[np.float64]
    r2: NDArray[np.float64]
    rmse: NDArray[np.float64]
    n_pixels: int
    n_references: int = 2
    fractions: NDArray[np.float64] | None = None
    fractions_stderr: NDArray[np.float64] | None = None
    at_bound: NDArray[np.bool_] | None = None
    constraint: str | None = None
    noise: str = 'gaussian'
    stderr_mode: str = 'ols'
    noise_kernel: NDArray[np.float64] | None = field(default=None, repr=False)
    detector: dict = field(default_factory=dict, repr=False)
    nan_policy: str = 'raise'
    backend: str = ''
    n_omitted: NDArray[np.int64] | None = field(default=None, repr=False)
    notes: tuple[str, ...] = ()
    register: str | None = None
    shift: NDArray[np.float64] | None = field(default=None, repr=False)
    shift_stderr: NDArray[np.float64] | None = field(default=None, repr=False)
    registration_failed: NDArray[np.bool_] | None = field(
        default=None, repr=False
    )
    _design: object = field(default=None, repr=False)
    _registration: object = field(default=None, repr=False)
    _residuals: Callable | None = field(default=None, repr=False)

    @property
    def lead_shape(self) -> tuple[int, ...]:
        """Shape of the leading (slice index) dimensions."""
        return self.x.shape

    def residuals(self, stack):
        """Return the lazy residual stack of this fit of ``stack``.

        See :func:`napari_mixcoef.residuals`; the references are the
        fit's own.
        """
        if self._residuals is None:
            raise RuntimeError('this fit does not know its references')
        return self._residuals(stack, self)

    def table(self) -> dict[str, NDArray]:
        """Return the per-slice columns of :meth:`to_csv`, flattened.

        Returns
        -------
        dict of str to (n_slices,) ndarray
            ``index_0``, ``index_1``, … (int64); with two references (or
            one) ``x``, ``x_stderr``, then each coefficient and its
            ``<name>_stderr`` (not repeated for ``"mix"``, whose
            coefficient is ``x``); with more, each fraction ``x1`` … ``xK``
            and its error, then (free models) each coefficient and its
            error; ``r2``, ``rmse``; ``at_bound`` when constrained and
            ``shift_0`` … with errors when registered.
        """
        n = self.x.size
        columns: dict[str, NDArray] = {}
        index = np.unravel_index(np.arange(n), self.lead_shape)
        for axis, values in enumerate(index):
            columns[f'index_{axis}'] = values.astype(np.int64)
        coef = self.coef.reshape(n, -1)
        stderr = self.stderr.reshape(n, -1)
        if self.n_references <= 2:
            columns['x'] = self.x.reshape(n)
            columns['x_stderr'] = self.x_stderr.reshape(n)
        else:
            fractions = self.fractions.reshape(n, -1)
            errors = self.fractions_stderr.reshape(n, -1)
            for j in range(self.n_references):
                columns[f'x{j + 1}'] = fractions[:, j]
                columns[f'x{j + 1}_stderr'] = errors[:, j]
        if self.model != 'mix':
            for j, name in enumerate(self.names):
                columns[name] = coef[:, j]
                columns[f'{name}_stderr'] = stderr[:, j]
        columns['r2'] = self.r2.reshape(n)
        columns['rmse'] = self.rmse.reshape(n)
        if self.constraint is not None:
            columns['at_bound'] = self.at_bound.reshape(n)
        if self.shift is not None:
            shift = self.shift.reshape(n, -1)
            shift_err = self.shift_stderr.reshape(n, -1)
            for j in range(shift.shape[1]):
                columns[f'shift_{j}'] = shift[:, j]
                columns[f'shift_{j}_stderr'] = shift_err[:, j]
        return columns

    def provenance(self) -> dict:
        """Return what the fit knows of how it was made, JSON-ready.

        Returns
        -------
        dict
            Package version, model, coefficient names and references,
            noise model and detector settings, error mode, constraint,
            registration, NaN policy and what it left out, pixels per
            slice and the slice layout, and the fit's notes.
            :meth:`to_csv` adds the caller's names (stack, references,
            mask) and writes it beside the table.
        """
        omitted = self.n_omitted
        return {
            'napari_mixcoef_version': package_version(),
            'model': self.model,
            'names': list(self.names),
            'n_references': int(self.n_references),
            'noise': self.noise,
            'detector': dict(self.detector),
            'stderr_mode': self.stderr_mode,
            'constraint': self.constraint,
            'register': self.register,
            'nan_policy': self.nan_policy,
            'backend': self.backend,
            'omitted_pixels': 0 if omitted is None else int(omitted.sum()),
            'slices_with_omitted_pixels': (
                0 if omitted is None else int(np.count_nonzero(omitted))
            ),
            'n_pixels': int(self.n_pixels),
            'lead_shape': list(self.lead_shape),
            'notes': list(self.notes),
        }

    def to_csv(
        self,
        path: str | os.PathLike,
        *,
        columns: dict[str, ArrayLike] | None = None,
        provenance: dict | None = None,
    ) -> None:
        """Write one row per slice to a CSV file, and a JSON file beside it.

        Parameters
        ----------
        path : str or path-like
            Output file; columns as in :meth:`table`.  Written as given
            (no suffix is added).
        columns : dict of str to (n_slices,) array_like, optional
            Extra columns appended after the fit's (e.g. ``"outlier"``).
        provenance : dict, optional
            Merged into :meth:`provenance` and written to ``<path without
            its suffix>.json``: e.g. ``"stack"``, ``"references"`` and
            ``"mask"`` names, ``"outliers"`` (flagged slice indices).
        """
        table = self.table()
        if columns:
            n = self.x.size
            for name, values in columns.items():
                values = np.asarray(values).reshape(-1)
                if values.size != n:
                    raise ValueError(
                        f'column {name!r} has {values.size} values but the '
                        f'fit has {n} slices; pass one value per slice'
                    )
                table[name] = values
        info = self.provenance()
        info.update(provenance or {})
        write_csv(path, table, provenance=info)


def write_csv(
    path: str | os.PathLike,
    columns: dict[str, ArrayLike],
    *,
    provenance: dict | None = None,
) -> None:
    """Write equal-length columns to a CSV file with a header row.

    Integers are written as such, floats with 10 significant digits (NaN
    as ``nan``), anything else as text (quoted where needed).  With
    ``provenance``, also write it as JSON to ``<path without its
    suffix>.json`` (numpy values converted).
    """
    import csv

    cells = []
    for values in columns.values():
        values = np.asarray(values)
        if values.dtype.kind in 'iub':
            cells.append(values.astype(np.int64).astype(str))
        elif values.dtype.kind == 'f':
            cells.append(np.char.mod('%.10g', values))
        else:
            cells.append(values.astype(str))
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f, lineterminator='\n')
        writer.writerow(list(columns))
        writer.writerows(zip(*cells))
    if provenance is not None:
        write_provenance(provenance_path(path), provenance)


def provenance_path(path: str | os.PathLike) -> str:
    """Return the JSON file written beside the CSV ``path`` (``.json``)."""
    root, _ = os.path.splitext(os.fspath(path))
    return root + '.json'


def write_provenance(path: str | os.PathLike, info: dict) -> None:
    """Write ``info`` as indented JSON, numpy scalars and arrays converted."""
    import datetime
    import json

    def plain(value):
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, np.ndarray):
            return plain(value.tolist())
        if isinstance(value, np.generic):
            return plain(value.item())
        if isinstance(value, float) and not math.isfinite(value):
            return None  # JSON has no NaN
        return value

    info = dict(info)
    info.setdefault(
        'written',
        datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec='seconds'
        ),
    )
    with open(path, 'w') as f:
        json.dump(plain(info), f, indent=2)
        f.write('\n')
