"""The dock widget in a real napari viewer (virtual display, no mocks)."""

import sys
import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose

from napari_mixcoef import fit_stack
from napari_mixcoef._qt.widget import PLOT_DOCK_NAME
from napari_mixcoef.sample_data import make_mixture

PLUGIN = 'napari-mixcoef'


@pytest.fixture
def sample_viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, 'mixture')
    _, widget = viewer.window.add_plugin_dock_widget(
        PLUGIN, 'Mixing coefficients'
    )
    return viewer, widget


@pytest.fixture
def big_viewer(make_napari_viewer, monkeypatch):
    """A viewer with a 3000-slice stack whose fit pauses after one step.

    The compiled kernels fit it in ~0.1 s: too fast to act mid-run without
    the pause.  The third value records each fit of that stack as it
    starts, and the BLAS thread counts as it ends or is closed (never, for
    a fit left suspended).
    """
    import time

    from napari_mixcoef import core

    steps = core.iter_fit
    fits = {'started': [], 'ended': [], 'switch': sys.getswitchinterval()}

    def paused(stack, *args, **kwargs):
        gen = steps(stack, *args, **kwargs)
        if len(stack) == 3000:
            fits['started'].append(True)
        try:
            yield next(gen)
            if len(stack) == 3000:  # not the widget's own warm-up fits
                time.sleep(0.5)  # the test acts on the GUI thread meanwhile
            return (yield from gen)
        finally:
            gen.close()
            if len(stack) == 3000:
                fits['ended'].append(blas_threads())

    monkeypatch.setattr(core, 'iter_fit', paused)
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    a, b = rng.random((2, 128, 128)).astype(np.float32) + 1
    viewer.add_image(a, name='A')
    viewer.add_image(b, name='B')
    big = rng.random((3000, 128, 128), dtype=np.float32)
    viewer.add_image(big, name='big', contrast_limits=(0, 1))
    _, widget = viewer.window.add_plugin_dock_widget(
        PLUGIN, 'Mixing coefficients'
    )
    return viewer, widget, fits


def blas_threads() -> list[int]:
    """Threads of the BLAS libraries that fits limit (numpy's among them)."""
    from napari_mixcoef.engine.threads import blas_libraries

    return [lib.num_threads for lib, _ in blas_libraries()]


def assert_fits_closed(qtbot, fits, before):
    # a stopped fit is closed in its thread, not left suspended: BLAS has
    # its threads back (a suspended fit kept numpy on one) and Python its
    # GIL switch interval
    qtbot.waitUntil(
        lambda: len(fits['ended']) == len(fits['started']), timeout=10_000
    )
    assert fits['ended'] == [before] * len(fits['started'])
    qtbot.waitUntil(
        lambda: sys.getswitchinterval() == fits['switch'], timeout=10_000
    )


def run_and_wait(qtbot, widget, timeout=60_000):
    with qtbot.waitSignal(widget.fit_finished, timeout=timeout) as blocker:
        widget.run.native.click()
    return blocker.args[0]


def test_sample_layers(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, 'mixture')
    names = [layer.name for layer in viewer.layers]
    assert set(names) == {'mixture stack', 'reference 1', 'reference 2'}
    stack = viewer.layers['mixture stack']
    assert stack.data.dtype == np.uint16
    assert stack.data.shape == (200, 128, 128)
    truth = stack.metadata['truth_x']
    assert truth.shape == (200,)
    assert 0.4 <= truth.min() and truth.max() <= 0.7


def test_defaults_follow_the_sample(sample_viewer):
    viewer, w = sample_viewer
    assert w.stack.value is viewer.layers['mixture stack']
    assert w.reference_1.value is viewer.layers['reference 1']
    assert w.reference_2.value is viewer.layers['reference 2']
    assert w.mask.value is None
    assert w.model.value == 'mix'


