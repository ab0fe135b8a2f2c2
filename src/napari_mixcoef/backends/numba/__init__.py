"""The compiled backend: numba kernels that read each pixel once.

numpy needs several passes over a block (cast, centre, a BLAS product,
squares, more products), each a read of the block; these kernels read each
pixel once, cast and centre it in a register and add it into every sum,
so a fit costs about one read of the stack.  They run on the engine's
threads (``nogil``).

numba is imported when this backend is first asked for, not with the
package: importing it and starting LLVM take seconds, which the widget
spends in a background thread (:meth:`NumbaBackend.warm_up`).  Kernel
bodies live in :mod:`.kernels` (the sums) and :mod:`.irls` (per-slice
fits of one-coefficient models), which import numba.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from ...model import downsample, spatial
from ...model.constraints import solve
from ...model.noise import BlockFit
from ...model.spatial import pack
from ...model.sums import SumsLayout, ssr_of, suspect

__all__ = ['DTYPES', 'NumbaBackend', 'make_backend']

#: Stack dtypes the kernels read directly (native byte order).  Others
#: (float16, big-endian data) go to the numpy backend.
DTYPES = frozenset(
    np.dtype(t)
    for t in (
        np.uint8,
        np.int8,
        np.uint16,
        np.int16,
        np.uint32,
        np.int32,
        np.uint64,
        np.int64,
        np.float32,
        np.float64,
    )
)


def make_backend():
    """Return the numba backend, or None when numba is not installed."""
    try:
        from . import irls, kernels, pixels, tiny, windows  # noqa: F401
    except ImportError:
        return None
    return NumbaBackend()


class NumbaBackend:
    """Compiled sums for every model; per-slice IRLS for one coefficient."""

    name = 'numba'

    def __init__(self) -> None:
        from . import irls, kernels, pixels, tiny, windows

        self._kernels = kernels
        self._windows = windows
        self._pixels = pixels
        self._irls = irls
        self._tiny = tiny
        self._lag_groups: dict = {}

    def supports(self, dtype, k, spec, constrained) -> bool:
        """Native stored dtypes; IRLS fits of one unconstrained coefficient.

        Gaussian fits of any model (their sums and residual passes are
        generic over the basis); Poisson and Huber fits go to numpy for
        more than one coefficient or with a constraint.
        """
        dtype = np.dtype(dtype)
        if dtype not in DTYPES or not dtype.isnative:
            return False
        return spec.noise == 'gaussian' or (k == 1 and not constrained)

    def _is_tiny(self, view) -> bool:
        """Whether slices are so small that they go side by side."""
        return view.fitted_index.size <= self._tiny.TINY_PIXELS

    def block_sums(self, y, view, sums) -> None:
        """Add each row's sums (one compiled pass) into ``sums``."""
        layout = sums.layout
        kernels = self._kernels
        if self._is_tiny(view):
            cols = np.array(
                [layout.s, layout.h, layout.yy, layout.hy, layout.hq]
            )
            if not layout.hac:
                cols[3:] = 0
            self._tiny.tiny_sums(
                y,
                view.centre,
                view.dtype.type(view.mean),
                view.basis,
                view.hac if layout.hac else None,
                view.fitted_index,
                sums.raw,
                cols,
            )
            return
        runs = view.runs(kernels.RUN)
        mean = view.dtype.type(view.mean)
        if layout.k == 1:
            cols = np.array(
                [0, layout.h, layout.s, layout.yy, layout.hy, layout.hq]
            )
            if not layout.hac:
                cols[4:] = 0
            small = y.dtype.kind in 'iu' and y.dtype.itemsize <= 2
            kernel = kernels.sums_single if small else kernels.sums_one
            kernel(
                y,
                view.centre,
                mean,
                view.basis[0],
                view.hac if layout.hac else None,
                runs,
                sums.raw,
                cols,
            )
            return
        if layout.hac:
            raise ValueError('the one-pass HAC sums are for one coefficient')
        cols = np.array([layout.s, layout.h, layout.yy, 0])
        kernels.sums_many(
            y, view.centre, mean, view.basis, runs, sums.raw, cols
        )

    def residual_sums(self, y, view, z, terms, out) -> None:
        """Add ``Σr²`` and ``Σr²·terms`` (one compiled pass) into ``out``."""
        if self._is_tiny(view):
            self._tiny.tiny_meat(
                y,
                view.centre,
                view.basis,
                np.ascontiguousarray(z, dtype=np.float64),
                terms,
                view.fitted_index,
                out,
            )
            return
        self._kernels.residual_sums(
            y,
            view.centre,
            view.basis,
            np.ascontiguousarray(z, dtype=np.float64),
            z.shape[1],
            terms,
            view.runs(self._kernels.RUN),
            out,
        )

    def fit_block(self, y, view, spec, constraint) -> BlockFit:
        """Fit whole slices: least squares by two passes, IRLS per slice.

        Least squares: the block's sums, each slice's (constrained) fit,
        then one pass over the block's residuals (from the cache) for SSR
        and the sandwich.  Poisson and Huber (one coefficient): each slice
        fitted in the L2 cache by :func:`.irls.fit_rows`.
        """
        if spec.noise == 'gaussian':
            return self._least_squares(y, view, spec, constraint)
        irls = self._irls
        auto = spec.stderr == 'auto'
        terms = view.terms[0] if auto else view.centre[:1]
        out = np.empty((y.shape[0], irls.WIDTH))
        irls.fit_rows(
            y,
            view.centre,
            view.basis[0],
            view.spread,
            np.ascontiguousarray(terms),
            view.runs(irls.CHUNK),
            np.ascontiguousarray(view.sample, dtype=np.int64),
            irls.constants(spec, view.dtype),
            irls.NOISE_CODES[spec.noise],
            auto,
            int(spec.iterations),
            int(view.n_pixels),
            out,
        )
        bread = None
        if spec.noise != 'gaussian' and (spec.noise == 'poisson' or auto):
            bread = out[:, irls.BREAD : irls.BREAD + 1].copy()
        return BlockFit(
            z=out[:, irls.Z : irls.Z + 1].copy(),
            meat=out[:, irls.MEAT : irls.MEAT + 1].copy(),
            bread=bread,
            sandwich=auto,
            ssr=out[:, irls.SSR].copy(),
            yy=out[:, irls.YY].copy(),
            s=out[:, irls.S].copy(),
            h=out[:, irls.H].copy(),
        )

    def _least_squares(self, y, view, spec, constraint) -> BlockFit:
        k = view.k
        sums = SumsLayout(k).empty(len(y))
        self.block_sums(y, view, sums)
        active = None
        if constraint is None:
            z = np.ascontiguousarray(sums.g)
        else:
            z, active = solve(sums.g, *constraint)
        ssr = ssr_of(sums, k, None if constraint is None else z)
        # where the difference of sums cancels (R² ≈ 1), explicit residuals,
        # run by run of such rows (views of the block, not a copy)
        bad = suspect(sums, ssr, view.dtype) & np.isfinite(ssr)
        for a, b in _runs_of_true(bad):
            exact = np.zeros((b - a, 1))
            self.residual_sums(y[a:b], view, z[a:b], None, exact)
            ssr[a:b] = exact[:, 0]
        auto = spec.stderr == 'auto'
        if auto:  # the meat, over the design's sample of pixels
            meat = self._meat(y, view, z)
        else:
            meat = ssr[:, None] * pack(np.eye(k))[None]
        return BlockFit(
            z=z,
            meat=meat,
            bread=None,
            sandwich=auto,
            ssr=np.maximum(ssr, 0.0),
            yy=sums.yy.copy(),
            s=sums.s.copy(),
            h=sums.h.copy(),
            active=active,
        )

    def _meat(self, y, view, z) -> NDArray:
        """``Σ r²·terms`` over the meat's sample, one compiled pass."""
        if self._is_tiny(view):  # every fitted pixel: no sample
            out = np.zeros((len(y), 1 + view.terms.shape[0]))
            self.residual_sums(y, view, z, view.terms, out)
            return out[:, 1:]
        terms = view.meat_terms
        centre, basis = view.meat_design
        out = np.zeros((len(y), terms.shape[0]))
        self._kernels.sampled_meat(
            y,
            view.sampled().runs(self._kernels.RUN),
            centre,
            basis,
            np.ascontiguousarray(z, dtype=np.float64),
            terms,
            out,
        )
        return out

    def fit_pixels(self, y, maps, out) -> None:
        """Each slice read once, its numbers written once (one call)."""
        centre, basis, var_coef, var_row, var_total = maps.working
        self._pixels.fit_pixels(
            y,
            maps.index,
            centre,
            basis,
            maps.lift,
            maps.beta0,
            var_coef,
            var_row,
            var_total,
            maps.kind,
            maps.n_references,
            maps.robust,
            maps.scale,
            out.coef,
            out.stderr,
            out.fractions,
            out.fractions_stderr,
            out.r2,
            out.rmse,
        )

    def lag_products(self, buf, n, offsets) -> NDArray:
        """Sum the lags in one compiled call, nine offsets per load."""
        key = offsets.tobytes()
        groups = self._lag_groups.get(key)
        if groups is None:
            # offsets in groups of nine neighbours, each from one start
            starts = []
            for o in offsets:
                if not starts or o > starts[-1] + 8:
                    starts.append(int(o))
            starts = np.array(starts, np.int64)
            group = np.searchsorted(starts, offsets, side='right') - 1
            if len(self._lag_groups) >= 8:
                self._lag_groups.clear()
            groups = starts, group * 9 + offsets - starts[group]
            self._lag_groups[key] = groups
        starts, pick = groups
        out = np.zeros((len(starts), 9))
        self._kernels.lag_products(buf, n, starts, out)
        return out.reshape(-1)[pick]

    def correlate(self, images, kernel) -> NDArray:
        """Compiled for 1-D and 2-D images (odd kernels), else scipy's."""
        images = np.asarray(images, dtype=np.float64)
        kernel = np.asarray(kernel, dtype=np.float64)
        if images.ndim == 2:  # 1-D images: rows of one pixel's height
            flat = self.correlate(images[:, None, :], kernel[None, :])
            return flat[:, 0, :]
        if images.ndim != 3 or not all(w % 2 for w in kernel.shape):
            return spatial.numpy_correlate(images, kernel)
        out = np.empty_like(images)
        self._kernels.correlate_rows(
            np.ascontiguousarray(images), np.ascontiguousarray(kernel), out
        )
        return out

    def window_products(
        self, y, base, which, runs, centre, columns, b, yy
    ) -> None:
        """Each slice's products over its moved box, one compiled pass."""
        self._windows.window_products(
            y, base, which, _by_bin(which), runs, centre, columns, b, yy
        )

    def window_fill(self, y, base, which, runs, coef, rows, out) -> None:
        """Each registered slice in one compiled pass."""
        self._windows.window_fill(
            y, base, which, _by_bin(which), runs, coef, rows, out
        )

    def window_meat(
        self, y, base, which, runs, v, columns, twhich, terms, out
    ) -> None:
        """Each slice's residual sums over its moved box, one pass."""
        order = np.lexsort((twhich, which))
        self._windows.window_meat(
            y, base, which, order, runs, v, columns, twhich, terms, out
        )

    def block_means(self, y, factor, out) -> None:
        """Compiled for 1-D and 2-D images, else the numpy reference."""
        if y.ndim == 2:  # 1-D images: rows of one pixel's height
            self._windows.block_means(
                y[:, None, :], 1, factor, out[:, None, :]
            )
        elif y.ndim == 3:
            self._windows.block_means(y, factor, factor, out)
        else:
            out[...] = downsample.block_means(y, factor, y.ndim - 1)

    def warm_up(self) -> None:
        """Nothing here: :func:`napari_mixcoef.core.warm_up` runs fits."""


def _by_bin(which: NDArray) -> NDArray[np.intp]:
    """Rows in the order of their bins (slices of a bin one after another)."""
    return np.argsort(which, kind='stable')


def _runs_of_true(flags: NDArray[np.bool_]) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of consecutive True values."""
    if not flags.any():  # the common case: no diff, no lists
        return []
    edges = np.flatnonzero(np.diff(flags.astype(np.int8), prepend=0, append=0))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))
