"""The shifts' standard errors (step 4 of a registered fit)."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from ..model import shifts as sm
from ..model.design import meat_sample
from ..model.windows import base_of, window_runs
from .passes import Registration, _blocks, _keys, _on_threads, _read

__all__ = ['SPARSER', 'TERMS_COARSER', 'shift_errors']


def shift_errors(
    reg: Registration, stack, lead_shape, stderr: str, rho, backend
) -> NDArray[np.float64]:
    """Return the shifts' standard errors, ``(n, d)`` (NaN where failed).

    ``stderr="ols"``: ``σ̂²H⁻¹`` of the joint fit.  ``"auto"``: the
    sandwich with the spatial HAC terms of the noise kernel ``rho`` (the
    coefficients' own), from one more pass over the residuals (the
    backend's ``window_meat``), summed over a fixed sample of pixels
    (:func:`~.model.design.meat_sample`, :data:`SPARSER` times sparser than
    the coefficients') where a slice has many.
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
    # drawn as for SPARSER times the pixels: a share of the coefficients'
    sample, _ = meat_sample(
        inside, inside.size, SPARSER * n, reg.model.k + len(shape)
    )
    picked = designs.fitted if sample is None else np.flatnonzero(sample)
    scale = n / len(picked)
    where = np.searchsorted(designs.fitted, picked)  # in the terms
    keys, which = _keys(reg.key)
    coarse, twhich = _keys(np.array([_coarser(key) for key in keys]))
    twhich = twhich[which]
    which = designs.slots(keys)[which]
    wt = reg.dtype
    # C order: the kernel reads each row along the pixels
    columns = np.ascontiguousarray(designs.columns[:, :, picked], wt)
    terms = np.ascontiguousarray(
        np.stack(
            [designs.get(key).terms(rho, shape, where) for key in coarse]
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


#: The shift's meat sums over this many times fewer pixels than the
#: coefficients' (its P(P+1)/2 terms per pixel against their few): still
#: thousands on a large slice, which keeps the errors' coverage.
SPARSER = 2
#: The sandwich's terms vary slowly with the fractional shift: they are
#: shared by bins this many times wider than the design's (half a pixel).
TERMS_COARSER = sm.BINS // 2


def _coarser(key: tuple[int, ...]) -> tuple[int, ...]:
    """Return the bin whose sandwich terms bin ``key`` borrows.

    The centre of its half-pixel (keys run from ``−BINS/2`` to
    ``BINS/2 − 1``), so no bin is more than a quarter pixel from its
    terms' and both are bins the passes made.
    """
    half = TERMS_COARSER
    return tuple((k // half) * half + half // 2 for k in key)