def test_run_matches_core_and_truth(sample_viewer, qtbot, tmp_path):
    viewer, w = sample_viewer
    before = {layer.name: np.array(layer.data) for layer in viewer.layers}
    fit = run_and_wait(qtbot, w)
    layer = viewer.layers['mixture stack residual']
    meta = layer.metadata['mixcoef']
    for key in ('x', 'x_stderr', 'r2', 'rmse', 'coef', 'names', 'model'):
        assert key in meta
    stack = viewer.layers['mixture stack'].data
    ref1 = viewer.layers['reference 1'].data
    ref2 = viewer.layers['reference 2'].data
    expected = fit_stack(stack, ref1, ref2)
    assert_allclose(meta['x'], expected.x, rtol=1e-12)
    assert_allclose(fit.r2, expected.r2, rtol=1e-12)
    truth = viewer.layers['mixture stack'].metadata['truth_x']
    good = meta['r2'] > 0.95  # the sample's debris/defocus slices aside
    assert good.sum() >= 190
    assert np.abs(meta['x'][good] - truth[good]).max() < 0.01
    # the residual is lazy and exact where read
    assert type(layer.data).__name__ == 'ResidualStack'
    i = 17
    model_img = meta['x'][i] * ref1 + (1 - meta['x'][i]) * ref2
    assert_allclose(np.asarray(layer.data[i]), stack[i] - model_img, atol=1e-2)
    source = viewer.layers['mixture stack']
    assert layer.scale.tolist() == source.scale.tolist()
    # inputs untouched
    for name, data in before.items():
        assert np.array_equal(viewer.layers[name].data, data)
    assert PLOT_DOCK_NAME in viewer.window.dock_widgets
    screenshot = viewer.screenshot(canvas_only=False, flash=False)
    from skimage.io import imsave

    imsave(tmp_path / 'widget.png', screenshot, check_contrast=False)


def test_rerun_replaces_output(sample_viewer, qtbot):
    viewer, w = sample_viewer
    run_and_wait(qtbot, w)
    n_layers = len(viewer.layers)
    w.model.value = 'offset'
    fit = run_and_wait(qtbot, w)
    assert len(viewer.layers) == n_layers
    outputs = [layer for layer in viewer.layers if 'residual' in layer.name]
    assert len(outputs) == 1
    assert outputs[0].metadata['mixcoef']['model'] == 'offset'
    assert fit.model == 'offset'
    docks = [name for name in viewer.window.dock_widgets if 'plot' in name]
    assert len(docks) == 1


def test_cancel_leaves_nothing(big_viewer, qtbot):
    # Cancel at once: the worker may quit before the fit's first step
    viewer, w, fits = big_viewer
    assert w.stack.value.name == 'big'
    before = blas_threads()
    with qtbot.waitSignal(w.fit_finished, timeout=60_000) as blocker:
        w.run.native.click()
        w.cancel.native.click()
    assert blocker.args[0] is None
    assert 'cancelled' in w.status.value
    assert [layer.name for layer in viewer.layers] == ['A', 'B', 'big']
    qtbot.waitUntil(lambda: w.run.enabled, timeout=10_000)
    assert_fits_closed(qtbot, fits, before)


def test_removing_an_input_cancels(big_viewer, qtbot):
    # removed while the fit is under way (in its pause)
    viewer, w, fits = big_viewer
    before = blas_threads()
    with qtbot.waitSignal(w.fit_finished, timeout=60_000) as blocker:
        w.run.native.click()
        qtbot.waitUntil(lambda: bool(fits['started']), timeout=10_000)
        viewer.layers.remove('B')
    assert blocker.args[0] is None
    assert 'removed' in w.status.value
    assert [layer.name for layer in viewer.layers] == ['A', 'big']
    assert fits['started']
    assert_fits_closed(qtbot, fits, before)


