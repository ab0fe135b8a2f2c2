"""The panels of the coefficient plot: each draws one quantity of a line.

A :class:`Line` is the slices of a fit along the plotted axis at the
sliders' position on any further leading axis.  A panel is told the line,
what was fitted and the theme's colours, and draws into one matplotlib
axes; it holds no state and knows nothing of Qt or napari.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import offset_copy

from napari_mixcoef.outliers import find_outliers

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from napari_mixcoef import MixFit

    from .record import FitSource

#: Half-width of the confidence band, in standard errors (95 %).
BAND_Z = 1.96
# the band's outline, in points: keeps it visible however small the error
_BAND_EDGE = 2.5
# the band's opacity by theme type: napari's light "current" is pale
_BAND_ALPHA = {'dark': 0.55, 'light': 0.9}
#: How the plot states find_outliers' rule (its default z and r2_drop).
OUTLIER_RULE = 'outlier: low R², or x > 5 SE off its neighbours'
#: The shares' colours with three or more references, by their order
#: (matplotlib's tab10, readable on napari's dark and light themes).
SHARE_COLORS = (
    '#1f77b4',
    '#ff7f0e',
    '#2ca02c',
    '#d62728',
    '#9467bd',
    '#8c564b',
    '#e377c2',
    '#bcbd22',
)
# the shift's axes: apart from the shares' colours and the cursor's yellow
_SHIFT_COLORS = ('#17becf', '#e377c2', '#9467bd')
# a coloured band is drawn lighter than the theme's one-line band, with
# a wider outline: a halo around its line however small the error
_SERIES_BAND_ALPHA = 0.35
_SERIES_BAND_EDGE = 4.0


@dataclass(frozen=True)
class Line:
    """One line of a fit: its slices along the plotted axis.

    Attributes
    ----------
    index : (n,) ndarray of int
    where : tuple of int
        The further leading indices the line was taken at.
    x, x_stderr, r2 : (n,) ndarray of float64
        Non-finite values as NaN.
    coef, stderr : (n, k) ndarray of float64
    names : tuple of str
        The coefficients' names.
    outliers : (n,) ndarray of bool
        :func:`~napari_mixcoef.outliers.find_outliers` of the line.
    fractions, fractions_stderr : (n, K) ndarray of float64
        Each reference's share and its error.
    at_bound : (n,) ndarray of bool
        Where a constraint holds a share at its bound.
    shift, shift_stderr : (n, ndim) ndarray of float64 or None
        Each slice's translation and its error (registered fits).
    registration_failed : (n,) ndarray of bool or None
        Slices whose translation could not be estimated.
    """

    index: np.ndarray
    where: tuple[int, ...]
    x: np.ndarray
    x_stderr: np.ndarray
    r2: np.ndarray
    coef: np.ndarray
    stderr: np.ndarray
    names: tuple[str, ...]
    outliers: np.ndarray
    fractions: np.ndarray
    fractions_stderr: np.ndarray
    at_bound: np.ndarray
    shift: np.ndarray | None = None
    shift_stderr: np.ndarray | None = None
    registration_failed: np.ndarray | None = None

    @property
    def n_references(self) -> int:
        """K, the number of references."""
        return self.fractions.shape[1]

    @classmethod
    def of(cls, fit: MixFit, where: tuple[int, ...] = ()) -> Line:
        """Return the line of `fit` at further leading indices `where`."""
        key = (slice(None), *where)

        def finite(a) -> np.ndarray:
            a = np.asarray(a[key], dtype=np.float64)
            return np.where(np.isfinite(a), a, np.nan)

        x, x_stderr, r2 = finite(fit.x), finite(fit.x_stderr), finite(fit.r2)
        if fit.fractions is not None:
            fractions = finite(fit.fractions)
            fractions_stderr = finite(fit.fractions_stderr)
        else:  # a fit made before K references: its x and 1 − x
            fractions = np.stack([x, 1 - x], axis=-1)
            fractions_stderr = np.stack([x_stderr, x_stderr], axis=-1)
        at_bound = (
            np.zeros(x.shape, bool)
            if fit.at_bound is None
            else np.asarray(fit.at_bound[key], bool)
        )
        registered = fit.shift is not None
        failed = fit.registration_failed
        return cls(
            shift=finite(fit.shift) if registered else None,
            shift_stderr=finite(fit.shift_stderr) if registered else None,
            registration_failed=(
                None
                if not registered
                else np.zeros(x.shape, bool)
                if failed is None
                else np.asarray(failed[key], bool)
            ),
            index=np.arange(x.size),
            where=tuple(where),
            x=x,
            x_stderr=x_stderr,
            r2=r2,
            coef=finite(fit.coef),
            stderr=finite(fit.stderr),
            names=tuple(fit.names),
            outliers=find_outliers(x, x_stderr, r2),
            fractions=fractions,
            fractions_stderr=fractions_stderr,
            at_bound=at_bound,
        )


def _band(
    ax: Axes,
    line: Line,
    value,
    error,
    colors,
    gid: str,
    style: str = '-',
    color: str | None = None,
) -> list:
    """Draw value ± 1.96 SE as a band under its line; return both ends.

    The line's gid is `gid`, the band's ``gid + " band"``; `color` colours
    both (default: the theme's text and highlight colours).
    """
    index = line.index
    lo, hi = value - BAND_Z * error, value + BAND_Z * error
    if index.size == 1:  # one slice: an error bar through its point
        index = index[0] + np.array([-0.04, 0.04])
        lo, hi = lo.repeat(2), hi.repeat(2)
    band = color or colors['current']
    ax.fill_between(
        index,
        lo,
        hi,
        facecolor=band,
        edgecolor=band,
        linewidth=_SERIES_BAND_EDGE if color else _BAND_EDGE,
        alpha=(
            _SERIES_BAND_ALPHA
            if color
            else _BAND_ALPHA.get(colors['type'], 0.55)
        ),
        zorder=1,
        gid=f'{gid} band',
    )
    ax.plot(
        line.index,
        value,
        color=color or colors['text'],
        linewidth=1.0,
        linestyle=style,
        marker='o' if line.index.size == 1 else None,
        markersize=4,
        zorder=2,
        gid=gid,
    )
    return [lo, hi]


def _mark_outliers(ax: Axes, line: Line, value, colors: dict) -> None:
    flagged = line.outliers
    ax.plot(
        line.index[flagged],
        value[flagged],
        linestyle='none',
        marker='o',
        markersize=5,
        markerfacecolor=colors['error'],
        markeredgecolor=colors['text'],
        zorder=3,
        gid='outliers',
    )


def _set_ylim(ax: Axes, *values) -> None:
    finite = np.concatenate([np.ravel(v) for v in values])
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        ax.set_ylim(0, 1)
        return
    lo, hi = float(finite.min()), float(finite.max())
    pad = 0.05 * (hi - lo) or 0.05 * max(abs(hi), 1e-3)
    ax.set_ylim(lo - pad, hi + pad)


def _short(name: str, n: int = 16) -> str:
    return name if len(name) <= n else name[: n - 1] + '…'


def _names(source: FitSource, k: int) -> tuple[str, ...]:
    """Return the K references' names (numbered past the source's)."""
    names = tuple(source.references)
    return names[:k] + tuple(
        f'reference {i + 1}' for i in range(len(names), k)
    )


class SharePanel:
    """Each reference's share of the mix, with its 95 % band.

    With two references that is the first one's share ``x`` (the other's
    is 1 − x); with more, one coloured line per reference, named after
    its layer in the legend.
    """

    height = 2.2
    name = 'share'

    def wanted(self, fit: MixFit, coefficients: bool) -> bool:
        """Tell whether to show the panel: always."""
        return True

    def series(self, line: Line, source: FitSource) -> list[tuple]:
        """Return ``(reference name, share, its error)`` of each share."""
        if line.n_references <= 2:
            return [(source.references[0], line.x, line.x_stderr)]
        names = _names(source, line.n_references)
        return [
            (names[k], line.fractions[:, k], line.fractions_stderr[:, k])
            for k in range(line.n_references)
        ]

    @staticmethod
    def color(k: int, n: int) -> str | None:
        """Return the colour of share `k` of `n` (None: the theme's)."""
        return None if n == 1 else SHARE_COLORS[k % len(SHARE_COLORS)]

    def draw(self, ax: Axes, line: Line, source: FitSource, colors) -> None:
        """Draw the shares, their bands and the outlier marks."""
        ends = []
        series = self.series(line, source)
        for k, (name, value, error) in enumerate(series):
            color = self.color(k, len(series))
            ends += _band(
                ax,
                line,
                value,
                error,
                colors,
                f'share of {name}',
                color=color,
            )
        # the rule is x's (the first share's): marked on its line
        _mark_outliers(ax, line, series[0][1], colors)
        _set_ylim(ax, *ends)
        if len(series) == 1:
            ax.set_ylabel(f'share of\n{_short(series[0][0])}')
        else:
            ax.set_ylabel('share')

    def legend(self, line: Line, source: FitSource, colors) -> list:
        """``(handle, label)`` pairs for the plot's legend row."""
        series = self.series(line, source)
        if len(series) == 1:
            lines = [
                (
                    Line2D([], [], color=colors['text'], linewidth=1.0),
                    f'x: share of "{_short(series[0][0], 24)}"',
                )
            ]
            band = colors['current']
            alpha = _BAND_ALPHA.get(colors['type'], 0.55)
        else:
            lines = [
                (
                    Line2D(
                        [],
                        [],
                        color=self.color(k, len(series)),
                        linewidth=1.5,
                    ),
                    _short(name, 20),
                )
                for k, (name, _, _) in enumerate(series)
            ]
            band, alpha = colors['secondary'], 0.6
        return [
            *lines,
            (
                Patch(facecolor=band, alpha=alpha, linewidth=0),
                '95 % interval',
            ),
            (
                Line2D(
                    [],
                    [],
                    linestyle='none',
                    marker='o',
                    markersize=5,
                    markerfacecolor=colors['error'],
                    markeredgecolor=colors['text'],
                ),
                OUTLIER_RULE,
            ),
        ]


class CoefficientPanel:
    """Coefficients of the free models (``a, b``, or ``c``), on demand."""

    height = 1.3

    def __init__(self, names: tuple[str, ...], label: str) -> None:
        self.names = names
        self.name = ', '.join(names)
        self.label = label

    def wanted(self, fit: MixFit, coefficients: bool) -> bool:
        """Shown when asked, for fits that have these coefficients."""
        return coefficients and any(n in fit.names for n in self.names)

    def draw(self, ax: Axes, line: Line, source: FitSource, colors) -> None:
        """Draw each coefficient and its band, named at its right end."""
        ends, shown = [], []
        for name, style in zip(self.names, ('-', '--', ':')):
            if name not in line.names:
                continue
            j = line.names.index(name)
            value, error = line.coef[:, j], line.stderr[:, j]
            ends += _band(ax, line, value, error, colors, name, style)
            shown.append(
                (Line2D([], [], color=colors['text'], linestyle=style), name)
            )
        _set_ylim(ax, *ends)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=2))
        ax.set_ylabel(self.label)
        if len(shown) > 1:  # which line is which
            _legend(ax, shown, colors, framed=False)


