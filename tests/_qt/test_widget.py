"""The dock widget in a real napari viewer (virtual display, no mocks)."""

import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose

from napari_mixcoef import fit_stack
from napari_mixcoef._qt import worker
from napari_mixcoef._qt.widget import (
    _PROGRESS_EVERY,
    PLOT_DOCK_NAME,
    find_plot,
)
from napari_mixcoef.sample_data import make_mixture

PLUGIN = 'napari-mixcoef'


def add_widget(viewer):
    _, widget = viewer.window.add_plugin_dock_widget(
        PLUGIN, 'Mixing coefficients'
    )
    return widget


@pytest.fixture
def sample_viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, 'mixture')
    return viewer, add_widget(viewer)


@pytest.fixture
def big_viewer(make_napari_viewer, monkeypatch):
    """A viewer with a 3000-slice stack whose fit pauses once under way.

    The compiled kernels fit it in ~0.1 s: too fast to act mid-run without
    the pause.  The third value records each fit of that stack as it
    starts, and the BLAS thread counts as it ends or is closed (never, for
    a fit left suspended).
    """
    import time

    steps = worker.iter_fit
    fits = {'started': [], 'ended': [], 'switch': sys.getswitchinterval()}

    def paused(stack, *args, **kwargs):
        gen = steps(stack, *args, **kwargs)
        fits['started'].append(True)
        try:
            step = next(gen)
            while step[0] == 0:  # the set-up's (0, total)
                yield step
                step = next(gen)
            # past the bar's step interval, so that the bar shows it
            time.sleep(2 * _PROGRESS_EVERY)
            yield step
            time.sleep(0.5)  # the test acts on the GUI thread meanwhile
            return (yield from gen)
        finally:
            gen.close()
            fits['ended'].append(blas_threads())

    monkeypatch.setattr(worker, 'iter_fit', paused)
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    a, b = rng.random((2, 128, 128)).astype(np.float32) + 1
    viewer.add_image(a, name='A')
    viewer.add_image(b, name='B')
    big = rng.random((3000, 128, 128), dtype=np.float32)
    viewer.add_image(big, name='big', contrast_limits=(0, 1))
    widget = add_widget(viewer)
    # the warm-up's fits hold BLAS at one thread while they run: let them
    # end before a test reads the thread counts it expects back
    widget._warm_up_thread.join(timeout=60)
    return viewer, widget, fits


def blas_threads() -> list[int]:
    """Threads of the BLAS libraries that fits limit (numpy's among them)."""
    from napari_mixcoef.engine.threads import blas_libraries

    return [lib.num_threads for lib, _ in blas_libraries()]


def assert_fits_closed(qtbot, fits, before):
    # a stopped fit is closed in its thread, not left suspended: BLAS has
    # its threads back (a suspended fit kept numpy on one)
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


def plot_of(viewer):
    plot = find_plot(viewer)
    assert plot is not None, list(viewer.window.dock_widgets)
    return plot


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
    assert 'plot' in PLOT_DOCK_NAME
    assert PLOT_DOCK_NAME in viewer.window.dock_widgets
    assert w.status.value.startswith('200 slices fitted\nmedian x = 0.')
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
    assert plot_of(viewer).fit is fit


def test_a_renamed_residual_is_not_duplicated(sample_viewer, qtbot):
    # found by its metadata: napari hands plugins proxies of its layers,
    # so an identity check never matches, and the name has changed
    viewer, w = sample_viewer
    run_and_wait(qtbot, w)
    viewer.layers['mixture stack residual'].name = 'my residual'
    n_layers = len(viewer.layers)
    fit = run_and_wait(qtbot, w)
    assert len(viewer.layers) == n_layers
    assert 'my residual' not in viewer.layers
    layer = viewer.layers['mixture stack residual']
    assert layer.metadata['mixcoef']['fit'] is fit


def test_residual_beside_the_data_selection_kept(sample_viewer, qtbot):
    viewer, w = sample_viewer
    stack = viewer.layers['mixture stack']
    viewer.layers.selection = {viewer.layers['reference 1']}
    viewer.layers.selection.active = viewer.layers['reference 1']
    assert w.residual_view.value == 'grid'
    run_and_wait(qtbot, w)
    residual = viewer.layers['mixture stack residual']
    # the user's selection is kept, the residual is not selected
    assert set(viewer.layers.selection) == {viewer.layers['reference 1']}
    assert viewer.layers.selection.active is viewer.layers['reference 1']
    # beside the stack in the grid, with a colour bar
    assert viewer.canvas.grid.enabled
    assert viewer.layers.index(residual) == viewer.layers.index(stack) + 1
    assert residual.visible and stack.visible
    # the plot's legend row gives the colours and their limits
    limit = f'{residual.contrast_limits[1]:.3g}'
    legend = [t.get_text() for t in plot_of(viewer).figure.legends[-1].texts]
    assert legend == [
        'residual layer:',
        f'brighter than the model (+{limit})',
        f'darker (−{limit})',
        'fits (0)',
    ]
    lo, zero, hi = residual.colormap.map(np.array([0.0, 0.5, 1.0]))
    assert np.allclose(zero[:3], 0)  # black where the model fits


