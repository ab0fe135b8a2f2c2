"""K references in the dock, the plot and its CSV, in a real viewer."""

import csv
import json
import os

import numpy as np
import pytest
from numpy.testing import assert_allclose

from napari_mixcoef import fit_stack
from napari_mixcoef._qt.widget import find_plot
from napari_mixcoef.sample_data import make_mixture, make_three_states

PLUGIN = 'napari-mixcoef'
#: Where the screenshots of the closing note go (made when it exists).
SHOTS = os.environ.get('MIXCOEF_SHOTS', '/work/shots')


def add_widget(viewer):
    _, widget = viewer.window.add_plugin_dock_widget(
        PLUGIN, 'Mixing coefficients'
    )
    return widget


def run_and_wait(qtbot, widget, timeout=60_000):
    with qtbot.waitSignal(widget.fit_finished, timeout=timeout) as blocker:
        widget.run.native.click()
    return blocker.args[0]


def legend_texts(plot):
    return [t.get_text() for lg in plot.figure.legends for t in lg.texts]


def read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def save_shot(viewer, name):
    if not os.path.isdir(SHOTS):
        return
    from skimage.io import imsave

    image = viewer.screenshot(canvas_only=False, flash=False)
    imsave(os.path.join(SHOTS, name), image, check_contrast=False)


@pytest.fixture
def three(make_napari_viewer):
    """A viewer with a small three-state stack and its three references."""
    viewer = make_napari_viewer()
    stack, refs, truth = make_three_states(n_slices=40, shape=(48, 48))
    layers = [
        viewer.add_image(ref, name=f'state {i + 1}')
        for i, ref in enumerate(refs)
    ]
    viewer.add_image(stack, name='three')
    return viewer, add_widget(viewer), stack, refs, layers


def test_three_references_pick_run_rerun_with_two(three, qtbot, tmp_path):
    viewer, w, stack, refs, layers = three
    # two pickers, as ever; "add reference" grows the list by the next one
    assert w.references.value == layers[:2]
    assert w.reference_1.value is layers[0]
    assert w.reference_2.value is layers[1]
    assert 'energy' in w.diagnostics.value
    w.references.add_reference.native.click()
    assert w.references.value == layers
    assert 'condition number' in w.diagnostics.value
    assert 'least distinct: "state' in w.diagnostics.value
    fit = run_and_wait(qtbot, w)
    assert fit.n_references == 3 and fit.names == ('x1', 'x2', 'x3')
    expected = fit_stack(stack, *refs, nan_policy='omit')
    assert_allclose(fit.fractions, expected.fractions, rtol=1e-10)
    meta = viewer.layers['three residual'].metadata['mixcoef']
    assert meta['references'] == ['state 1', 'state 2', 'state 3']
    assert meta['fractions'].shape == (40, 3)
    assert meta['fractions_stderr'].shape == (40, 3)
    assert not meta['at_bound'].any()
    first = w.status.value.splitlines()[0]
    assert first.startswith('40 slices fitted with 3 references; ')
    assert 'with a share outside [0, 1]' in first
    # one coloured line and band per reference, named after its layer
    plot = find_plot(viewer)
    texts = legend_texts(plot)
    assert texts[:3] == ['state 1', 'state 2', 'state 3']
    assert '95 % interval' in texts
    lines = [plot.artist('share', f'share of state {k}') for k in (1, 2, 3)]
    assert len({line.get_color() for line in lines}) == 3
    assert_allclose(lines[2].get_ydata(), fit.fractions[:, 2])
    plot.artist('share', 'share of state 3 band')
    path = plot.export_csv(tmp_path / 'three')
    rows = read_csv(path)
    assert list(rows[0]) == [
        'index_0',
        'x1',
        'x1_stderr',
        'x2',
        'x2_stderr',
        'x3',
        'x3_stderr',
        'r2',
        'rmse',
        'outlier',
    ]
    info = json.loads((tmp_path / 'three.json').read_text())
    assert info['references'] == ['state 1', 'state 2', 'state 3']
    # and back to two: the third row's × button
    w.references._rows[2].remove_button.native.click()
    assert w.references.value == layers[:2]
    fit = run_and_wait(qtbot, w)
    assert fit.n_references == 2
    assert w.status.value.startswith('40 slices fitted\nmedian x = ')
    assert legend_texts(find_plot(viewer))[0] == 'x: share of "state 1"'
    assert list(read_csv(plot.export_csv(tmp_path / 'two'))[0])[:3] == [
        'index_0',
        'x',
        'x_stderr',
    ]