def test_a_stop_after_the_fit_ended_shows_nothing(sample_viewer, qtbot):
    # the fit can end, its result queued, before the GUI thread handles a
    # layer removal (seen in CI): the removal still cancels the run
    from qtpy.QtCore import QThreadPool

    viewer, w = sample_viewer
    with qtbot.waitSignal(w.fit_finished, timeout=60_000) as blocker:
        w.run.native.click()
        assert QThreadPool.globalInstance().waitForDone(60_000)
        viewer.layers.remove('reference 2')
    assert blocker.args[0] is None
    assert 'removed' in w.status.value
    assert [layer.name for layer in viewer.layers] == [
        'reference 1',
        'mixture stack',
    ]
    qtbot.waitUntil(lambda: w.run.enabled, timeout=10_000)


def test_a_cancel_during_the_last_step_ends_the_run(
    sample_viewer, qtbot, monkeypatch
):
    # a cancel that lands while the last step runs: superqt then sends
    # neither `returned` nor `aborted`, only `finished`
    from napari_mixcoef import core

    steps = core.iter_fit
    viewer, w = sample_viewer

    def cancelled_at_the_end(stack, *args, **kwargs):
        fit = yield from steps(stack, *args, **kwargs)
        if len(stack) >= 10:  # not the widget's own warm-up fits
            w._stop('cancelled')  # as the Cancel button, mid-step
        return fit

    monkeypatch.setattr(core, 'iter_fit', cancelled_at_the_end)
    n_layers = len(viewer.layers)
    assert run_and_wait(qtbot, w, timeout=20_000) is None
    assert 'cancelled' in w.status.value
    assert len(viewer.layers) == n_layers
    qtbot.waitUntil(lambda: w.run.enabled, timeout=10_000)


def test_rename_mid_run_names_output_after_the_new_name(sample_viewer, qtbot):
    viewer, w = sample_viewer
    with qtbot.waitSignal(w.fit_finished, timeout=60_000):
        w.run.native.click()
        viewer.layers['mixture stack'].name = 'renamed'
    assert 'renamed residual' in viewer.layers
    # the pickers show the new name
    assert 'renamed' in [c for c in w.stack.choices] or any(
        getattr(c, 'name', None) == 'renamed' for c in w.stack.choices
    )


def test_bad_form_says_what_to_do(make_napari_viewer):
    viewer = make_napari_viewer()
    _, w = viewer.window.add_plugin_dock_widget(PLUGIN, 'Mixing coefficients')
    w.run.native.click()
    assert 'no stack' in w.status.value
    viewer.add_image(np.zeros((5, 8, 8)), name='s')
    viewer.add_image(np.ones((8, 8)), name='r')
    w.reset_choices()
    assert w.stack.value is viewer.layers['s']
    w.run.native.click()
    assert 'same layer' in w.status.value or 'pick two' in w.status.value


