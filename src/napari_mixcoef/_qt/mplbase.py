"""A matplotlib figure in a napari dock: canvas, toolbar, theme, slider.

A short chain, after napari-matplotlib's ``BaseNapariMPLWidget`` →
``NapariMPLWidget`` → ``SingleAxesWidget``: :class:`ThemedFigureWidget`
owns the canvas, the toolbar with a row for buttons and a message, the
viewer's theme, its place in the window and saving;
:class:`DimsLinkedFigureWidget` adds a cursor that follows one of the
viewer's dims sliders (by blitting) and moves it on a click;
:class:`StackedAxesWidget` lays out axes over that shared x axis.
Subclasses only draw.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from matplotlib.backend_bases import MouseButton
from matplotlib.backends.backend_qtagg import (
    FigureCanvasQTAgg,
    NavigationToolbar2QT,
)
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import offset_copy
from qtpy.QtCore import QEvent, QSize, Qt, QTimer
from qtpy.QtWidgets import (
    QDockWidget,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QPushButton,
    QSizePolicy,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from napari_mixcoef.io import describe_os_error

if TYPE_CHECKING:
    import napari
    from matplotlib.axes import Axes
    from matplotlib.backend_bases import MouseEvent

__all__ = [
    'DimsLinkedFigureWidget',
    'StackedAxesWidget',
    'ThemedFigureWidget',
    'with_suffix',
]

_THEME_COLORS = (
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
_TOOL_TIPS = {
    'Home': 'Show the whole plot again',
    'Back': 'Previous view',
    'Forward': 'Next view',
    'Pan': 'Pan with the left button, zoom with the right; click again '
    'to leave (clicks then move the slider again)',
    'Zoom': 'Zoom to a rectangle; click again to leave (clicks then move '
    'the slider again)',
}


def with_suffix(path: str | os.PathLike, suffix: str) -> str:
    """Return `path` ending in `suffix` (appended when the name lacks it)."""
    name = os.fspath(path)
    return name if name.lower().endswith(suffix) else name + suffix


def _dock_at_bottom(main: QMainWindow, dock: QDockWidget) -> None:
    """Dock at the bottom unless napari remembers the user's own place."""
    from napari.settings import get_settings

    remembered = get_settings().application.plugin_widget_positions
    if dock.objectName() not in remembered:
        main.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, dock)


class _Toolbar(NavigationToolbar2QT):
    """Navigation toolbar with the view buttons only."""

    toolitems = [
        item
        for item in NavigationToolbar2QT.toolitems
        if item[0] in _TOOL_TIPS
    ]

    def __init__(self, canvas, parent) -> None:
        super().__init__(canvas, parent, coordinates=False)
        for action in self.actions():
            if action.text() in _TOOL_TIPS:
                action.setToolTip(_TOOL_TIPS[action.text()])
        # Qt's "»" button, shown when the row is too narrow for the tools
        for button in self.findChildren(QToolButton, 'qt_toolbar_ext_button'):
            button.setToolTip('More tools')