def test_the_list_orders_and_never_repeats(three):
    viewer, w, _, _, layers = three
    a, b, c = layers
    w.references.value = [c, a, b]
    assert [r.value for r in w.references.rows] == [c, a, b]
    assert c not in w.reference_2.choices  # a layer is picked once
    w.references.move_up(2)
    assert w.references.value == [c, b, a]
    with pytest.raises(ValueError, match='cannot be reference 2'):
        w.references.value = [a, a, b]
    with pytest.raises(ValueError, match='pick 2 to 8'):
        w.references.value = [a]
    # a reference picked in an earlier row leaves the later ones
    w.references.value = [a, b, c]
    w.reference_1.value = c
    assert w.references.value[0] is c
    assert len({id(v) for v in w.references.value if v is not None}) == 3
    # only layers that fit the slices are offered
    viewer.add_image(np.ones((7, 7)), name='small')
    names = {ch.name for ch in w.reference_1.choices}
    assert names == {'state 1', 'state 2', 'state 3'}
    # up to eight; the buttons of the two-reference form stay hidden
    w.references.value = [a, b]
    row = w.references._rows[1]
    assert row.remove_button.native.isHidden()
    assert row.up_button.native.isHidden()
    for _ in range(6):
        w.references.add()
    assert len(w.references.rows) == 8
    assert not w.references.add_reference.enabled
    w.run.native.click()
    assert 'pick 8 reference layers' in w.status.value


@pytest.mark.parametrize('widget_first', [False, True])
def test_a_sample_stack_picks_its_own_references(
    make_napari_viewer, widget_first
):
    viewer = make_napari_viewer()
    if widget_first:
        w = add_widget(viewer)
    viewer.open_sample(PLUGIN, 'three_states')
    if not widget_first:
        w = add_widget(viewer)
    states = [viewer.layers[f'state {k}'] for k in (1, 2, 3)]
    assert w.stack.value is viewer.layers['three states stack']
    assert w.references.value == states
    # a stack that names no references leaves the user's picks alone
    w.references.value = states[1::-1]
    viewer.add_image(
        np.zeros((4, *states[0].data.shape), np.float32), name='other'
    )
    w.stack.value = viewer.layers['other']
    assert w.references.value == states[1::-1]


def test_a_short_dock_scrolls_and_shows_the_result(make_napari_viewer, qtbot):
    # the plot docked below leaves the form less than its height: the
    # rows must keep their size (no picker over another) and the status
    # must be scrolled into view once the fit is done
    viewer = make_napari_viewer(show=True)  # laid out as a person sees it
    viewer.window.resize(1200, 640)
    viewer.open_sample(PLUGIN, 'three_states')
    w = add_widget(viewer)
    run_and_wait(qtbot, w)
    qtbot.wait(200)
    rows = [row.native for row in w.references._rows]
    tops = [row.mapTo(w.native, row.rect().topLeft()).y() for row in rows]
    for row, top, below in zip(rows, tops, tops[1:]):
        assert row.height() >= row.sizeHint().height()
        assert top + row.height() <= below
    assert w._scroll.verticalScrollBar().maximum() > 0  # it is short
    assert not w.status.native.visibleRegion().isEmpty()


