"""The "Mixing coefficients" dock: form, diagnostics and Run, composed.

The dock only wires its parts: :mod:`.form` gathers the layers and the
options, :mod:`.controls` shows diagnostics and progress, :mod:`.worker`
runs :func:`napari_mixcoef.iter_fit` in a thread, :mod:`.layers` shows the
residual with the data, and :mod:`.plot` docks the coefficient plot.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import Container
from psygnal import Signal

from .controls import Diagnostics, RunControls
from .form import FitForm
from .layers import show_basis, show_residual, show_view
from .record import (
    FitSource,
    bound_summary,
    make_record,
    omitted_summary,
    slices_word,
)
from .worker import FitJob, start_fit

if TYPE_CHECKING:
    import napari

    from napari_mixcoef import MixFit

#: Name of the coefficient plot's dock: the one napari's Plugins menu
#: gives it ("<widget> (<plugin's display name>)"), so that the menu's
#: entry shows and hides the dock this widget made.
PLOT_DOCK_NAME = 'Mixing coefficients plot (Mixing coefficients)'
#: Seconds between progress bar steps (see MixcoefWidget._on_progress).
_PROGRESS_EVERY = 0.2


def _part(part: str, name: str) -> property:
    """Make a widget of one of the dock's parts an attribute of the dock."""
    return property(
        lambda self: getattr(getattr(self, part), name),
        doc=f'The "{name}" widget (of the dock\'s {part[1:]}).',
    )


