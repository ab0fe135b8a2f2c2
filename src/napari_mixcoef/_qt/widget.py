"""The "Mixing coefficients" dock widget: a thin form over the core.

It gathers the layers and the model, runs :func:`napari_mixcoef.core`'s
streaming fit in a worker thread (progress, Cancel), and shows the result:
a lazy residual layer and the coefficient plot dock.  All numerics live in
:mod:`napari_mixcoef.core`.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
)
from psygnal import Signal

from ..core import MODELS, NOISE_MODELS, STDERR_MODES, reference_diagnostics

if TYPE_CHECKING:
    import napari

    from ..core import MixFit

#: Name of the coefficient plot dock (the contract asks for "plot").
PLOT_DOCK_NAME = 'Mixing coefficients plot'
_OUTPUT_KEY = 'mixcoef'
_NOISE_LABELS = {
    'gaussian': 'Gaussian (least squares)',
    'poisson': 'Poisson (photon counts)',
    'huber': 'Huber (robust to hot pixels)',
}
_STDERR_LABELS = {
    'auto': 'robust (unequal, correlated noise)',
    'ols': 'textbook OLS',
}
_BASIS_KEY = 'mixcoef_basis'
_MODEL_LABELS = {
    'mix': 'x·A + (1−x)·B  (mix)',
    'scaled': 'a·A + b·B  (scaled)',
    'offset': 'a·A + b·B + c  (offset)',
}


def _fit_in_thread(stack, ref1, ref2, mask, options: dict):
    """Worker body: yield ``(done, total)`` per chunk, return the result.

    Runs in the worker thread, so this is where lazy (dask) references and
    masks are computed -- never on the GUI thread.
    """
    # Import the plot module here, off the GUI thread: matplotlib's first
    # import takes most of a second and would freeze napari when the
    # result is shown.
    from ..core import iter_fit, residuals
    from . import plot  # noqa: F401

    ref1, ref2 = np.asarray(ref1), np.asarray(ref2)
    if mask is not None:
        mask = np.asarray(mask) != 0
    try:
        fit = yield from iter_fit(stack, ref1, ref2, mask=mask, **options)
        return fit, residuals(stack, ref1, ref2, fit)
    except RuntimeError as err:
        # superqt ends a generator worker that raises a RuntimeError
        # without any signal (it takes it for a deleted Qt object): the run
        # would never end.  Any other exception type reaches `errored`.
        raise FitFailed(str(err)) from err


def _steps_of(fit):
    """Yield the steps of the generator ``fit``, return its value.

    The widget makes ``fit`` itself, to close it when the worker stops.
    """
    return (yield from fit)


class FitFailed(Exception):
    """A fit failed in the worker thread (see :func:`_fit_in_thread`)."""


def _is_output(layer) -> bool:
    return _OUTPUT_KEY in getattr(layer, 'metadata', {})


def _data_shape(layer) -> tuple[int, ...] | None:
    """Shape of a single-scale, non-RGB layer's data, else None."""
    if getattr(layer, 'multiscale', False) or getattr(layer, 'rgb', False):
        return None
    return tuple(layer.data.shape)


