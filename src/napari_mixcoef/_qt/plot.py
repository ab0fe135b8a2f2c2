"""Themed matplotlib plot of a fit's mixing coefficient against the slice."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backend_bases import MouseButton
from matplotlib.backends.backend_qtagg import (
    FigureCanvasQTAgg,
    NavigationToolbar2QT,
)
from matplotlib.figure import Figure
from qtpy.QtCore import QSize
from qtpy.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from ..outliers import find_outliers

if TYPE_CHECKING:
    import napari
    from matplotlib.backend_bases import DrawEvent, MouseEvent

    from ..core import MixFit

__all__ = ['CoefficientPlot']

# Half-width of the confidence band, in standard errors (95 %).
_BAND_Z = 1.96


class _Toolbar(NavigationToolbar2QT):
    """Navigation toolbar with the view buttons only."""

    toolitems = [
        item
        for item in NavigationToolbar2QT.toolitems
        if item[0] in ('Home', 'Back', 'Forward', 'Pan', 'Zoom')
    ]


def _decimals(error: float) -> int:
    """Decimals that show the first significant digit of `error` (>= 3)."""
    if not (math.isfinite(error) and error > 0):
        return 3
    return min(8, max(3, -math.floor(math.log10(error))))


class CoefficientPlot(QWidget):
    """Mixing coefficient and R² of a fit against the slice index.

    The top panel shows ``x`` with a ±1.96 standard error band, the bottom
    panel R², both against the index of the fit's first leading axis.
    Outliers (:func:`~napari_mixcoef.outliers.find_outliers`) are marked in
    both panels.  A vertical cursor follows the viewer's dims slider (by
    blitting, without redrawing the figure); clicking a panel moves the
    slider there, and hovering shows the slice's values below the plot.
    Colours follow the viewer's theme.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer whose dims slider the plot follows and drives.
    parent : QWidget, optional
        Parent widget.

    Attributes
    ----------
    figure : matplotlib.figure.Figure
        The figure holding both panels.
    canvas : FigureCanvasQTAgg
        Its Qt canvas.
    axes_x, axes_r2 : matplotlib.axes.Axes
        The mixing-coefficient panel and the R² panel (shared x axis).
    """

    def __init__(
        self, viewer: napari.viewer.Viewer, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self._viewer = viewer
        self._fit: MixFit | None = None
        self._first_axis = 0
        self._title = ''
        self._other_index: tuple[int, ...] = ()
        self._line: dict[str, np.ndarray] = {}
        self._outliers = np.zeros(0, dtype=bool)
        self._background = None
        self._saving = False
        self._connected = False

        # Fixed pixel margins (see _place_axes), not constrained layout:
        # its text measurements took 60 % of a 0.25 s first draw.
        self.figure = Figure(figsize=(6, 3))
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(200)
        self.canvas.setSizePolicy(
            QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding
        )
        self.axes_x, self.axes_r2 = self.figure.subplots(
            2, 1, sharex=True, height_ratios=(2, 1)
        )
        self._build_artists()

        self._toolbar = _Toolbar(self.canvas, self, coordinates=False)
        self._export_button = QPushButton('Export CSV…')
        self._export_button.setToolTip('Write one row per slice to a CSV')
        self._save_button = QPushButton('Save PNG…')
        self._save_button.setToolTip('Save the plot as an image')
        self._status = QLabel('')
        self._status.setSizePolicy(
            QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred
        )
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self._toolbar)
        row.addWidget(self._export_button)
        row.addWidget(self._save_button)
        row.addWidget(self._status, stretch=1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addLayout(row)
        layout.addWidget(self.canvas, stretch=1)

        self._export_button.clicked.connect(self._on_export_clicked)
        self._save_button.clicked.connect(self._on_save_clicked)
        self.canvas.mpl_connect('draw_event', self._on_draw)
        self.canvas.mpl_connect('resize_event', self._on_resize)
        self.canvas.mpl_connect('button_press_event', self._on_click)
        self.canvas.mpl_connect('motion_notify_event', self._on_hover)
        self.canvas.mpl_connect('axes_leave_event', self._on_leave)
        self._connect_events()
        self._apply_theme()
        self.clear()

    def sizeHint(self) -> QSize:
        """Prefer a height at which both panels stay legible."""
        return QSize(600, 320)

    # -- construction -----------------------------------------------------

    def _build_artists(self) -> None:
        """Create the (empty) lines that every fit reuses."""
        ax, ax2 = self.axes_x, self.axes_r2
        (self._x_line,) = ax.plot([], [], linewidth=1.0, label='x')
        (self._r2_line,) = ax2.plot([], [], linewidth=1.0, label='R²')
        marker = dict(
            linestyle='none', marker='o', markersize=5, markeredgewidth=1.0
        )
        (self._x_outliers,) = ax.plot([], [], label='outliers', **marker)
        (self._r2_outliers,) = ax2.plot([], [], **marker)
        self._band = None
        self._cursor_lines = [
            a.axvline(0, linewidth=1.2, animated=True, visible=False)
            for a in (ax, ax2)
        ]
        ax.set_ylabel('x')
        ax2.set_ylabel('R²')
        ax2.set_xlabel('slice')
        ax.label_outer()

    # -- viewer events ----------------------------------------------------

    def _connect_events(self) -> None:
        """Connect the viewer events this widget follows."""
        if self._connected:
            return
        self._viewer.dims.events.current_step.connect(self._on_current_step)
        self._viewer.events.theme.connect(self._on_theme)
        self._connected = True

    def _disconnect_events(self) -> None:
        """Disconnect every viewer event :meth:`_connect_events` connected."""
        if not self._connected:
            return
        self._viewer.dims.events.current_step.disconnect(self._on_current_step)
        self._viewer.events.theme.disconnect(self._on_theme)
        self._connected = False

    def closeEvent(self, event) -> None:
        """Disconnect from the viewer when the widget closes."""
        self._disconnect_events()
        super().closeEvent(event)

    def _on_theme(self, event=None) -> None:
        self._apply_theme()
        self.canvas.draw_idle()

    def _on_current_step(self, event=None) -> None:
        if self._fit is None or not self._connected:
            return
        if self._current_other_index() != self._other_index:
            self._replot()
            return
        self._move_cursor(self._current_index())

    # -- public API -------------------------------------------------------

    def set_fit(
        self, fit: MixFit, *, first_axis: int, title: str = ''
    ) -> None:
        """Plot a fit.

        Parameters
        ----------
        fit : MixFit
            Result of :func:`napari_mixcoef.fit_stack`, with at least one
            leading axis.
        first_axis : int
            The viewer dims axis of the stack's first leading axis.  The
            plot runs along it; further leading axes are taken at the
            viewer's current position on dims axes ``first_axis + 1``, …
        title : str, optional
            Title above the plot, e.g. the layer name.

        Raises
        ------
        ValueError
            If the fit has no leading axis or `first_axis` is negative.
        """
        if len(fit.lead_shape) == 0:
            raise ValueError(
                'the fit has no leading axis (the stack was a single '
                'image); there is nothing to plot against'
            )
        if first_axis < 0:
            raise ValueError(
                f'first_axis is {first_axis}; pass the non-negative dims '
                "axis of the stack's first leading axis"
            )
        self._fit = fit
        self._first_axis = int(first_axis)
        self._title = title
        self._export_button.setEnabled(True)
        self._save_button.setEnabled(True)
        self._toolbar.update()  # forget the zoom history of the last fit
        self._replot()

    def clear(self) -> None:
        """Remove the fit and empty both panels."""
        self._fit = None
        self._other_index = ()
        self._line = {}
        self._outliers = np.zeros(0, dtype=bool)
        for line in (
            self._x_line,
            self._r2_line,
            self._x_outliers,
            self._r2_outliers,
        ):
            line.set_data([], [])
        if self._band is not None:
            self._band.remove()
            self._band = None
        for line in self._cursor_lines:
            line.set_visible(False)
        self.axes_x.set_title('')
        self._status.setText('')
        self._export_button.setEnabled(False)
        self._save_button.setEnabled(False)
        self._toolbar.update()
        self.canvas.draw_idle()

    @property
    def fit(self) -> MixFit | None:
        """The plotted fit, or None."""
        return self._fit

    @property
    def outliers(self) -> np.ndarray:
        """(n,) bool: the flagged slices of the plotted line."""
        return self._outliers.copy()

    def export_csv(self, path: str | os.PathLike) -> None:
        """Write the fit, one row per slice, to a CSV file.

        Parameters
        ----------
        path : str or path-like
            Output file; see :meth:`napari_mixcoef.MixFit.to_csv`.
        """
        if self._fit is None:
            raise RuntimeError('there is no fit to export; call set_fit')
        self._fit.to_csv(path)

    def save_png(self, path: str | os.PathLike, *, dpi: float = 150) -> None:
        """Save the plot (without the cursor) as a PNG image.

        Parameters
        ----------
        path : str or path-like
            Output file.
        dpi : float, optional
            Resolution of the image.
        """
        # Figure.draw includes animated artists while saving: hide them.
        shown = [line.get_visible() for line in self._cursor_lines]
        for line in self._cursor_lines:
            line.set_visible(False)
        self._saving = True
        try:
            self.figure.savefig(
                path, dpi=dpi, facecolor=self.figure.get_facecolor()
            )
        finally:
            self._saving = False
            for line, visible in zip(self._cursor_lines, shown):
                line.set_visible(visible)
            # savefig drew with its own renderer: cache the screen again.
            self._background = None
            self.canvas.draw_idle()

    # -- drawing ----------------------------------------------------------

    def _current_index(self) -> int:
        """Return the slider position on the plotted axis, clamped."""
        step = self._viewer.dims.current_step
        n = self._fit.lead_shape[0] if self._fit is not None else 1
        i = step[self._first_axis] if self._first_axis < len(step) else 0
        return int(min(max(i, 0), n - 1))

    def _current_other_index(self) -> tuple[int, ...]:
        """Return the positions on the further leading axes, clamped."""
        if self._fit is None:
            return ()
        step = self._viewer.dims.current_step
        index = []
        for j, size in enumerate(self._fit.lead_shape[1:], start=1):
            axis = self._first_axis + j
            i = step[axis] if axis < len(step) else 0
            index.append(int(min(max(i, 0), size - 1)))
        return tuple(index)

    def _replot(self) -> None:
        """Draw the line of the fit at the current further indices."""
        fit = self._fit
        self._other_index = other = self._current_other_index()
        key = (slice(None), *other)

        def finite(a: np.ndarray) -> np.ndarray:
            a = np.asarray(a[key], dtype=np.float64)
            return np.where(np.isfinite(a), a, np.nan)

        x, x_stderr, r2 = finite(fit.x), finite(fit.x_stderr), finite(fit.r2)
        n = x.size
        index = np.arange(n)
        self._line = {'x': x, 'x_stderr': x_stderr, 'r2': r2}
        self._outliers = find_outliers(fit.x[key], fit.x_stderr[key], r2)

        lo, hi = x - _BAND_Z * x_stderr, x + _BAND_Z * x_stderr
        self._x_line.set_data(index, x)
        self._r2_line.set_data(index, r2)
        self._x_outliers.set_data(index[self._outliers], x[self._outliers])
        self._r2_outliers.set_data(index[self._outliers], r2[self._outliers])
        if self._band is not None:
            self._band.remove()
        self._band = self.axes_x.fill_between(
            index, lo, hi, linewidth=0, zorder=1, label='±1.96 SE'
        )
        self._style_data()

        pad = max(0.5, 0.01 * (n - 1))
        self.axes_x.set_xlim(-pad, n - 1 + pad)
        self._set_ylim(self.axes_x, np.concatenate([lo, hi, x]))
        self._set_ylim(self.axes_r2, r2)
        title = self._title
        if other:
            where = ', '.join(
                f'axis {self._first_axis + j} = {i}'
                for j, i in enumerate(other, start=1)
            )
            title = f'{title} ({where})' if title else where
        # an explicit y skips matplotlib's title placement, which measures
        # every tick label of the shared axes on each draw (~40 ms here)
        self.axes_x.set_title(title, y=1.0, pad=4)
        self._place_axes()
        for line in self._cursor_lines:
            line.set_visible(True)
        self._set_cursor_data(self._current_index())
        self.canvas.draw_idle()

    @staticmethod
    def _set_ylim(ax, values: np.ndarray) -> None:
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            ax.set_ylim(0, 1)
            return
        lo, hi = float(finite.min()), float(finite.max())
        pad = 0.05 * (hi - lo) or 0.05 * max(abs(hi), 1e-3)
        ax.set_ylim(lo - pad, hi + pad)

    def _set_cursor_data(self, i: int) -> None:
        for line in self._cursor_lines:
            line.set_xdata([i, i])

    def _move_cursor(self, i: int) -> None:
        """Move the cursor to slice `i` by blitting over the cached plot."""
        self._set_cursor_data(i)
        if self._background is None:
            self.canvas.draw_idle()  # _on_draw caches it and the cursor
            return
        self.canvas.restore_region(self._background)
        self._draw_cursor()
        self.canvas.blit(self.figure.bbox)

    def _draw_cursor(self) -> None:
        for line in self._cursor_lines:
            line.axes.draw_artist(line)

    def _on_draw(self, event: DrawEvent | None = None) -> None:
        """After a full draw: cache the background, draw the cursor on it."""
        if self._saving:
            return
        self._background = self.canvas.copy_from_bbox(self.figure.bbox)
        self._draw_cursor()

    def _on_resize(self, event=None) -> None:
        self._background = None
        self._place_axes()

    def _place_axes(self) -> None:
        """Keep margins fixed in pixels, whatever the canvas size."""
        width, height = self.figure.bbox.width, self.figure.bbox.height
        if width < 150 or height < 120:
            return
        scale = self.figure.dpi / 100
        top = (30 if self.axes_x.get_title() else 10) * scale
        bottom, gap = 40 * scale, 10 * scale
        avail = height - top - bottom
        if avail <= 3 * gap:
            return
        self.figure.subplots_adjust(
            left=64 * scale / width,
            right=1 - 12 * scale / width,
            bottom=bottom / height,
            top=1 - top / height,
            # hspace is in units of the mean axes height
            hspace=2 * gap / (avail - gap),
        )

    # -- theme ------------------------------------------------------------

    def _theme_colors(self) -> dict[str, str]:
        from napari.utils.theme import get_theme

        theme = get_theme(self._viewer.theme)
        colors = {
            name: getattr(theme, name).as_hex()
            for name in (
                'background',
                'foreground',
                'primary',
                'secondary',
                'highlight',
                'text',
                'current',
                'warning',
                'error',
            )
        }
        colors['type'] = theme.type
        return colors

    def _apply_theme(self) -> None:
        """Colour the figure after the viewer's current theme."""
        self._colors = c = self._theme_colors()
        self.figure.set_facecolor(c['background'])
        for ax in (self.axes_x, self.axes_r2):
            ax.set_facecolor(c['foreground'])
            for spine in ax.spines.values():
                spine.set_color(c['secondary'])
            ax.tick_params(colors=c['text'], labelcolor=c['text'], labelsize=8)
            ax.xaxis.label.set_color(c['text'])
            ax.yaxis.label.set_color(c['text'])
            ax.xaxis.label.set_fontsize(9)
            ax.yaxis.label.set_fontsize(9)
            ax.title.set_color(c['text'])
            ax.title.set_fontsize(9)
            ax.grid(True, color=c['primary'], linewidth=0.6)
            ax.set_axisbelow(True)
        for line in self._cursor_lines:
            line.set_color(c['warning'])
        self._style_data()

    def _style_data(self) -> None:
        c = self._colors
        for line in (self._x_line, self._r2_line):
            line.set_color(c['text'])
        if self._band is not None:
            self._band.set_facecolor(c['current'])
            self._band.set_alpha(0.6)
        for line in (self._x_outliers, self._r2_outliers):
            line.set_markerfacecolor(c['error'])
            line.set_markeredgecolor(c['text'])

    # -- mouse ------------------------------------------------------------

    def _slice_at(self, event: MouseEvent) -> int | None:
        """Slice index under the mouse, or None outside the panels."""
        if (
            self._fit is None
            or event.inaxes not in (self.axes_x, self.axes_r2)
            or event.xdata is None
            or not math.isfinite(event.xdata)
        ):
            return None
        n = self._fit.lead_shape[0]
        return int(min(max(round(event.xdata), 0), n - 1))

    def _on_click(self, event: MouseEvent) -> None:
        if event.button != MouseButton.LEFT or self._toolbar.mode:
            return
        i = self._slice_at(event)
        if i is None:
            return
        dims = self._viewer.dims
        if self._first_axis >= dims.ndim:
            return
        i = min(i, dims.nsteps[self._first_axis] - 1)
        dims.set_current_step(self._first_axis, i)

    def _on_hover(self, event: MouseEvent) -> None:
        i = self._slice_at(event)
        if i is None:
            return
        self._status.setText(self._describe(i))

    def _on_leave(self, event=None) -> None:
        self._status.setText('')

    def _describe(self, i: int) -> str:
        """``slice i: x = 0.523 ± 0.004, R² = 0.998`` for slice `i`."""
        x = self._line['x'][i]
        se = self._line['x_stderr'][i]
        r2 = self._line['r2'][i]
        where = ', '.join(str(j) for j in (i, *self._other_index))
        where = f'({where})' if self._other_index else where
        d = _decimals(se)
        d2 = _decimals(1.0 - r2 if math.isfinite(r2) else math.nan)
        text = f'slice {where}: x = {x:.{d}f} ± {se:.{d}f}, R² = {r2:.{d2}f}'
        if self._outliers[i]:
            text += ' (outlier)'
        return text

    # -- buttons ----------------------------------------------------------

    def _on_export_clicked(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self,
            'Export mixing coefficients',
            'mixing_coefficients.csv',
            'CSV files (*.csv);;All files (*)',
        )
        if path:
            self.export_csv(path)

    def _on_save_clicked(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self,
            'Save plot',
            'mixing_coefficients.png',
            'PNG images (*.png);;All files (*)',
        )
        if path:
            self.save_png(path)