class ShiftPanel:
    """Each slice's translation along each reference axis, 95 % bands.

    Shown for registered fits; slices whose registration failed are
    marked with a cross on the zero line.
    """

    height = 1.2
    name = 'shift'

    def wanted(self, fit: MixFit, coefficients: bool) -> bool:
        """Tell whether to show the panel: for registered fits."""
        return fit.shift is not None

    @staticmethod
    def axis_names(ndim: int) -> tuple[str, ...]:
        """Name the reference axes as napari does for images (…, y, x)."""
        names = ('z', 'y', 'x')
        return names[-ndim:] if ndim <= 3 else tuple(map(str, range(ndim)))

    def draw(self, ax: Axes, line: Line, source: FitSource, colors) -> None:
        """Draw each axis' shift and band; mark the failed slices."""
        ends, shown = [], []
        names = self.axis_names(line.shift.shape[1])
        for j, (name, style) in enumerate(zip(names, ('-', '--', ':'))):
            value, error = line.shift[:, j], line.shift_stderr[:, j]
            color = _SHIFT_COLORS[j] if len(names) > 1 else None
            ends += _band(
                ax,
                line,
                value,
                error,
                colors,
                f'shift {name}',
                style,
                color=color,
            )
            shown.append(
                (
                    Line2D(
                        [], [], color=color or colors['text'], linestyle=style
                    ),
                    f'along {name}',
                )
            )
        failed = line.registration_failed
        ax.plot(
            line.index[failed],
            np.zeros(int(failed.sum())),
            linestyle='none',
            marker='x',
            markersize=6,
            color=colors['error'],
            zorder=3,
            gid='registration failed',
        )
        if failed.any():
            shown.append(
                (
                    Line2D(
                        [],
                        [],
                        linestyle='none',
                        marker='x',
                        color=colors['error'],
                    ),
                    f'failed ({int(failed.sum())})',
                )
            )
        _set_ylim(ax, 0.0, *ends)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=3))
        ax.set_ylabel('shift\n(px)')
        # framed: the lines pass under it, the names stay readable
        _legend(ax, shown, colors, framed=True)