class MixcoefWidget(Container):
    """Pick a stack and two references, fit every slice, show the result.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer whose layers are offered and which gets the outputs.
    """

    #: Emitted with the :class:`MixFit` once the residual layer and the
    #: plot show it, or with None when a run is cancelled or fails.
    fit_finished = Signal(object)

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        # magicgui Containers look attributes up among their widgets: build
        # the widgets first, set private attributes only after __init__.
        super().__init__(
            widgets=[
                ComboBox(name='stack', label='stack'),
                ComboBox(name='reference_1', label='reference 1'),
                ComboBox(name='reference_2', label='reference 2'),
                Label(name='diagnostics', label=' ', value=''),
                PushButton(name='show_basis', text='Show avg/diff basis'),
                ComboBox(name='mask', label='mask', nullable=True),
                ComboBox(
                    name='model',
                    label='model',
                    choices=[(_MODEL_LABELS[m], m) for m in MODELS],
                    value='mix',
                ),
                ComboBox(
                    name='noise',
                    label='noise',
                    choices=[(_NOISE_LABELS[m], m) for m in NOISE_MODELS],
                    value='gaussian',
                ),
                FloatSpinBox(
                    name='gain',
                    label='gain (counts/photon)',
                    value=1.0,
                    min=1e-6,
                    max=1e6,
                    step=0.1,
                ),
                FloatSpinBox(
                    name='camera_offset',
                    label='camera offset',
                    value=0.0,
                    min=-1e9,
                    max=1e9,
                    step=1.0,
                ),
                FloatSpinBox(
                    name='read_noise',
                    label='read noise (photons)',
                    value=0.0,
                    min=0.0,
                    max=1e6,
                    step=0.1,
                ),
                ComboBox(
                    name='stderr',
                    label='errors',
                    choices=[(_STDERR_LABELS[m], m) for m in STDERR_MODES],
                    value='auto',
                ),
                PushButton(name='run', text='Run'),
                PushButton(name='cancel', text='Cancel', enabled=False),
                ProgressBar(name='progress', value=0, min=0, max=1),
                Label(name='status', label=' ', value=''),
            ]
        )
        self._viewer = napari_viewer
        self._worker = None
        self._inputs: tuple = ()
        self._plot = None
        self._cancel_reason = ''
        self._answered = True
        self._outputs = weakref.WeakKeyDictionary()
        self._progress_shown = 0.0  # time.monotonic() of the last step shown
        self.stack.choices = self._stack_choices
        self.reference_1.choices = self._reference_choices
        self.reference_2.choices = self._reference_choices
        self.mask.choices = self._mask_choices
        # a word-wrapped label in a form row needs room for three lines
        self.status.native.setWordWrap(True)
        self.diagnostics.native.setWordWrap(True)
        self.status.native.setMinimumHeight(
            4 * self.status.native.fontMetrics().height()
        )
        self._connect_events()
        self.reset_choices()
        self._on_noise_changed()
        self._update_diagnostics()
        # matplotlib's first import takes most of a second of mostly Python
        # work, numba's import and machine code a few seconds: do both now,
        # in the background, not when the first fit runs or ends
        self._warm_up_thread = threading.Thread(target=_warm_up, daemon=True)
        self._warm_up_thread.start()
        # when the widget goes away (dock or viewer closed): stop a running
        # fit and let go of the viewer's layer events
        holder = {
            'worker': None,
            'closed': False,
            'disconnect': self._disconnect_events,
        }
        self._holder = holder
        self.native.destroyed.connect(lambda *_: _quit(holder))

    # -- layer choices ---------------------------------------------------

    def _stack_choices(self, _widget=None) -> list[tuple[str, object]]:
        return [
            (layer.name, layer)
            for layer in self._viewer.layers
            if layer._type_string == 'image'
            and not _is_output(layer)
            and (_data_shape(layer) or ())
            and len(_data_shape(layer)) >= 3
        ]

    def _ref_shape(self) -> tuple[int, ...] | None:
        ref = self.reference_1.value
        return None if ref is None else _data_shape(ref)

    def _reference_choices(self, _widget=None) -> list[tuple[str, object]]:
        stack = self.stack.value
        shape = None if stack is None else _data_shape(stack)
        if not shape:
            return []
        out = []
        for layer in self._viewer.layers:
            ref = _data_shape(layer) if layer._type_string == 'image' else None
            if (
                ref
                and layer is not stack
                and _BASIS_KEY not in layer.metadata
                and 2 <= len(ref) < len(shape)
                and shape[len(shape) - len(ref) :] == ref
            ):
                out.append((layer.name, layer))
        return out

    def _mask_choices(self, _widget=None) -> list[tuple[str, object]]:
        shape = self._ref_shape()
        if shape is None:
            return []
        return [
            (layer.name, layer)
            for layer in self._viewer.layers
            if layer._type_string in ('labels', 'image')
            and _data_shape(layer) == shape
            and np.dtype(layer.data.dtype).kind in 'biu'
        ]

    def reset_choices(self, *_args) -> None:
        """Refresh every layer picker from the viewer's layers."""
        super().reset_choices()
        self._default_second_reference()

    def _default_second_reference(self) -> None:
        choices = [c for c in self.reference_2.choices if c is not None]
        if self.reference_2.value is self.reference_1.value and (
            len(choices) > 1
        ):
            first = self.reference_1.value
            self.reference_2.value = next(c for c in choices if c is not first)

    # -- events ------------------------------------------------------------

    def _connect_events(self) -> None:
        layers = self._viewer.layers.events
        layers.inserted.connect(self._on_layers_changed)
        layers.removed.connect(self._on_layer_removed)
        layers.moved.connect(self._on_layers_changed)
        for layer in self._viewer.layers:
            layer.events.name.connect(self._on_layers_changed)
        self.stack.changed.connect(self._on_stack_changed)
        self.reference_1.changed.connect(self._on_reference_changed)
        self.run.changed.connect(self._on_run)
        self.reference_2.changed.connect(self._update_diagnostics)
        self.mask.changed.connect(self._update_diagnostics)
        self.noise.changed.connect(self._on_noise_changed)
        self.show_basis.changed.connect(self._on_show_basis)
        self.cancel.changed.connect(self._on_cancel)

    def _disconnect_events(self) -> None:
        """Undo the viewer connections of :meth:`_connect_events`."""
        layers = self._viewer.layers.events
        layers.inserted.disconnect(self._on_layers_changed)
        layers.removed.disconnect(self._on_layer_removed)
        layers.moved.disconnect(self._on_layers_changed)
        for layer in self._viewer.layers:
            layer.events.name.disconnect(self._on_layers_changed)

    def _on_layers_changed(self, event=None) -> None:
        if event is not None and getattr(event, 'type', '') == 'inserted':
            event.value.events.name.connect(self._on_layers_changed)
        self.reset_choices()

    def _on_layer_removed(self, event) -> None:
        layer = event.value
        layer.events.name.disconnect(self._on_layers_changed)
        if self._worker is not None and any(
            layer is used for used in self._inputs
        ):
            self._stop(f'cancelled: layer "{layer.name}" was removed')
        self.reset_choices()

    def _on_stack_changed(self, _value=None) -> None:
        self.reference_1.reset_choices()
        self.reference_2.reset_choices()
        self._default_second_reference()

    def _on_reference_changed(self, _value=None) -> None:
        self.mask.reset_choices()
        self._default_second_reference()
        self._update_diagnostics()

    def _on_noise_changed(self, _value=None) -> None:
        poisson = self.noise.value == 'poisson'
        for widget in (self.gain, self.camera_offset, self.read_noise):
            widget.visible = poisson

    def options(self) -> dict:
        """Keyword arguments of :func:`fit_stack` set in the form."""
        return {
            'model': self.model.value,
            'noise': self.noise.value,
            'gain': float(self.gain.value),
            'camera_offset': float(self.camera_offset.value),
            'read_noise': float(self.read_noise.value),
            'stderr': self.stderr.value,
        }

    def _picked_references(self):
        """Return the two reference arrays if picked, distinct, in memory."""
        ref1, ref2 = self.reference_1.value, self.reference_2.value
        if ref1 is None or ref2 is None or ref1 is ref2:
            return None
        arrays = (ref1.data, ref2.data)
        # lazy (dask) references are read by the worker, not here
        if not all(isinstance(a, np.ndarray) for a in arrays):
            return None
        return arrays

    def _update_diagnostics(self, _value=None) -> None:
        """Say how well the picked references can be told apart."""
        arrays = self._picked_references()
        mask = self.mask.value
        if arrays is None:
            self.diagnostics.value = ''
            return
        mask_data = mask.data if mask is not None else None
        if mask_data is not None and not isinstance(mask_data, np.ndarray):
            mask_data = None
        try:
            d = reference_diagnostics(*arrays, mask=mask_data)
        except (ValueError, TypeError) as err:
            self.diagnostics.value = str(err)
            self.diagnostics.native.setStyleSheet('color: #e06c75;')
            return
        text = (
            f'A−B holds {100 * d["diff_energy_fraction"]:.3g} % of the '
            f"pair's energy; error of x ≈ {d['x_stderr_per_noise']:.2g} × "
            'the noise σ (white noise)'
        )
        bad = d['collinear'] or d['nearly_collinear']
        if d['collinear']:
            text = 'collinear references: x cannot be measured. ' + text
        elif d['nearly_collinear']:
            text = 'nearly collinear references: ' + text
        self.diagnostics.value = text
        self.diagnostics.native.setStyleSheet('color: #e5c07b;' if bad else '')

    def _on_show_basis(self, _value=None) -> None:
        """Add (or update) the avg/diff basis of the references as layers.

        ``(A+B)/√2`` is what the references share, ``(A−B)/√2`` where they
        differ: only pixels bright in the second tell a mix apart.
        """
        arrays = self._picked_references()
        if arrays is None:
            self._show_status(
                'pick two different, in-memory reference layers first',
                error=True,
            )
            return
        a, b = (np.asarray(v, dtype=np.float32) for v in arrays)
        avg, diff = (a + b) / np.sqrt(2), (a - b) / np.sqrt(2)
        spread = float(np.abs(diff).max()) or 1.0
        ref = self.reference_1.value
        for name, data, props in (
            ('avg basis (A+B)/√2', avg, {'colormap': 'gray'}),
            (
                'diff basis (A−B)/√2',
                diff,
                {'colormap': 'PiYG', 'contrast_limits': (-spread, spread)},
            ),
        ):
            props = dict(
                props,
                scale=ref.scale,
                translate=ref.translate,
                metadata={_BASIS_KEY: True},
            )
            if name in self._viewer.layers and _BASIS_KEY in (
                self._viewer.layers[name].metadata
            ):
                layer = self._viewer.layers[name]
                layer.data = data
                for key, value in props.items():
                    setattr(layer, key, value)
            else:
                self._viewer.add_image(data, name=name, **props)

    # -- running ------------------------------------------------------------

    def _check_form(self) -> str:
        stack, ref1, ref2 = (
            self.stack.value,
            self.reference_1.value,
            self.reference_2.value,
        )
        if stack is None:
            return (
                'no stack: open an image stack with at least 3 '
                'dimensions (File > Open Sample > napari-mixcoef)'
            )
        if ref1 is None or ref2 is None:
            return (
                'pick two reference layers whose shape matches the '
                'last dimensions of the stack'
            )
        if ref1 is ref2:
            return 'reference 1 and reference 2 are the same layer: pick two'
        return ''

    def _on_run(self, _value=None) -> None:
        """Start the fit in a worker thread (ignored while one runs)."""
        if self._worker is not None:
            return
        problem = self._check_form()
        if problem:
            self._show_status(problem, error=True)
            return
        from napari.qt.threading import create_worker
        from qtpy.QtCore import Qt

        stack, ref1, ref2 = (
            self.stack.value,
            self.reference_1.value,
            self.reference_2.value,
        )
        mask = self.mask.value
        self._inputs = (stack, ref1, ref2, mask)
        self._cancel_reason = ''
        self._answered = False  # by returned, errored or aborted
        fit = _fit_in_thread(
            stack.data,
            ref1.data,
            ref2.data,
            None if mask is None else mask.data,
            self.options(),
        )
        worker = create_worker(
            _steps_of, fit, _start_thread=False, _ignore_errors=True
        )
        # A worker told to quit (Cancel, a removed layer, napari closing)
        # stops resuming the fit but leaves it suspended: it kept its BLAS
        # thread limit, chunk threads and arrays until garbage collection,
        # which after a removed layer or a closed viewer never came (numpy
        # stayed on one BLAS thread).  Close it at once, in the worker's
        # thread, which sends `aborted` with the fit paused between steps.
        worker.aborted.connect(
            fit.close, type=Qt.ConnectionType.DirectConnection
        )
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_errored)
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_worker_finished)
        self._worker = worker
        self._holder['worker'] = worker
        self.run.enabled = False
        self.cancel.enabled = True
        self.progress.value = 0
        self._show_status(f'fitting {stack.name}…')
        worker.start()

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
        # QProgressBar repaints synchronously on every new value; with the
        # window's OpenGL canvas and both cores busy fitting, one repaint
        # took 50-200 ms here.  A few steps a second are plenty to watch.
        now = time.monotonic()
        if 0 < done < total and now - self._progress_shown < _PROGRESS_EVERY:
            return
        self._progress_shown = now
        self.progress.max = max(total, 1)
        self.progress.value = done

    def _on_errored(self, err: Exception) -> None:
        if self._holder['closed']:  # the viewer closed mid-run
            return
        self._answered = True
        from napari.utils.notifications import show_error

        self._show_status(f'fit failed: {err}', error=True)
        show_error(f'Mixing coefficients: {err}')
        self.fit_finished.emit(None)

    def _on_aborted(self) -> None:
        if self._holder['closed']:  # the viewer closed mid-run
            return
        self._answered = True
        self._show_status(self._cancel_reason or 'cancelled')
        self.fit_finished.emit(None)

    def _on_worker_finished(self) -> None:
        if self._holder['closed']:  # the viewer closed mid-run
            return
        self._worker = None
        self._holder['worker'] = None
        self.run.enabled = True
        self.cancel.enabled = False
        if not self._answered:
            # A cancel that lands while the fit's last step runs: superqt
            # then sends neither `returned` (a quit was asked) nor
            # `aborted` (the generator had ended), only `finished`.
            self._on_aborted()

    def _on_returned(self, result) -> None:
        if self._holder['closed']:  # the viewer closed mid-run
            return
        from qtpy.QtCore import QTimer

        self._answered = True
        if self._cancel_reason:
            # The fit ended before the stop reached the worker: its result
            # is already queued, but the user asked for none.
            self._on_aborted()
            return
        fit, res = result
        stack_layer = self._inputs[0]
        if stack_layer not in self._viewer.layers:
            self._show_status('the stack layer was removed; nothing shown')
            self.fit_finished.emit(None)
            return
        self._show_residual(stack_layer, fit, res)
        # The plot's first draw is the costly part: give the event loop a
        # turn to paint the new layer before it.
        QTimer.singleShot(0, lambda: self._show_plot(stack_layer, fit))

    def _metadata(self, fit: MixFit) -> dict:
        stack, ref1, ref2, mask = self._inputs
        return {
            'x': fit.x,
            'x_stderr': fit.x_stderr,
            'r2': fit.r2,
            'rmse': fit.rmse,
            'coef': fit.coef,
            'stderr': fit.stderr,
            'names': fit.names,
            'model': fit.model,
            'noise': fit.noise,
            'stderr_mode': fit.stderr_mode,
            'n_pixels': fit.n_pixels,
            'stack': stack.name,
            'reference_1': ref1.name,
            'reference_2': ref2.name,
            'mask': None if mask is None else mask.name,
            'fit': fit,
        }

    def _show_residual(self, stack_layer, fit: MixFit, res) -> None:
        """Add the residual layer, or update the one an earlier run made."""
        name = f'{stack_layer.name} residual'
        spread = float(np.nanmedian(fit.rmse)) if fit.rmse.size else 0.0
        spread = 4 * spread if np.isfinite(spread) and spread > 0 else 1.0
        # contrast limits given, so napari never scans the lazy stack
        props = {
            'contrast_limits': (-spread, spread),
            'colormap': 'PiYG',
            'scale': stack_layer.scale,
            'translate': stack_layer.translate,
            'metadata': {_OUTPUT_KEY: self._metadata(fit)},
        }
        # this stack's output from an earlier run: remembered, or found by
        # name when the widget was reopened
        mine = self._outputs.get(stack_layer)
        existing = [
            layer
            for layer in self._viewer.layers
            if _is_output(layer) and (layer is mine or layer.name == name)
        ]
        for layer in existing[1:]:
            self._viewer.layers.remove(layer)
        if existing and existing[0].data.shape == res.shape:
            layer = existing[0]
            layer.data = res
            for key, value in props.items():
                setattr(layer, key, value)
            layer.name = name
        else:
            if existing:
                self._viewer.layers.remove(existing[0])
            layer = self._viewer.add_image(res, name=name, **props)
        self._outputs[stack_layer] = layer

    def _show_plot(self, stack_layer, fit: MixFit) -> None:
        from .plot import CoefficientPlot

        if self._plot is None or not _alive(self._plot):
            self._plot = CoefficientPlot(self._viewer)
            self._viewer.window.add_dock_widget(
                self._plot, name=PLOT_DOCK_NAME, area='bottom'
            )
        first_axis = self._viewer.dims.ndim - stack_layer.ndim
        self._plot.set_fit(
            fit,
            first_axis=first_axis,
            title=f'{stack_layer.name}: {fit.model} model',
        )
        if fit.x.size:
            self._show_status(
                f'{fit.x.size} slices fitted\n'
                f'median x = {np.nanmedian(fit.x):.4f} '
                f'± {np.nanmedian(fit.x_stderr):.2g}\n'
                f'median R² = {np.nanmedian(fit.r2):.4f}'
            )
        self.fit_finished.emit(fit)

    def _show_status(self, text: str, *, error: bool = False) -> None:
        self.status.value = text
        self.status.native.setStyleSheet('color: #e06c75;' if error else '')


#: Seconds between progress bar steps (see MixcoefWidget._on_progress).
_PROGRESS_EVERY = 0.2


def _warm_up() -> None:
    from ..core import warm_up
    from . import plot  # noqa: F401

    warm_up()


def _alive(widget) -> bool:
    """Tell whether Qt still holds the widget (its dock was not closed)."""
    try:
        widget.isVisible()
    except RuntimeError:
        return False
    return True


def _quit(holder: dict) -> None:
    holder['closed'] = True
    disconnect = holder.pop('disconnect', None)
    if disconnect is not None:
        disconnect()
    worker = holder.get('worker')
    if worker is not None:
        worker.quit()