def test_collinear_references_error_is_shown(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    a = np.random.default_rng(1).random((16, 16)) + 1
    viewer.add_image(a, name='A')
    viewer.add_image(2 * a, name='2A')
    viewer.add_image(np.stack([a] * 5), name='s')
    _, w = viewer.window.add_plugin_dock_widget(PLUGIN, 'Mixing coefficients')
    with qtbot.waitSignal(w.fit_finished, timeout=30_000) as blocker:
        w.run.native.click()
    assert blocker.args[0] is None
    assert 'collinear' in w.status.value
    assert len(viewer.layers) == 3


def test_dask_layer_and_labels_mask(make_napari_viewer, qtbot):
    import dask.array as da

    viewer = make_napari_viewer()
    stack, a, b, truth = make_mixture(n_slices=40, shape=(64, 64))
    lazy = da.from_array(stack, chunks=(8, 64, 64))
    viewer.add_image(a, name='A')
    viewer.add_image(b, name='B')
    viewer.add_image(lazy, name='lazy', contrast_limits=(0, 4000))
    labels = np.zeros((64, 64), np.int32)
    labels[8:56, 8:56] = 1
    viewer.add_labels(labels, name='roi')
    _, w = viewer.window.add_plugin_dock_widget(PLUGIN, 'Mixing coefficients')
    assert w.stack.value.name == 'lazy'
    w.mask.value = viewer.layers['roi']
    w.model.value = 'scaled'
    fit = run_and_wait(qtbot, w)
    expected = fit_stack(stack, a, b, model='scaled', mask=labels > 0)
    # uint16 data, float32 work: the dask layer's per-slice fit and the
    # in-memory two passes round differently (~5e-8); a wrong mask or
    # layer would move x by far more
    assert_allclose(fit.x, expected.x, rtol=1e-6)
    assert fit.n_pixels == 48 * 48
    layer = viewer.layers['lazy residual']
    assert layer.metadata['mixcoef']['mask'] == 'roi'
    assert isinstance(viewer.layers['lazy'].data, da.Array)  # untouched


def test_plot_cursor_and_slider_are_linked(sample_viewer, qtbot):
    from matplotlib.backend_bases import MouseEvent

    viewer, w = sample_viewer
    run_and_wait(qtbot, w)
    plot = viewer.window.dock_widgets[PLOT_DOCK_NAME]
    viewer.dims.set_current_step(0, 123)
    assert all(line.get_xdata()[0] == 123 for line in plot._cursor_lines)
    plot.canvas.draw()
    ax = plot.axes_x
    xy = ax.transData.transform((42, float(np.mean(ax.get_ylim()))))
    MouseEvent('button_press_event', plot.canvas, *xy, button=1)._process()
    assert viewer.dims.current_step[0] == 42


def test_two_leading_dims(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    stack, a, b, _ = make_mixture(n_slices=24, shape=(32, 32))
    viewer.add_image(a, name='A')
    viewer.add_image(b, name='B')
    viewer.add_image(stack.reshape(6, 4, 32, 32), name='tz')
    _, w = viewer.window.add_plugin_dock_widget(PLUGIN, 'Mixing coefficients')
    fit = run_and_wait(qtbot, w)
    assert fit.x.shape == (6, 4)
    assert viewer.layers['tz residual'].data.shape == (6, 4, 32, 32)


def test_closing_the_viewer_mid_run_stops_the_fit(big_viewer, qtbot):
    viewer, w, fits = big_viewer
    before = blas_threads()
    w.run.native.click()
    worker = w._worker
    assert worker is not None
    finished = []
    worker.finished.connect(lambda: finished.append(True))
    qtbot.waitUntil(lambda: bool(fits['started']), timeout=10_000)
    viewer.close()
    qtbot.waitUntil(lambda: bool(finished), timeout=30_000)
    assert worker.abort_requested
    assert_fits_closed(qtbot, fits, before)


def test_noise_options_diagnostics_and_basis(sample_viewer, qtbot):
    viewer, w = sample_viewer
    assert 'energy' in w.diagnostics.value
    assert w.gain.native.isHidden()  # detector settings: Poisson only
    w.noise.value = 'poisson'
    assert not w.gain.native.isHidden()
    assert not w.read_noise.native.isHidden()
    w.gain.value = 1.0
    w.camera_offset.value = 100.0
    w.read_noise.value = 3.0
    w.stderr.value = 'auto'
    fit = run_and_wait(qtbot, w)
    stack = viewer.layers['mixture stack'].data
    ref1 = viewer.layers['reference 1'].data
    ref2 = viewer.layers['reference 2'].data
    expected = fit_stack(
        stack, ref1, ref2, noise='poisson', camera_offset=100.0, read_noise=3.0
    )
    assert_allclose(fit.x, expected.x, rtol=1e-10)
    assert_allclose(fit.x_stderr, expected.x_stderr, rtol=1e-10)
    meta = viewer.layers['mixture stack residual'].metadata['mixcoef']
    assert meta['noise'] == 'poisson' and meta['stderr_mode'] == 'auto'
    n_layers = len(viewer.layers)
    w.show_basis.native.click()
    w.show_basis.native.click()  # a second click updates, adds nothing
    assert len(viewer.layers) == n_layers + 2
    diff = viewer.layers['diff basis (A−B)/√2'].data
    assert_allclose(diff, (ref1 - ref2) / np.sqrt(2), rtol=1e-5)
    # the basis layers are not offered as references
    names = [getattr(c, 'name', c) for c in w.reference_1.choices]
    assert 'diff basis (A−B)/√2' not in names


def test_nearly_collinear_references_are_flagged(make_napari_viewer):
    viewer = make_napari_viewer()
    a = np.random.default_rng(1).random((16, 16)) + 1
    viewer.add_image(a, name='A')
    viewer.add_image(
        a + 0.001 * np.random.default_rng(2).random((16, 16)), name='A too'
    )
    viewer.add_image(np.stack([a] * 5), name='s')
    _, w = viewer.window.add_plugin_dock_widget(PLUGIN, 'Mixing coefficients')
    assert 'collinear' in w.diagnostics.value


def test_zarr_layer_is_fitted_without_loading_it(
    make_napari_viewer, qtbot, tmp_path
):
    import zarr

    stack, a, b, _ = make_mixture(n_slices=30, shape=(64, 64))
    z = zarr.create_array(
        store=tmp_path / 's.zarr',
        shape=stack.shape,
        chunks=(4, 64, 64),
        dtype=stack.dtype,
    )
    z[:] = stack
    lazy = zarr.open_array(tmp_path / 's.zarr', mode='r')
    viewer = make_napari_viewer()
    viewer.add_image(a, name='A')
    viewer.add_image(b, name='B')
    viewer.add_image(lazy, name='on disk', contrast_limits=(0, 4000))
    _, w = viewer.window.add_plugin_dock_widget(PLUGIN, 'Mixing coefficients')
    fit = run_and_wait(qtbot, w)
    assert_allclose(fit.x, fit_stack(stack, a, b).x, rtol=1e-10)
    assert viewer.layers['on disk'].data is lazy  # still the zarr array
    residual = viewer.layers['on disk residual'].data
    assert type(residual).__name__ == 'ResidualStack'  # lazy too
    assert np.asarray(residual[3]).shape == (64, 64)


def test_disconnect_lets_go_of_layer_events(make_napari_viewer):
    viewer = make_napari_viewer()
    _, w = viewer.window.add_plugin_dock_widget(PLUGIN, 'Mixing coefficients')
    viewer.add_image(np.zeros((5, 8, 8)), name='s')

    def ours(emitter):
        # napari itself connects reset_choices of docked magicgui widgets
        # (and undoes it): only the widget's own connections count here
        return [
            c
            for c in emitter.callbacks
            if isinstance(c, tuple) and c[0]() is w and c[1] != 'reset_choices'
        ]

    assert ours(viewer.layers.events.inserted)
    assert ours(viewer.layers['s'].events.name)
    w._disconnect_events()
    for emitter in (
        viewer.layers.events.inserted,
        viewer.layers.events.removed,
        viewer.layers['s'].events.name,
    ):
        assert not ours(emitter)


def test_a_runtime_error_in_the_fit_ends_the_run(
    sample_viewer, qtbot, monkeypatch
):
    # superqt ends a generator worker raising RuntimeError without any
    # signal; the widget must still end the run and say why
    from napari_mixcoef import core

    steps = core.iter_fit

    def broken(stack, *args, **kwargs):
        if len(stack) < 10:  # the widget's own warm-up fits
            return (yield from steps(stack, *args, **kwargs))
        yield 0, 1
        raise RuntimeError('pool shut down')

    monkeypatch.setattr(core, 'iter_fit', broken)
    viewer, w = sample_viewer
    with warnings.catch_warnings():
        # pytest turns warnings into errors, which would reach `errored`
        # by another way than a user's napari
        warnings.simplefilter('default')
        fit = run_and_wait(qtbot, w, timeout=10_000)
    assert fit is None
    assert 'pool shut down' in w.status.value
    qtbot.waitUntil(lambda: w.run.enabled, timeout=10_000)