def _legend(ax, shown: list, colors: dict, *, framed: bool) -> None:
    """One row of ``(handle, name)`` pairs at a panel's top right."""
    frame = (
        {
            'frameon': True,
            'facecolor': colors['foreground'],
            'edgecolor': colors['secondary'],
            'framealpha': 0.85,
            'borderaxespad': 0.2,
            'borderpad': 0.2,
        }
        if framed
        else {'frameon': False, 'borderaxespad': 0.1}
    )
    ax.legend(
        *zip(*shown),
        loc='upper right',
        fontsize=7,
        ncol=len(shown),
        labelcolor=colors['text'],
        handlelength=2.0,
        **frame,
    )


class R2Panel:
    """Each slice's R², with the outliers marked."""

    height = 0.8
    name = 'R²'

    def wanted(self, fit: MixFit, coefficients: bool) -> bool:
        """Tell whether to show the panel: always."""
        return True

    def draw(self, ax: Axes, line: Line, source: FitSource, colors) -> None:
        """Draw R² and the outlier marks."""
        ax.plot(
            line.index,
            line.r2,
            color=colors['text'],
            linewidth=1.0,
            marker='o' if line.index.size == 1 else None,
            markersize=4,
            gid='R²',
        )
        _mark_outliers(ax, line, line.r2, colors)
        _set_ylim(ax, line.r2)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=2))
        ax.set_ylabel('R²')


def legend_row(fig, handles, labels, colors, *, x: float, y: float) -> None:
    """One row of figure legend entries, placed in points.

    ``x >= 0``: from the left edge, else from the right; ``y < 0``: down
    from the top edge, else up from the bottom.
    """
    left, top = x >= 0, y < 0
    fig.legend(
        handles,
        labels,
        loc=('upper ' if top else 'lower ') + ('left' if left else 'right'),
        bbox_to_anchor=(0 if left else 1, 1 if top else 0),
        bbox_transform=offset_copy(
            fig.transFigure, fig, x=x, y=y, units='points'
        ),
        ncol=len(handles),
        frameon=False,
        fontsize=7.5,
        labelcolor=colors['text'],
        handlelength=1.4,
        columnspacing=1.2,
        borderpad=0,
        borderaxespad=0,
    )


def default_panels() -> list:
    """Return the plot's panels, top to bottom."""
    return [
        SharePanel(),
        CoefficientPanel(('a', 'b'), 'a, b'),
        CoefficientPanel(('c',), 'c'),
        ShiftPanel(),
        R2Panel(),
    ]