class MixcoefWidget(Container):
    """Pick a stack and 2 to 8 references, fit every slice, show it all.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer whose layers are offered and which gets the outputs.
    """

    #: Emitted with the :class:`MixFit` once the residual layer and the
    #: plot show it, or with None when a run is cancelled or fails.
    fit_finished = Signal(object)

    stack = _part('_form', 'stack')
    references = _part('_form', 'references')
    reference_1 = _part('_form', 'reference_1')
    reference_2 = _part('_form', 'reference_2')
    not_offered = _part('_form', 'not_offered')
    mask = _part('_form', 'mask')
    model = _part('_form', 'model')
    constraint = _part('_form', 'constraint')
    register = _part('_form', 'register')
    noise = _part('_form', 'noise')
    gain = _part('_form', 'gain')
    camera_offset = _part('_form', 'camera_offset')
    read_noise = _part('_form', 'read_noise')
    stderr = _part('_form', 'stderr')
    residual_view = _part('_form', 'residual_view')
    diagnostics = _part('_diagnostics', 'diagnostics')
    show_basis = _part('_diagnostics', 'show_basis')
    run = _part('_controls', 'run')
    cancel = _part('_controls', 'cancel')
    progress = _part('_controls', 'progress')
    status = _part('_controls', 'status')

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        # magicgui Containers look attributes up among their widgets: build
        # the parts first, set private attributes only after __init__
        form = FitForm(napari_viewer)
        parts = [form, Diagnostics(), RunControls()]
        inner = Container(widgets=parts, labels=False)
        super().__init__(labels=False)
        self.margins = (0, 0, 0, 0)
        # a short dock (the plot docked below, a long status) scrolls the
        # parts instead of squeezing them (the reference rows overlapped)
        self._scroll = _scrolling(inner.native)
        self.native.layout().addWidget(self._scroll)
        self._parts = inner
        self._form, self._diagnostics, self._controls = parts
        self._viewer = napari_viewer
        self._worker = None
        self._inputs: tuple = ()
        self._cancel_reason = ''
        self._answered = True
        self._warnings: list[str] = []
        self._progress_shown = 0.0  # time.monotonic() of the last step shown
        self._connect_events()
        self._update_diagnostics()
        self._warm_up_thread = _start_warm_up()
        # when the widget goes away (dock or viewer closed): stop a running
        # fit and let go of the viewer's layer events
        holder = {
            'worker': None,
            'closed': False,
            'disconnect': self._disconnect_events,
        }
        self._holder = holder
        self.native.destroyed.connect(lambda *_: _quit(holder))

    def options(self) -> dict:
        """Keyword arguments of :func:`napari_mixcoef.fit_stack` set here."""
        return self._form.options()

    # -- events -------------------------------------------------------------

    def _connect_events(self) -> None:
        self._viewer.layers.events.removed.connect(self._on_layer_removed)
        self._form.changed.connect(self._on_inputs_changed)
        self.show_basis.changed.connect(self._on_show_basis)
        self.run.changed.connect(self._on_run)
        self.cancel.changed.connect(self._on_cancel)

    def _disconnect_events(self) -> None:
        """Undo the viewer connection of :meth:`_connect_events`."""
        self._viewer.layers.events.removed.disconnect(self._on_layer_removed)

    def reset_choices(self, *_args) -> None:
        """Refresh every layer picker (napari calls it as layers change)."""
        self._parts.reset_choices()
        self._update_diagnostics()

    def _on_inputs_changed(self, _value=None) -> None:
        self._update_diagnostics()
        if self._worker is None:
            # what the status said was about other inputs
            self._controls.reset()

    def _on_layer_removed(self, event) -> None:
        layer = event.value
        if self._worker is not None and any(
            layer is used or layer == used for used in self._inputs
        ):
            self._stop(f'cancelled: layer "{layer.name}" was removed')

    def _update_diagnostics(self, _value=None) -> None:
        refs = self._form.reference_layers()
        mask = self.mask.value
        self._diagnostics.update_for(
            [None if r is None else r.data for r in refs],
            None if mask is None else mask.data,
            names=[None if r is None else r.name for r in refs],
        )

    def _on_show_basis(self, _value=None) -> None:
        refs = self._form.reference_layers()
        if len(refs) != 2:
            self._controls.show_status(
                'the avg/diff basis is of two references; remove the others '
                'to see it',
                tone='error',
            )
            return
        if None in refs or not all(
            isinstance(r.data, np.ndarray) for r in refs
        ):
            self._controls.show_status(
                'pick two different reference layers held in memory first',
                tone='error',
            )
            return
        show_basis(self._viewer, refs[0], refs[0].data, refs[1].data)

    # -- running ------------------------------------------------------------

    def _on_run(self, _value=None) -> None:
        """Start the fit in a worker thread (ignored while one runs)."""
        if self._worker is not None:
            return
        problem = self._form.problem()
        if problem:
            self._controls.show_status(problem, tone='error')
            return
        stack, mask = self.stack.value, self.mask.value
        refs = self._form.reference_layers()
        self._inputs = (stack, *refs, mask)
        self._cancel_reason = ''
        self._answered = False  # by returned, errored or aborted
        self._warnings = []
        job = FitJob(
            stack=stack.data,
            references=tuple(r.data for r in refs),
            mask=None if mask is None else mask.data,
            options=self._form.options(),
            names={
                'stack': stack.name,
                'references': tuple(r.name for r in refs),
                'mask': None if mask is None else mask.name,
            },
            prepare=_import_plot,
        )
        self._controls.running(True)
        self._controls.show_status(f'fitting {stack.name}…')
        self._worker = start_fit(
            job,
            progress=self._on_progress,
            returned=self._on_returned,
            errored=self._on_errored,
            aborted=self._on_aborted,
            finished=self._on_worker_finished,
            warned=self._warnings.append,
        )
        self._holder['worker'] = self._worker

    def _on_cancel(self, _value=None) -> None:
        self._stop('cancelled')

    def _stop(self, reason: str) -> None:
        if self._worker is not None:
            self._cancel_reason = reason
            self._worker.quit()

    def _on_progress(self, step) -> None:
        if self._holder['closed']:  # the viewer closed mid-run
            return
        done, total = step
        # a progress bar repaints at once on every new value, slowly while
        # both cores fit: a few steps a second are plenty to watch
        now = time.monotonic()
        if 0 < done < total and now - self._progress_shown < _PROGRESS_EVERY:
            return
        self._progress_shown = now
        self._controls.set_progress(done, total)

    def _on_errored(self, err: Exception) -> None:
        # napari shows the error as a notification too (in these words)
        if self._holder['closed']:
            return
        self._answered = True
        self._controls.show_status(f'fit failed: {err}', tone='error')
        self.fit_finished.emit(None)

    def _on_aborted(self) -> None:
        if self._holder['closed']:
            return
        self._answered = True
        self._controls.reset()
        self._controls.show_status(self._cancel_reason or 'cancelled')
        self.fit_finished.emit(None)

    def _on_worker_finished(self) -> None:
        if self._holder['closed']:
            return
        self._worker = self._holder['worker'] = None
        self._controls.running(False)
        if not self._answered:
            # a cancel that lands while the fit's last step runs: superqt
            # then sends neither `returned` (a quit was asked) nor
            # `aborted` (the generator had ended), only `finished`
            self._on_aborted()

    def _on_returned(self, result) -> None:
        if self._holder['closed']:
            return
        from qtpy.QtCore import QTimer

        self._answered = True
        if self._cancel_reason:
            # the fit ended before the stop reached the worker: its result
            # is already queued, but the user asked for none
            self._on_aborted()
            return
        fit, res = result
        stack = self._inputs[0]
        if stack not in self._viewer.layers:
            self._controls.show_status('the stack was removed; nothing shown')
            self.fit_finished.emit(None)
            return
        *refs, mask = self._inputs[1:]
        source = FitSource(
            stack=stack.name,
            references=tuple(r.name for r in refs),
            mask=None if mask is None else mask.name,
            ids=tuple(la.unique_id for la in self._inputs if la is not None),
            first_axis=self._viewer.dims.ndim - stack.ndim,
        )
        view = self.residual_view.value
        residual = show_residual(
            self._viewer, stack, res, make_record(fit, source), view=view
        )
        # the grid, the plot and its first draw each cost a good part of a
        # second the first time: one per turn of the event loop, so that
        # napari paints and answers in between
        QTimer.singleShot(0, lambda: self._show_view(fit, residual, view))

    def _show_view(self, fit: MixFit, residual, view: str) -> None:
        from qtpy.QtCore import QTimer

        if self._holder['closed'] or residual not in self._viewer.layers:
            self.fit_finished.emit(None)
            return
        regrid = show_view(self._viewer, view)
        QTimer.singleShot(0, lambda: self._show_plot(fit, residual, regrid))

    def _show_plot(self, fit: MixFit, residual, regrid: bool) -> None:
        if self._holder['closed'] or residual not in self._viewer.layers:
            self.fit_finished.emit(None)
            return
        plot, docked = self._plot()
        # its size and the view first, or it is drawn twice
        plot.fit_in_window()
        plot.show_output(residual)
        if regrid and not docked:
            self._viewer.reset_view()  # a dock shown re-fits it itself
        text = _summary(fit, self._inputs[1:-1])
        if self._warnings:
            text += '\nwarning: ' + '\nwarning: '.join(
                dict.fromkeys(self._warnings)
            )
        self._controls.show_status(
            text, tone='warning' if self._warnings else ''
        )
        self._show_status_line()
        self.fit_finished.emit(fit)

    def _show_status_line(self) -> None:
        """Scroll a short dock to the result, once the status is laid out."""
        from qtpy.QtCore import QTimer

        status = self.status.native
        QTimer.singleShot(0, lambda: self._scroll.ensureWidgetVisible(status))

    def _plot(self):
        """Return the plot and whether its dock was just shown (or made)."""
        from .plot import CoefficientPlot

        window = self._viewer.window
        plot = find_plot(self._viewer)
        if plot is None:
            plot = CoefficientPlot(self._viewer)
            window.add_dock_widget(plot, name=PLOT_DOCK_NAME, area='bottom')
            return plot, True
        dock = plot.dock()
        if dock is None or not dock.isHidden():
            return plot, False
        dock.show()  # closed with its hide button: back on every run
        dock.raise_()
        return plot, True