class ThemedFigureWidget(QWidget):
    """A figure, its toolbar and a message line, coloured as the viewer.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        Whose theme the figure follows.
    parent : QWidget, optional
        Parent widget.

    Attributes
    ----------
    figure : matplotlib.figure.Figure
    canvas : FigureCanvasQTAgg
    toolbar : NavigationToolbar2QT
    colors : dict of str to str
        The theme's colours (hex) by napari's names, and ``"type"``.
    """

    def __init__(
        self, viewer: napari.viewer.Viewer, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self._connections: list = []
        self.figure = Figure(figsize=(6, 3))
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(120)
        self.canvas.setSizePolicy(
            QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding
        )
        self.toolbar = _Toolbar(self.canvas, self)
        self._message = QLabel('')
        self._message.setSizePolicy(
            QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred
        )
        self._row = QHBoxLayout()
        self._row.setContentsMargins(0, 0, 0, 0)
        self._row.addWidget(self.toolbar)
        self._row.addWidget(self._message, stretch=1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addLayout(self._row)
        layout.addWidget(self.canvas, stretch=1)
        self.colors: dict[str, str] = {}
        self._saving = False
        self._placed = False
        self._fitted = False
        self.dialog: QFileDialog | None = None
        #: How often the widget re-fitted the image view after docking.
        self.refits = 0
        self.canvas.mpl_connect('resize_event', self._on_canvas_resize)
        self._connect(viewer.events.theme, self._on_theme)
        self._read_theme()

    def sizeHint(self) -> QSize:
        """Prefer a height at which two panels stay legible."""
        return QSize(600, 260)

    # -- events -------------------------------------------------------------

    def _connect(self, emitter, callback) -> None:
        """Connect a viewer event; undone by :meth:`disconnect_events`."""
        emitter.connect(callback)
        self._connections.append((emitter, callback))

    def disconnect_events(self) -> None:
        """Let go of every viewer event this widget connected."""
        while self._connections:
            emitter, callback = self._connections.pop()
            emitter.disconnect(callback)

    @property
    def connected(self) -> bool:
        """Whether the widget follows the viewer's events."""
        return bool(self._connections)

    def closeEvent(self, event) -> None:
        """Disconnect from the viewer when the widget closes."""
        self.disconnect_events()
        super().closeEvent(event)

    def event(self, event) -> bool:
        """Disconnect when napari takes the widget out of its dock (×)."""
        if event.type() == QEvent.Type.ParentChange and self.parent() is None:
            self.disconnect_events()
        return super().event(event)

    def dock(self) -> QDockWidget | None:
        """Return the dock holding this widget, or None."""
        parent = self.parentWidget()
        while parent is not None and not isinstance(parent, QDockWidget):
            parent = parent.parentWidget()
        return parent

    # -- buttons and the message line -----------------------------------------

    def add_button(
        self, text: str, tooltip: str, slot, *, checkable: bool = False
    ) -> QPushButton:
        """Add a button to the toolbar row, before the message."""
        button = QPushButton(text)
        button.setToolTip(tooltip)
        button.setCheckable(checkable)
        button.clicked.connect(slot)
        self._row.insertWidget(self._row.count() - 1, button)
        return button

    def show_message(self, text: str, *, error: bool = False) -> None:
        """Show one line beside the buttons (red if `error`)."""
        self._message.setText(text)
        self._message.setToolTip(text)
        color = self.colors.get('error', '#e06c75') if error else ''
        self._message.setStyleSheet(f'color: {color};' if color else '')

    @property
    def message(self) -> str:
        """The text of the message line."""
        return self._message.text()

    # -- theme ----------------------------------------------------------------

    def _read_theme(self) -> None:
        from napari.utils.theme import get_theme

        theme = get_theme(self.viewer.theme)
        self.colors = {
            name: getattr(theme, name).as_hex() for name in _THEME_COLORS
        }
        self.colors['type'] = theme.type

    def _on_theme(self, event=None) -> None:
        self._read_theme()
        self.draw_figure()

    def style_axes(self, ax: Axes) -> None:
        """Colour one axes after the theme (call after drawing into it)."""
        c = self.colors
        ax.set_facecolor(c['foreground'])
        for spine in ax.spines.values():
            spine.set_color(c['secondary'])
        ax.tick_params(colors=c['text'], labelcolor=c['text'], labelsize=8)
        for label in (ax.xaxis.label, ax.yaxis.label, ax.title):
            label.set_color(c['text'])
            label.set_fontsize(8)
        ax.grid(True, color=c['primary'], linewidth=0.6)
        ax.set_axisbelow(True)

    def draw_figure(self) -> None:
        """Redraw everything: the figure's colour, then :meth:`draw`."""
        self.figure.set_facecolor(self.colors['background'])
        self.draw()
        for ax in self.figure.axes:
            self.style_axes(ax)
        self.layout_figure()
        self.canvas.draw_idle()

    def draw(self) -> None:
        """Draw the figure's content; subclasses override."""

    def layout_figure(self) -> None:
        """Place the axes for the canvas' size; subclasses override."""

    def _on_canvas_resize(self, event=None) -> None:
        self.layout_figure()

    # -- the dock -------------------------------------------------------------

    def showEvent(self, event) -> None:
        """Once laid out: a third of the window, the image re-fitted."""
        super().showEvent(event)
        if not event.spontaneous():
            self._fitted = False
            # once the dock is laid out (a posted call: a QTimer of this
            # widget's, started here, did not fire at all in some runs)
            QTimer.singleShot(0, lambda: self.fit_in_window())

    def fit_in_window(self) -> None:
        """Take a third of the window's height, fit the image view again.

        Once per showing; call it right after docking to have it done
        before the first draw.
        """
        dock, main = self.dock(), self.window()
        if self._fitted or dock is None or not isinstance(main, QMainWindow):
            return
        if main.isVisible() and not dock.isVisible():
            dock.show()  # a dock napari has just added shows later
        self._fitted = True
        bottom = Qt.DockWidgetArea.BottomDockWidgetArea
        if not self._placed and not dock.isFloating():
            self._placed = True
            if main.dockWidgetArea(dock) != bottom:
                _dock_at_bottom(main, dock)
        if main.dockWidgetArea(dock) == bottom:
            # a third: the panels stay legible, the image keeps the rest
            third = main.height() // 3
            main.resizeDocks([dock], [third], Qt.Orientation.Vertical)
        # lay the window and this widget out now: the image view is then
        # fitted to the canvas left, and the figure drawn once, at its size
        main.layout().activate()
        dock.layout().activate()
        self.layout().activate()
        self.viewer.reset_view()
        self.refits += 1

    # -- saving ---------------------------------------------------------------

    def ask_path(self, title: str, name: str, kind: str, slot) -> None:
        """Ask for a file to save to; `slot(path)` is called with it.

        The dialog (kept as :attr:`dialog`) is window-modal, not blocking:
        napari's event loop keeps running.
        """
        suffix = name.rsplit('.', 1)[-1]
        self.dialog = QFileDialog(
            self, title, name, f'{kind} (*.{suffix});;All files (*)'
        )
        self.dialog.setAcceptMode(QFileDialog.AcceptMode.AcceptSave)
        self.dialog.setDefaultSuffix(suffix)
        self.dialog.fileSelected.connect(slot)
        self.dialog.open()

    def write_and_tell(self, write, path: str) -> None:
        """Call ``write(path)``; say in the message line how it went."""
        try:
            written = write(path) or path
        except OSError as err:
            why = describe_os_error(err, path)
            self.show_message(f'could not save {why}', error=True)
            return
        self.show_message(f'wrote {written}')

    def save_to(self, path: str | os.PathLike) -> None:
        """Save the figure as a PNG at `path` (``.png`` added if missing)."""
        self.write_and_tell(self.save_png, with_suffix(path, '.png'))

    def save_png(self, path: str | os.PathLike, *, dpi: float = 150) -> None:
        """Save the figure as shown (without animated artists) as a PNG.

        Parameters
        ----------
        path : str or path-like
            Output file.
        dpi : float, optional
            Resolution of the image.
        """
        # Figure.draw includes animated artists while saving: hide them
        animated = [
            a
            for ax in self.figure.axes
            for a in ax.get_children()
            if a.get_animated() and a.get_visible()
        ]
        for artist in animated:
            artist.set_visible(False)
        self._saving = True
        try:
            self.figure.savefig(
                path, dpi=dpi, facecolor=self.figure.get_facecolor()
            )
        finally:
            self._saving = False
            for artist in animated:
                artist.set_visible(True)
            # savefig drew with its own renderer: draw the screen again
            self.canvas.draw_idle()


class DimsLinkedFigureWidget(ThemedFigureWidget):
    """A themed figure whose x axis is one of the viewer's dims axes.

    A vertical cursor in every axes follows that axis' slider, drawn by
    blitting over a cached background (a full draw of a few thousand
    points is far too slow for a slider); a left click moves the slider to
    the nearest position, and hovering shows :meth:`describe` of it.

    Attributes
    ----------
    dims_axis : int
        The viewer's dims axis the x axis runs along.
    n_positions : int
        How many positions it has (0: nothing linked).
    """

    def __init__(
        self, viewer: napari.viewer.Viewer, parent: QWidget | None = None
    ) -> None:
        super().__init__(viewer, parent)
        self.dims_axis = 0
        self.n_positions = 0
        self._followed: tuple[int, ...] = ()
        self._other: tuple[int, ...] = ()
        self._cursors: list = []
        self._background = None
        self.canvas.mpl_connect('draw_event', self._on_draw)
        self.canvas.mpl_connect('resize_event', self._on_resize)
        self.canvas.mpl_connect('button_press_event', self._on_click)
        self.canvas.mpl_connect('motion_notify_event', self._on_hover)
        self.canvas.mpl_connect('axes_leave_event', self._on_leave)
        dims = viewer.dims.events
        self._connect(dims.current_step, self._on_current_step)
        self._connect(dims.axis_labels, self._on_axis_labels)

    def link(self, axis: int, n: int, followed: tuple[int, ...] = ()) -> None:
        """Run the x axis along dims `axis` (`n` positions).

        `followed` are further dims axes the drawing depends on: when their
        slider moves, the figure is drawn again.
        """
        self.dims_axis, self.n_positions = int(axis), int(n)
        self._followed = tuple(followed)
        self._other = self.other_position()

    def unlink(self) -> None:
        """Stop following the slider (nothing to show)."""
        self.n_positions = 0
        self._followed = self._other = ()

    def axis_label(self, axis: int) -> str:
        """Name a dims axis as the viewer does (``axis -3`` if unnamed)."""
        labels = self.viewer.dims.axis_labels
        label = labels[axis] if 0 <= axis < len(labels) else str(axis)
        return f'axis {label}' if label.lstrip('-').isdigit() else label

    def position(self) -> int:
        """Return the slider's position on the linked axis, clamped."""
        step = self.viewer.dims.current_step
        i = step[self.dims_axis] if self.dims_axis < len(step) else 0
        return int(min(max(i, 0), max(self.n_positions - 1, 0)))

    def other_position(self) -> tuple[int, ...]:
        """Return the sliders' positions on the followed axes."""
        step = self.viewer.dims.current_step
        return tuple(
            int(step[a]) if a < len(step) else 0 for a in self._followed
        )

    def describe(self, i: int) -> str:
        """Say what is at position `i` (shown while the mouse is there)."""
        return ''

    @property
    def cursors(self) -> list:
        """The cursor lines, one per axes."""
        return list(self._cursors)

    # -- drawing --------------------------------------------------------------

    def draw_figure(self) -> None:
        """Redraw, then put a (hidden until drawn) cursor in every axes."""
        super().draw_figure()
        self._cursors = [
            ax.axvline(
                self.position(),
                linewidth=1.2,
                color=self.colors['warning'],
                animated=True,
                visible=self.n_positions > 0,
            )
            for ax in self.figure.axes
        ]
        self._background = None

    def _on_axis_labels(self, event=None) -> None:
        self.draw_figure()

    def _on_current_step(self, event=None) -> None:
        if not self.n_positions:
            return
        if self.other_position() != self._other:
            self._other = self.other_position()
            self.draw_figure()
            return
        self._move_cursor(self.position())

    def _move_cursor(self, i: int) -> None:
        for line in self._cursors:
            line.set_xdata([i, i])
        if self._background is None:
            self.canvas.draw_idle()  # _on_draw caches it and the cursor
            return
        self.canvas.restore_region(self._background)
        self._draw_cursors()
        self.canvas.blit(self.figure.bbox)

    def _draw_cursors(self) -> None:
        for line in self._cursors:
            if line.axes is not None and line.get_visible():
                line.axes.draw_artist(line)

    def _on_draw(self, event=None) -> None:
        """After a full draw: cache the background, draw the cursor on it."""
        if self._saving:
            return
        self._background = self.canvas.copy_from_bbox(self.figure.bbox)
        self._draw_cursors()

    def _on_resize(self, event=None) -> None:
        self._background = None

    # -- mouse ----------------------------------------------------------------

    def _position_at(self, event: MouseEvent) -> int | None:
        if (
            not self.n_positions
            or event.inaxes is None
            or event.xdata is None
            or not math.isfinite(event.xdata)
        ):
            return None
        return int(min(max(round(event.xdata), 0), self.n_positions - 1))

    def _on_click(self, event: MouseEvent) -> None:
        if event.button != MouseButton.LEFT or self.toolbar.mode:
            return
        i = self._position_at(event)
        dims = self.viewer.dims
        if i is None or self.dims_axis >= dims.ndim:
            return
        dims.set_current_step(
            self.dims_axis, min(i, dims.nsteps[self.dims_axis] - 1)
        )

    def _on_hover(self, event: MouseEvent) -> None:
        i = self._position_at(event)
        if i is not None:
            self.show_message(self.describe(i))

    def _on_leave(self, event=None) -> None:
        self.show_message('')


def _fit_lines(text: str, n: int) -> str:
    """Cut each line of `text` to `n` characters (an ellipsis marks it)."""
    n = max(n, 3)
    return '\n'.join(
        line if len(line) <= n else line[: n - 1] + '…'
        for line in text.split('\n')
    )


class StackedAxesWidget(DimsLinkedFigureWidget):
    """Axes stacked over one shared, slider-linked x axis.

    Margins stay fixed in points whatever the canvas size (constrained
    layout's text measurements were most of a first draw), with a title
    and a legend row above the axes and a row below; a y label longer than
    its axes is shortened rather than cut.

    Attributes
    ----------
    margins : tuple of float
        Left, right, bottom, top and the gap between axes, in points.
    """

    margins = (54, 14, 26, 28, 5)
    _LABEL_SIZE = 8  # points, as style_axes sets them

    def __init__(
        self, viewer: napari.viewer.Viewer, parent: QWidget | None = None
    ) -> None:
        super().__init__(viewer, parent)
        self._ylabels: dict = {}

    def stack_axes(self, heights, n: int, xlabel: str) -> list:
        """Make axes of these height ratios for `n` positions (integers)."""
        axes = list(
            self.figure.subplots(
                len(heights),
                1,
                sharex=True,
                squeeze=False,
                height_ratios=list(heights),
            )[:, 0]
        )
        for ax in axes[:-1]:
            ax.tick_params(labelbottom=False)
        axes[-1].set_xlabel(xlabel, loc='left')
        # integers even when there is only one (a single slice)
        axes[-1].xaxis.set_major_locator(
            MaxNLocator(integer=True, min_n_ticks=1)
        )
        pad = max(0.5, 0.01 * (n - 1))
        axes[0].set_xlim(-pad, n - 1 + pad)
        return axes

    def note(self, text: str) -> None:
        """Say something in the middle of an empty figure."""
        self.figure.text(
            0.5,
            0.5,
            text,
            ha='center',
            va='center',
            color=self.colors['text'],
            fontsize=9,
        )

    def header(self, title: str) -> None:
        """Write the title above the axes, at their left edge."""
        fig = self.figure
        fig.text(
            0,
            1,
            title,
            transform=offset_copy(
                fig.transFigure, fig, x=self.margins[0], y=-2, units='points'
            ),
            ha='left',
            va='top',
            fontsize=9,
            color=self.colors['text'],
        )

    def layout_figure(self) -> None:
        """Keep the margins fixed in points, whatever the canvas size."""
        axes = self.figure.axes
        left, right, bottom, top, gap = self.margins
        width, height = self.figure.bbox.width, self.figure.bbox.height
        px = self.figure.dpi / 72
        avail = height - (top + bottom) * px
        if not axes or width < 150 or avail <= 3 * gap * px * len(axes):
            return
        self.figure.subplots_adjust(
            left=left * px / width,
            right=1 - right * px / width,
            bottom=bottom * px / height,
            top=1 - top * px / height,
            # hspace is in units of the mean axes height
            hspace=gap * px * len(axes) / (avail - gap * px * len(axes)),
        )
        # a y label longer than its axes is cut: shorten it instead
        self._ylabels = {
            ax: self._ylabels.get(ax, ax.get_ylabel()) for ax in axes
        }
        for ax, label in self._ylabels.items():
            room = ax.get_position().height * height
            chars = room / (0.6 * self._LABEL_SIZE * px)
            ax.set_ylabel(_fit_lines(label, int(chars)))
