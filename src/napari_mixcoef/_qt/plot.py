"""The "Mixing coefficients plot" dock: a fit's panels against the slice.

:class:`CoefficientPlot` stands on the themed, slider-linked figure of
:mod:`.mplbase` and lays out the panels of :mod:`.panels` (the shares with
their 95 % band, the free models' coefficients on demand, R²), the title
and a legend row; it exports the fit as CSV with its provenance.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.patches import Patch

from .mplbase import StackedAxesWidget, with_suffix
from .panels import (
    OUTLIER_RULE,
    Line,
    ShiftPanel,
    default_panels,
    legend_row,
)
from .record import (
    RESIDUAL_COLORS,
    FitSource,
    describe_fit,
    latest_output,
    record_of,
)

if TYPE_CHECKING:
    import napari
    from qtpy.QtWidgets import QWidget

    from napari_mixcoef import MixFit

__all__ = ['CoefficientPlot']


def _decimals(error: float) -> int:
    """Decimals that show the first significant digit of `error` (>= 3)."""
    if not (math.isfinite(error) and error > 0):
        return 3
    return min(8, max(3, -math.floor(math.log10(error))))


class CoefficientPlot(StackedAxesWidget):
    """A fit's shares, coefficients and R² against the slice index.

    Opened by the "Mixing coefficients" dock after each run, or alone from
    the Plugins menu (it then shows the latest run in the viewer).  A
    cursor follows the dims slider; a click moves the slider; hovering
    shows the slice's values.  When a layer of the plotted fit is
    removed, the plot clears and says so.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer whose outputs the plot shows and whose slider it follows.
    parent : QWidget, optional
        Parent widget.
    """

    def __init__(
        self,
        napari_viewer: napari.viewer.Viewer,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(napari_viewer, parent)
        self._fit: MixFit | None = None
        self._source: FitSource | None = None
        self._residual_id = None
        self._line: Line | None = None
        self._panels = default_panels()
        self._coefficients = self.add_button(
            'a, b, c',
            "Also plot the free models' coefficients a, b (and c) with "
            'their 95 % bands',
            self.draw_figure,
            checkable=True,
        )
        self._export_button = self.add_button(
            'Export CSV…',
            'Write one row per slice (x, errors, coefficients, R², RMSE, '
            'outlier flag) to a CSV, and what was fitted to a JSON beside it',
            self._on_export_clicked,
        )
        self._save_button = self.add_button(
            'Save PNG…', 'Save the plot as an image', self._on_save_clicked
        )
        self._axes: dict = {}
        self._residual_limit: float | None = None
        self._connect(napari_viewer.layers.events.removed, self._on_removed)
        latest = latest_output(napari_viewer.layers)
        if latest is not None:
            self.show_output(latest)
        else:
            self.clear()

    # -- what is shown --------------------------------------------------------

    @property
    def fit(self) -> MixFit | None:
        """The plotted fit, or None."""
        return self._fit

    @property
    def line(self) -> Line | None:
        """The plotted line (slices along the plotted axis), or None."""
        return self._line

    @property
    def outliers(self) -> np.ndarray:
        """(n,) bool: the flagged slices of the plotted line."""
        return np.zeros(0, bool) if self._line is None else self._line.outliers

    def axes(self, panel: str):
        """Return a panel's axes ("share", "a, b", "c", "shift", "R²")."""
        return self._axes[panel]

    def artist(self, panel: str, gid: str):
        """Return the artist of a panel by its gid (e.g. "outliers")."""
        ax = self._axes[panel]
        return next(
            a for a in (*ax.lines, *ax.collections) if a.get_gid() == gid
        )

    def show_output(self, layer) -> None:
        """Plot the run recorded in an output layer's metadata."""
        record = record_of(layer)
        if record is None:
            raise ValueError(f'layer "{layer.name}" holds no fit to plot')
        if record['fit'] is self._fit and layer.unique_id == self._residual_id:
            return  # shown already (a new plot shows the latest run)
        # the residual's colours' ends, for the legend row
        limit = float(layer.contrast_limits[1])
        self.set_fit(record['fit'], record['source'], _residual=(layer, limit))

    def set_fit(
        self, fit: MixFit, source: FitSource | None = None, *, _residual=None
    ) -> None:
        """Plot a fit.

        Parameters
        ----------
        fit : MixFit
            Result of :func:`napari_mixcoef.fit_stack` with at least one
            leading axis.
        source : FitSource, optional
            What was fitted: layer names for the labels and the dims axis
            of the stack's first leading axis (default 0).  Further leading
            axes are taken at the sliders' position on the next dims axes.

        Raises
        ------
        ValueError
            If the fit has no leading axis or the dims axis is negative.
        """
        if not fit.lead_shape:
            raise ValueError(
                'the fit has no leading axis (the stack was a single '
                'image); there is nothing to plot against'
            )
        source = source or FitSource(
            'stack',
            tuple(
                f'reference {i + 1}' for i in range(max(fit.n_references, 2))
            ),
            None,
            (),
        )
        first = source.first_axis
        if first < 0:
            raise ValueError(
                f'the first dims axis is {first}; pass the non-negative '
                "dims axis of the stack's first leading axis"
            )
        self._fit, self._source = fit, source
        layer, self._residual_limit = _residual or (None, None)
        self._residual_id = None if layer is None else layer.unique_id
        followed = range(first + 1, first + len(fit.lead_shape))
        self.link(first, fit.lead_shape[0], tuple(followed))
        for button in (self._export_button, self._save_button):
            button.setEnabled(True)
        self._coefficients.setEnabled(fit.model != 'mix')
        self.toolbar.update()  # forget the zoom history of the last fit
        self.show_message('')
        self.draw_figure()

    def clear(self) -> None:
        """Forget the fit and say how to get one."""
        self._fit = self._source = self._line = self._residual_id = None
        self.unlink()
        for button in (self._export_button, self._save_button):
            button.setEnabled(False)
        self._coefficients.setEnabled(False)
        self.toolbar.update()
        self.draw_figure()

    def _on_removed(self, event) -> None:
        layer = event.value
        if self._source is None or (
            layer.unique_id not in (*self._source.ids, self._residual_id)
        ):
            return
        self.clear()
        self.show_message(
            f'layer "{layer.name}" of the plotted fit was removed; run the '
            'fit again to plot it',
            error=True,
        )

    # -- drawing --------------------------------------------------------------

    def _where(self) -> tuple[int, ...]:
        """Return the further leading indices at the sliders, clamped."""
        sizes = self._fit.lead_shape[1:]
        return tuple(
            min(max(i, 0), n - 1) for i, n in zip(self.other_position(), sizes)
        )

    def draw(self) -> None:
        """Lay out the wanted panels and let each draw the current line."""
        self.figure.clear()
        self._axes = {}
        c = self.colors
        if self._fit is None:
            self._line = None
            self.note('No fit yet: run one in the "Mixing coefficients" dock')
            return
        fit, source = self._fit, self._source
        line = self._line = Line.of(fit, self._where())
        panels = [
            p
            for p in self._panels
            if p.wanted(fit, self._coefficients.isChecked())
        ]
        name = self.axis_label(source.first_axis)
        axes = self.stack_axes(
            [p.height for p in panels],
            line.index.size,
            f'slice ({name})' if ' ' in name else name,
        )
        self._axes = {p.name: ax for p, ax in zip(panels, axes)}
        for panel, ax in zip(panels, axes):
            panel.draw(ax, line, source, c)
        where = ', '.join(
            f'{self.axis_label(source.first_axis + j)} = {i}'
            for j, i in enumerate(line.where, start=1)
        )
        self.header(
            f'{source.stack}: {describe_fit(fit)}'
            + (f'   ({where})' if where else '')
        )
        left, right = self.margins[:2]
        handles, labels = zip(*panels[0].legend(line, source, c))
        legend_row(self.figure, handles, labels, c, x=left - 4, y=-14)
        low, zero, high = RESIDUAL_COLORS
        limit = f'{self._residual_limit:.3g}' if self._residual_limit else ''
        legend_row(
            self.figure,
            [Patch(visible=False)]
            + [
                Patch(facecolor=color, edgecolor=c['secondary'])
                for color in (high, low, zero)
            ],
            [
                'residual layer:',
                f'brighter than the model (+{limit})'
                if limit
                else 'brighter than the model',
                f'darker (−{limit})' if limit else 'darker',
                'fits (0)' if limit else 'fits',
            ],
            c,
            x=-right,
            y=0,
        )

    def describe(self, i: int) -> str:
        """``slice 42: x = 0.523 ± 0.004, R² = 0.998`` for slice `i`."""
        line = self._line
        if line is None:
            return ''
        x, se, r2 = line.x[i], line.x_stderr[i], line.r2[i]
        where = ', '.join(str(j) for j in (i, *line.where))
        where = f'({where})' if line.where else where
        d = _decimals(se)
        d2 = _decimals(1.0 - r2 if math.isfinite(r2) else math.nan)
        if line.n_references > 2:
            shares = ', '.join(
                f'{name} {line.fractions[i, k]:.{d}f} ± '
                f'{line.fractions_stderr[i, k]:.{d}f}'
                for k, name in enumerate(self._source.references)
            )
            text = f'slice {where}: {shares}, R² = {r2:.{d2}f}'
        else:
            text = (
                f'slice {where}: x = {x:.{d}f} ± {se:.{d}f}, R² = {r2:.{d2}f}'
            )
        if line.shift is not None:
            if line.registration_failed[i]:
                text += ', registration failed'
            else:
                names = ', '.join(ShiftPanel.axis_names(line.shift.shape[1]))
                shifts = ', '.join(
                    f'{v:.3f} ± {e:.3f}'
                    for v, e in zip(line.shift[i], line.shift_stderr[i])
                )
                text += f', shift ({names}) = ({shifts}) px'
        if line.at_bound[i]:
            text += ' (a share held at its bound has no error)'
        if self._fit.model != 'mix':
            text += ''.join(
                f', {name} = {line.coef[i, j]:.4g}'
                for j, name in enumerate(line.names)
            )
        if line.outliers[i]:
            text += f' ({OUTLIER_RULE})'
        return text

    # -- export ---------------------------------------------------------------

    def all_outliers(self) -> np.ndarray:
        """(*lead) bool: the flagged slices of every line of the fit."""
        fit = self._fit
        flags = np.zeros(fit.lead_shape, bool)
        for where in np.ndindex(*fit.lead_shape[1:]):
            flags[(slice(None), *where)] = Line.of(fit, where).outliers
        return flags

    def export_csv(self, path: str | os.PathLike) -> str:
        """Write the fit, one row per slice, and its provenance JSON.

        Parameters
        ----------
        path : str or path-like
            Output file; ``.csv`` is appended when the name lacks it.  The
            columns are :meth:`napari_mixcoef.MixFit.to_csv`'s and
            ``outlier`` (0/1); ``<name>.json`` beside it names the stack,
            references and mask layers and lists the flagged slices.

        Returns
        -------
        str
            The CSV file written.
        """
        if self._fit is None:
            raise RuntimeError('there is no fit to export; run a fit first')
        path = with_suffix(path, '.csv')
        flags = self.all_outliers()
        where = np.argwhere(flags)
        outliers = where[:, 0] if flags.ndim == 1 else where
        self._fit.to_csv(
            path,
            columns={'outlier': flags.reshape(-1)},
            provenance={
                'stack': self._source.stack,
                'references': list(self._source.references),
                'mask': self._source.mask,
                'outliers': outliers.tolist(),
                'outlier_rule': OUTLIER_RULE,
            },
        )
        return path

    def export_to(self, path: str | os.PathLike) -> None:
        """Export to `path`, saying in the message line how it went."""
        self.write_and_tell(self.export_csv, with_suffix(path, '.csv'))

    def _on_export_clicked(self) -> None:
        name = f'{self._source.stack} mixing coefficients.csv'
        self.ask_path(
            'Export mixing coefficients', name, 'CSV', self.export_to
        )

    def _on_save_clicked(self) -> None:
        name = f'{self._source.stack} mixing coefficients.png'
        self.ask_path('Save plot', name, 'PNG images', self.save_to)