def _summary(fit: MixFit, references) -> str:
    """Return the status after a fit: slices, bounds, medians, omitted."""
    n, k = fit.x.size, fit.n_references
    first = f'{slices_word(n)} fitted'
    if k > 2:
        first += f' with {k} references'
    bound = bound_summary(fit)
    if bound:
        first += f'; {bound}'
    lines = [first]
    if not np.isfinite(fit.x).any():
        lines[0] += '; no slice has a finite x'
    elif k == 2:
        lines.append(
            f'median x = {np.nanmedian(fit.x):.4f} '
            f'± {np.nanmedian(fit.x_stderr):.2g}'
        )
    else:
        shares = np.asarray(fit.fractions).reshape(-1, k)
        with np.errstate(all='ignore'):
            medians = np.nanmedian(shares, axis=0)
        lines.append(
            'median shares: '
            + ', '.join(
                f'{r.name} {m:.3f}' for r, m in zip(references, medians)
            )
        )
    if np.isfinite(fit.r2).any():
        lines.append(f'median R² = {np.nanmedian(fit.r2):.4f}')
    if fit.shift is not None:
        failed = int(np.count_nonzero(fit.registration_failed))
        shift = np.abs(np.asarray(fit.shift, dtype=np.float64))
        with np.errstate(all='ignore'):
            largest = (
                float(np.nanmax(shift)) if np.isfinite(shift).any() else 0
            )
        lines.append(
            f'registered: shifts up to {largest:.2f} px; '
            f'{slices_word(failed)} failed'
        )
    omitted = omitted_summary(fit)
    if omitted:
        lines.append(omitted)
    return '\n'.join(lines)