def test_residual_blended_over_the_stack(sample_viewer, qtbot):
    viewer, w = sample_viewer
    w.residual_view.value = 'blend'
    run_and_wait(qtbot, w)
    residual = viewer.layers['mixture stack residual']
    stack = viewer.layers['mixture stack']
    assert not viewer.canvas.grid.enabled
    assert residual.blending == 'additive'
    assert viewer.layers.index(residual) == viewer.layers.index(stack) + 1


def test_plot_dock_a_third_and_the_view_refitted(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(1400, 1100)
    viewer.open_sample(PLUGIN, 'mixture')
    w = add_widget(viewer)
    qtbot.waitUntil(lambda: window.height() == 1100)
    run_and_wait(qtbot, w)
    plot = plot_of(viewer)
    qtbot.waitUntil(lambda: plot.refits >= 1, timeout=10_000)
    dock = plot.dock()
    assert window.dockWidgetArea(dock).name == 'BottomDockWidgetArea'
    assert 0.2 * window.height() < dock.height() <= 0.36 * window.height()
    # the view shows the whole of both images in the canvas left to them
    camera = viewer.scene.camera
    zoom = camera.zoom
    viewer.reset_view()
    assert camera.zoom == pytest.approx(zoom)


def test_a_closed_plot_dock_comes_back(sample_viewer, qtbot):
    viewer, w = sample_viewer
    run_and_wait(qtbot, w)
    dock = plot_of(viewer).dock()
    dock.title.hide_button.click()  # the title bar's "hide this panel"
    assert dock.isHidden()
    run_and_wait(qtbot, w)
    assert not plot_of(viewer).dock().isHidden()
    # the × destroys it: the next run makes another
    plot_of(viewer).dock().title.close_button.click()
    assert find_plot(viewer) is None
    fit = run_and_wait(qtbot, w)
    assert not plot_of(viewer).dock().isHidden()
    assert plot_of(viewer).fit is fit


def _menu_action(viewer, text):
    for action in viewer.window.plugins_menu.actions():
        if action.menu() is not None:
            for sub in action.menu().actions():
                if sub.text() == text:
                    return sub
    raise LookupError(text)


def test_the_plot_is_in_the_plugins_menu(sample_viewer, qtbot):
    viewer, w = sample_viewer
    fit = run_and_wait(qtbot, w)
    plot_of(viewer).dock().title.close_button.click()
    assert PLOT_DOCK_NAME not in viewer.window.dock_widgets
    _menu_action(viewer, 'Mixing coefficients plot').trigger()
    plot = plot_of(viewer)
    assert plot.fit is fit  # the latest run, found in the viewer
    assert (
        'reference 1' in plot.artist('share', 'share of reference 1').get_gid()
    )
    # hidden, the same entry shows it again
    plot.dock().title.hide_button.click()
    _menu_action(viewer, 'Mixing coefficients plot').trigger()
    assert not plot.dock().isHidden()


def test_the_plot_alone_before_any_fit_says_how(make_napari_viewer):
    viewer = make_napari_viewer()
    _, plot = viewer.window.add_plugin_dock_widget(
        PLUGIN, 'Mixing coefficients plot'
    )
    assert plot.fit is None
    assert any('No fit yet' in t.get_text() for t in plot.figure.texts)


def test_a_deleted_input_clears_the_plot(sample_viewer, qtbot):
    viewer, w = sample_viewer
    run_and_wait(qtbot, w)
    plot = plot_of(viewer)
    viewer.layers.remove('mixture stack residual')
    assert plot.fit is None
    assert 'removed' in plot.message
    run_and_wait(qtbot, w)
    assert plot.fit is not None
    viewer.layers.remove('reference 2')
    assert plot.fit is None
    assert '"reference 2"' in plot.message


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


def test_cancel_mid_run_resets_the_bar(big_viewer, qtbot):
    viewer, w, fits = big_viewer
    with qtbot.waitSignal(w.fit_finished, timeout=60_000):
        w.run.native.click()
        qtbot.waitUntil(lambda: w.progress.value > 0, timeout=10_000)
        w.cancel.native.click()
    assert w.progress.value == 0
    assert 'cancelled' in w.status.value


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
    steps = worker.iter_fit
    viewer, w = sample_viewer

    def cancelled_at_the_end(stack, *args, **kwargs):
        fit = yield from steps(stack, *args, **kwargs)
        w._stop('cancelled')  # as the Cancel button, mid-step
        return fit

    monkeypatch.setattr(worker, 'iter_fit', cancelled_at_the_end)
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
    assert viewer.layers['renamed'] in w.stack.choices


def test_messages_follow_the_inputs(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    w = add_widget(viewer)
    w.run.native.click()
    assert 'no stack' in w.status.value
    stack, a, b, _ = make_mixture(n_slices=5, shape=(32, 32))
    viewer.add_image(a, name='A')
    viewer.add_image(b, name='B')
    viewer.add_image(stack, name='s')
    assert w.stack.value is viewer.layers['s']
    assert w.status.value == ''  # the old error was about no stack
    assert 'energy' in w.diagnostics.value
    run_and_wait(qtbot, w)
    assert w.status.value.startswith('5 slices fitted')
    viewer.add_image(stack[:3], name='other')
    w.stack.value = viewer.layers['other']
    assert w.status.value == ''  # that summary was of "s"
    assert w.progress.value == 0
    viewer.layers.remove('B')
    assert w.reference_2.value is None
    assert w.diagnostics.value == ''  # nothing to diagnose any more


def test_bad_form_says_what_to_do(make_napari_viewer):
    viewer = make_napari_viewer()
    w = add_widget(viewer)
    w.run.native.click()
    assert 'no stack' in w.status.value
    viewer.add_image(np.zeros((5, 8, 8)), name='s')
    viewer.add_image(np.ones((8, 8)), name='r')
    assert w.stack.value is viewer.layers['s']
    w.run.native.click()
    assert 'pick two reference layers' in w.status.value
    assert '1 such layer open' in w.status.value


def test_pickers_explain_what_they_leave_out(make_napari_viewer):
    viewer = make_napari_viewer()
    rng = np.random.default_rng(3)
    viewer.add_image(rng.random((16, 16)), name='A')
    viewer.add_image(rng.random((8, 8)), name='small')
    viewer.add_image(rng.random((16, 16, 3)), rgb=True, name='photo')
    viewer.add_image(rng.random((5, 16, 16)), name='s')
    w = add_widget(viewer)
    assert w.stack.value is viewer.layers['s']
    assert w.not_offered.value == (
        '2 layers not offered: "small" has shape (8, 8) ≠ the stack\'s '
        'slices (16, 16); "photo" is RGB (right-click it ▸ Split RGB)'
    )
    # one usable reference: the second picker stays empty, not the same
    assert w.reference_1.value is viewer.layers['A']
    assert w.reference_2.value is None
    w.run.native.click()
    assert 'pick two reference layers' in w.status.value
    viewer.add_image(rng.random((16, 16)), name='B')
    assert w.reference_2.value is viewer.layers['B']
    # a layer cannot be both references
    w.reference_1.value = viewer.layers['B']
    assert viewer.layers['B'] not in w.reference_2.choices
    assert w.reference_2.value is viewer.layers['A']


def test_an_integer_reference_is_not_offered_as_a_mask(make_napari_viewer):
    viewer = make_napari_viewer()
    rng = np.random.default_rng(4)
    a, b = (rng.integers(100, 4000, (16, 16), dtype=np.uint16) for _ in 'ab')
    viewer.add_image(a, name='A')
    viewer.add_image(b, name='B')
    binary = (rng.random((16, 16)) > 0.3).astype(np.uint8)
    viewer.add_image(binary, name='binary')
    viewer.add_labels(binary.astype(np.int32) * 2, name='labels')
    viewer.add_image(rng.integers(0, 4000, (5, 16, 16)), name='s')
    w = add_widget(viewer)
    names = {c.name for c in w.mask.choices if c is not None}
    assert names == {'binary', 'labels'}


def test_collinear_references_error_is_shown(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    a = np.random.default_rng(1).random((16, 16)) + 1
    viewer.add_image(a, name='A')
    viewer.add_image(2 * a, name='2A')
    viewer.add_image(np.stack([a] * 5), name='s')
    w = add_widget(viewer)
    assert run_and_wait(qtbot, w, timeout=30_000) is None
    assert 'collinear' in w.status.value
    # the GUI's names, not the engine's arguments
    assert 'reference 1 "A"' in w.status.value
    assert 'ref1' not in w.status.value
    assert len(viewer.layers) == 3


def test_a_nan_reference_is_explained_in_the_guis_words(
    make_napari_viewer, qtbot
):
    # NaN in the stack is left out (tests/_qt/test_references.py); in a
    # reference it cannot be, and the message speaks the GUI's language
    viewer = make_napari_viewer()
    stack, a, b, _ = make_mixture(n_slices=6, shape=(32, 32))
    b = b.astype(np.float32)
    b[5, 5] = np.nan
    viewer.add_image(a, name='A')
    viewer.add_image(b, name='B')
    viewer.add_image(stack, name='s')
    w = add_widget(viewer)
    assert run_and_wait(qtbot, w, timeout=30_000) is None
    text = w.status.value
    assert 'NaN' in text
    assert 'mask (a Labels layer' in text
    for python in ('np.nan_to_num', 'mask=', 'e.g.', 'ref2'):
        assert python not in text


def test_nearly_collinear_references_warn(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    rng = np.random.default_rng(1)
    a = rng.random((16, 16)) + 1
    b = a + 0.05 * rng.random((16, 16))
    viewer.add_image(a, name='A')
    viewer.add_image(b, name='A too')
    x = np.linspace(0.2, 0.8, 5)[:, None, None]
    viewer.add_image(x * a + (1 - x) * b, name='s')
    w = add_widget(viewer)
    assert 'collinear' in w.diagnostics.value
    fit = run_and_wait(qtbot, w)
    assert fit is not None
    # the CollinearityWarning the fit raised, in the status line
    assert '\nwarning: ' in w.status.value
    assert 'nearly collinear' in w.status.value
    assert 'reference 1 "A"' in w.status.value


def test_every_control_has_a_tooltip(sample_viewer, qtbot):
    from qtpy.QtWidgets import (
        QAbstractButton,
        QAbstractSpinBox,
        QComboBox,
        QProgressBar,
    )

    viewer, w = sample_viewer
    run_and_wait(qtbot, w)
    kinds = (QAbstractButton, QAbstractSpinBox, QComboBox, QProgressBar)
    for root in (w.native, plot_of(viewer)):
        controls = [c for k in kinds for c in root.findChildren(k)]
        assert len(controls) >= 8
        for control in controls:
            tip = control.toolTip() or control.parentWidget().toolTip()
            assert tip, control
    for action in plot_of(viewer).toolbar.actions():
        if action.text():
            assert action.toolTip(), action.text()


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
    w = add_widget(viewer)
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
    plot = plot_of(viewer)
    viewer.dims.set_current_step(0, 123)
    assert all(line.get_xdata()[0] == 123 for line in plot.cursors)
    plot.canvas.draw()
    ax = plot.axes('share')
    xy = ax.transData.transform((42, float(np.mean(ax.get_ylim()))))
    MouseEvent('button_press_event', plot.canvas, *xy, button=1)._process()
    assert viewer.dims.current_step[0] == 42


def test_four_dimensional_stack_follows_napari_axis_labels(
    make_napari_viewer, qtbot
):
    viewer = make_napari_viewer()
    stack, a, b, _ = make_mixture(n_slices=24, shape=(32, 32))
    viewer.add_image(a, name='A')
    viewer.add_image(b, name='B')
    viewer.add_image(stack.reshape(6, 4, 32, 32), name='tz')
    viewer.dims.axis_labels = ('t', 'z', 'y', 'x')
    w = add_widget(viewer)
    fit = run_and_wait(qtbot, w)
    assert fit.x.shape == (6, 4)
    assert viewer.layers['tz residual'].data.shape == (6, 4, 32, 32)
    assert w.status.value.startswith('24 slices fitted')
    plot = plot_of(viewer)
    assert plot.axes('R²').get_xlabel() == 't'
    viewer.dims.set_current_step(1, 2)
    title = plot.figure.texts[0].get_text()
    assert title.startswith('tz: mix model') and title.endswith('(z = 2)')
    np.testing.assert_array_equal(
        plot.artist('share', 'share of A').get_ydata(), fit.x[:, 2]
    )


def test_one_slice(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    stack, a, b, _ = make_mixture(n_slices=1, shape=(32, 32))
    viewer.add_image(a, name='A')
    viewer.add_image(b, name='B')
    viewer.add_image(stack, name='one')
    w = add_widget(viewer)
    fit = run_and_wait(qtbot, w)
    assert fit.x.shape == (1,)
    assert w.status.value.startswith('1 slice fitted\n')
    line = plot_of(viewer).artist('share', 'share of A')
    assert line.get_marker() == 'o' and list(line.get_xdata()) == [0]


def test_closing_the_viewer_mid_run_stops_the_fit(big_viewer, qtbot):
    viewer, w, fits = big_viewer
    before = blas_threads()
    w.run.native.click()
    running = w._worker
    assert running is not None
    finished = []
    running.finished.connect(lambda: finished.append(True))
    qtbot.waitUntil(lambda: bool(fits['started']), timeout=10_000)
    viewer.close()
    qtbot.waitUntil(lambda: bool(finished), timeout=30_000)
    assert running.abort_requested
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
    title = plot_of(viewer).figure.texts[0].get_text()
    assert title == 'mixture stack: mix model · Poisson noise · robust errors'
    n_layers = len(viewer.layers)
    w.show_basis.native.click()
    w.show_basis.native.click()  # a second click updates, adds nothing
    assert len(viewer.layers) == n_layers + 2
    diff = viewer.layers['diff basis (A−B)/√2'].data
    assert_allclose(diff, (ref1 - ref2) / np.sqrt(2), rtol=1e-5)
    # the basis layers are not offered as references
    names = [getattr(c, 'name', c) for c in w.reference_1.choices]
    assert 'diff basis (A−B)/√2' not in names


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
    w = add_widget(viewer)
    fit = run_and_wait(qtbot, w)
    assert_allclose(fit.x, fit_stack(stack, a, b).x, rtol=1e-10)
    assert viewer.layers['on disk'].data is lazy  # still the zarr array
    residual = viewer.layers['on disk residual'].data
    assert type(residual).__name__ == 'ResidualStack'  # lazy too
    assert np.asarray(residual[3]).shape == (64, 64)


def test_disconnect_lets_go_of_layer_events(make_napari_viewer):
    viewer = make_napari_viewer()
    w = add_widget(viewer)

    def ours(emitter):
        # napari itself connects reset_choices of docked magicgui widgets
        # (and undoes it): only the widget's own connections count here
        return [
            c
            for c in emitter.callbacks
            if isinstance(c, tuple) and c[0]() is w and c[1] != 'reset_choices'
        ]

    assert ours(viewer.layers.events.removed)
    w._disconnect_events()
    assert not ours(viewer.layers.events.removed)


def test_a_runtime_error_in_the_fit_ends_the_run(
    sample_viewer, qtbot, monkeypatch
):
    # superqt ends a generator worker raising RuntimeError without any
    # signal; the widget must still end the run and say why
    def broken(stack, *args, **kwargs):
        yield 0, 1
        raise RuntimeError('pool shut down')

    monkeypatch.setattr(worker, 'iter_fit', broken)
    viewer, w = sample_viewer
    with warnings.catch_warnings():
        # pytest turns warnings into errors, which would reach `errored`
        # by another way than a user's napari
        warnings.simplefilter('default')
        fit = run_and_wait(qtbot, w, timeout=10_000)
    assert fit is None
    assert 'pool shut down' in w.status.value
    qtbot.waitUntil(lambda: w.run.enabled, timeout=10_000)


QUIT_DURING_WARM_UP = textwrap.dedent(
    """
    import concurrent.futures.thread
    import threading, time
    import napari
    from qtpy.QtCore import QTimer

    viewer = napari.Viewer()
    _, widget = viewer.window.add_plugin_dock_widget(
        'napari-mixcoef', 'Mixing coefficients'
    )
    start = time.monotonic()

    def quit_while_it_fits():
        # the warm-up's tiny fits have started the engine's threads: quit
        # while it is still running them
        fitting = any(t.name.startswith('mixcoef')
                      for t in threading.enumerate())
        if fitting or time.monotonic() - start > 20:
            viewer.close()
        else:
            QTimer.singleShot(1, quit_while_it_fits)

    QTimer.singleShot(0, quit_while_it_fits)
    napari.run()
    warm_up = widget._warm_up_thread
    print('warm-up running:', warm_up.is_alive(), flush=True)
    # what Python does first on exit (stop the executors' threads), now,
    # so that the warm-up meets it for sure instead of once in a while
    concurrent.futures.thread._python_exit()
    warm_up.join(60)
    """
)


def test_quitting_during_the_warm_up_prints_no_traceback(tmp_path):
    script = tmp_path / 'quit.py'
    script.write_text(QUIT_DURING_WARM_UP)
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert 'warm-up running: True' in out.stdout
    assert 'Traceback' not in out.stderr, out.stderr