def test_constraint_on_the_three_states_sample(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.window.resize(1300, 1050)  # for the screenshot
    viewer.open_sample(PLUGIN, 'three_states')
    w = add_widget(viewer)
    states = [viewer.layers[f'state {k}'] for k in (1, 2, 3)]
    assert w.stack.value is viewer.layers['three states stack']
    w.references.value = states
    w.constraint.value = 'nonneg'
    fit = run_and_wait(qtbot, w)
    assert fit.constraint == 'nonneg'
    n = int(fit.at_bound.sum())
    assert 0 < n < fit.x.size
    assert f'{n} slices at a bound (nonneg)' in w.status.value
    assert (fit.fractions >= 0).all()
    assert_allclose(fit.fractions.sum(axis=-1), 1.0)
    meta = viewer.layers['three states stack residual'].metadata['mixcoef']
    assert meta['at_bound'].sum() == n
    plot = find_plot(viewer)
    assert plot.describe(int(np.argmax(fit.at_bound))).endswith(
        '(a share held at its bound has no error)'
    )
    assert w.model.native.itemText(0).startswith('x1·A + x2·B + x3·C')
    qtbot.wait(300)
    save_shot(viewer, 'three_states_nonneg.png')


def test_a_nan_pixel_is_left_out_and_counted(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    stack, a, b, _ = make_mixture(n_slices=6, shape=(32, 32))
    stack = stack.astype(np.float32)
    stack[3, 5, 5] = np.nan
    stack[4, 0, :2] = np.nan
    viewer.add_image(a, name='A')
    viewer.add_image(b, name='B')
    viewer.add_image(stack, name='with holes')
    w = add_widget(viewer)
    fit = run_and_wait(qtbot, w)
    assert fit is not None
    assert fit.n_omitted.tolist() == [0, 0, 0, 1, 2, 0]
    assert w.status.value.splitlines()[-1] == (
        '3 pixels in 2 slices left out (NaN or inf)'
    )
    assert 'warning' not in w.status.value
    assert np.isfinite(fit.x).all()
    expected = fit_stack(stack, a, b, nan_policy='omit')
    assert_allclose(fit.x, expected.x, rtol=1e-12)


def _registered(fit, failed=7):
    """The fit with a made-up drift: a shift panel needs nothing else."""
    import dataclasses

    n = fit.x.size
    t = np.linspace(0, 1, n)
    shift = np.stack([2.5 * np.sin(3 * t), -1.5 * t], axis=-1)
    stderr = np.full_like(shift, 0.02)
    flags = np.zeros(n, bool)
    flags[failed] = True
    shift[failed] = stderr[failed] = np.nan
    return dataclasses.replace(
        fit,
        register='translation',
        shift=shift,
        shift_stderr=stderr,
        registration_failed=flags,
    )


def test_the_shift_panel_of_a_registered_fit(
    make_napari_viewer, qtbot, tmp_path
):
    from napari_mixcoef._qt.plot import CoefficientPlot
    from napari_mixcoef._qt.record import FitSource

    viewer = make_napari_viewer()
    stack, a, b, _ = make_mixture(n_slices=30, shape=(32, 32))
    viewer.add_image(stack, name='drift')
    fit = _registered(fit_stack(stack, a, b))
    plot = CoefficientPlot(viewer)
    viewer.window.add_dock_widget(plot, name='plot', area='bottom')
    plot.set_fit(fit, FitSource('drift', ('A', 'B'), None, ()))
    plot.canvas.draw()
    ax = plot.axes('shift')
    assert plot._ylabels[ax] == 'shift\n(px)'
    # one line and band per axis, named as napari names an image's axes
    assert_allclose(
        plot.artist('shift', 'shift y').get_ydata(), fit.shift[:, 0]
    )
    assert_allclose(
        plot.artist('shift', 'shift x').get_ydata(), fit.shift[:, 1]
    )
    plot.artist('shift', 'shift x band')
    assert list(plot.artist('shift', 'registration failed').get_xdata()) == [7]
    labels = [t.get_text() for t in ax.get_legend().texts]
    assert labels == ['along y', 'along x', 'failed (1)']
    # above R², linked to the slider like the other panels
    names = list(plot._axes)
    assert names.index('shift') == names.index('R²') - 1
    assert len(plot.cursors) == len(plot.figure.axes)
    viewer.dims.set_current_step(0, 12)
    assert all(c.get_xdata()[0] == 12 for c in plot.cursors)
    assert 'shift (y, x) = (' in plot.describe(3)
    assert 'registration failed' in plot.describe(7)
    columns = list(read_csv(plot.export_csv(tmp_path / 'reg'))[0])
    assert columns[-5:] == [
        'shift_0',
        'shift_0_stderr',
        'shift_1',
        'shift_1_stderr',
        'outlier',
    ]


def test_the_register_control(three):
    viewer, w, *_ = three
    assert w.register.value is None and w.options()['register'] is None
    assert 'translation' in w.register.tooltip
    assert w.register.enabled
    w.register.value = 'translation'
    assert w.options()['register'] == 'translation'