def _scrolling(inner):
    """Return a vertical scroll area around `inner`, as wide as it needs."""
    from qtpy.QtCore import QEvent, QObject, Qt
    from qtpy.QtWidgets import QFrame, QScrollArea

    scroll = QScrollArea()
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    scroll.setWidget(inner)

    def fit() -> None:
        bar = scroll.verticalScrollBar().sizeHint().width()
        scroll.setMinimumWidth(inner.minimumSizeHint().width() + bar)

    class _OnLayout(QObject):
        # the pickers' choices and the status arrive after the parts
        def eventFilter(self, obj, event) -> bool:  # noqa: N802 - Qt's name
            if event.type() == QEvent.Type.LayoutRequest:
                fit()
            return False

    inner.installEventFilter(_OnLayout(scroll))
    fit()
    return scroll


def find_plot(viewer: napari.viewer.Viewer):
    """Return the viewer's coefficient plot dock, however it was opened.

    ``add_plugin_dock_widget`` and the Plugins menu name it differently.
    """
    from .plot import CoefficientPlot

    for widget in viewer.window.dock_widgets.values():
        if isinstance(widget, CoefficientPlot):
            return widget
    return None


def _import_plot() -> None:
    """Import the plot module (and matplotlib) off the GUI thread."""
    from . import plot  # noqa: F401


def _draw_text_offscreen() -> None:
    """Load matplotlib's fonts off the GUI thread with a throwaway figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(2, 1))
    FigureCanvasAgg(figure)
    figure.subplots().plot([0, 1])
    figure.text(0.5, 0.5, 'R² ± 0.01')
    figure.canvas.draw()


_QUITTING = threading.Event()  # set when the Qt application quits
_QUIT_WATCHED = False


def _warm_up() -> None:
    from napari_mixcoef import warm_up

    try:
        _import_plot()
        _draw_text_offscreen()
        warm_up()
    except Exception as err:
        # quitting napari shuts the engine's threads down under a warm-up
        # still running: nothing is wrong, and nothing to tell
        if not _quitting(err):
            raise


def _quitting(err: Exception) -> bool:
    """Tell whether `err` came from Python or Qt shutting down."""
    # concurrent.futures refuses work once the interpreter exits, even
    # when Qt's event loop never ran (a script, a closed console)
    shut = isinstance(err, RuntimeError) and 'shutdown' in str(err)
    return shut or _QUITTING.is_set() or sys.is_finalizing()


def _start_warm_up() -> threading.Thread:
    """Import matplotlib and load numba's kernels in the background.

    matplotlib's first import and numba's loading (or first compile) take
    from one to many seconds of mostly Python work: do both now, not when
    the first fit runs or ends.
    """
    from qtpy.QtCore import QCoreApplication

    global _QUIT_WATCHED
    app = QCoreApplication.instance()
    if app is not None and not _QUIT_WATCHED:
        app.aboutToQuit.connect(_QUITTING.set)
        _QUIT_WATCHED = True
    thread = threading.Thread(
        target=_warm_up, name='napari-mixcoef warm-up', daemon=True
    )
    thread.start()
    return thread


def _quit(holder: dict) -> None:
    holder['closed'] = True
    disconnect = holder.pop('disconnect', None)
    if disconnect is not None:
        disconnect()
    worker = holder.get('worker')
    if worker is not None:
        worker.quit()
