"""The registered stack the engine fits (step 3 of a registered fit)."""

from __future__ import annotations

import math

import numpy as np

from ..model import shifts as sm
from ..model.windows import base_of, window_runs
from .passes import Registration

__all__ = ['RegisteredStack']


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
            sm.correction_rows(design, out=self._rows[j])

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
