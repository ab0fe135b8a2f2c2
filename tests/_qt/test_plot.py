"""The coefficient plot in a real napari viewer (virtual display)."""

import csv
import json
import re
import shutil
import time

import numpy as np
import pytest
from matplotlib.backend_bases import MouseEvent
from matplotlib.colors import to_rgba
from napari.utils.theme import get_theme

from napari_mixcoef import fit_stack
from napari_mixcoef._qt.panels import OUTLIER_RULE
from napari_mixcoef._qt.plot import CoefficientPlot
from napari_mixcoef._qt.record import FitSource

INJECTED = (100, 200)
DOCK_NAME = 'Mixing coefficients plot'
SOURCE = FitSource('stack', ('A', 'B'), None, ())


def _stack(lead, *, size=32, seed=0, outliers=(), noise=0.02):
    """Seeded stack whose x follows a smooth curve along the first axis.

    Further leading axes shift x by 0.1 per index.  ``outliers`` (first-axis
    indices, applied at every further index) get, in turn, a jump in x and
    strong extra noise (low R²).
    """
    rng = np.random.default_rng(seed)
    ref1, ref2 = rng.random((2, size, size))
    t = np.linspace(0.0, 1.0, lead[0])
    x = 0.45 + 0.25 * np.sin(2 * np.pi * t)
    x = x.reshape((-1,) + (1,) * (len(lead) - 1))
    for axis, n in enumerate(lead[1:], start=1):
        shape = [1] * len(lead)
        shape[axis] = n
        x = x + 0.1 * np.arange(n).reshape(shape)
    x = np.broadcast_to(x, lead)
    xx = x[..., None, None]
    stack = xx * ref1 + (1 - xx) * ref2
    stack += rng.normal(0, noise, stack.shape)
    for j, i in enumerate(outliers):
        if j % 2 == 0:
            resid = stack[i] - (xx[i] * ref1 + (1 - xx[i]) * ref2)
            stack[i] = 0.3 * ref1 + 0.7 * ref2 + resid
        else:
            stack[i] += rng.normal(0, 0.3, stack[i].shape)
    return stack.astype(np.float32), ref1, ref2


def _viewer_with_plot(make_napari_viewer, stack, fit, source=SOURCE, **kw):
    viewer = make_napari_viewer(**kw)
    viewer.add_image(stack, name='stack')
    plot = CoefficientPlot(viewer)
    viewer.window.add_dock_widget(plot, name=DOCK_NAME, area='bottom')
    plot.set_fit(fit, source)
    plot.canvas.draw()
    return viewer, plot


@pytest.fixture(scope='module')
def data():
    stack, ref1, ref2 = _stack((300,), outliers=INJECTED)
    return stack, fit_stack(stack, ref1, ref2)


@pytest.fixture
def viewer_plot(make_napari_viewer, data):
    stack, fit = data
    return _viewer_with_plot(make_napari_viewer, stack, fit)


def _click(plot, ax, x, y, button=1):
    px, py = ax.transData.transform((x, y))
    MouseEvent(
        'button_press_event', plot.canvas, px, py, button=button
    )._process()


def _hover(plot, ax, x, y):
    px, py = ax.transData.transform((x, y))
    MouseEvent('motion_notify_event', plot.canvas, px, py)._process()


def _texts(plot):
    """Every text the figure shows: titles, labels, legends."""
    fig = plot.figure
    texts = [t.get_text() for t in fig.texts]
    for legend in fig.legends:
        texts += [t.get_text() for t in legend.get_texts()]
    for ax in fig.axes:
        texts += [ax.get_xlabel(), ax.get_ylabel()]
    return texts


def test_docked_and_plotted(viewer_plot, data):
    viewer, plot = viewer_plot
    _, fit = data
    assert viewer.window.dock_widgets[DOCK_NAME] is plot
    share, r2 = plot.axes('share'), plot.axes('R²')
    assert plot.figure.axes == [share, r2]
    x_line = plot.artist('share', 'share of A')
    np.testing.assert_array_equal(x_line.get_ydata(), fit.x)
    np.testing.assert_array_equal(plot.artist('R²', 'R²').get_ydata(), fit.r2)
    assert share.get_shared_x_axes().joined(share, r2)
    # The ±1.96 SE band spans the line.
    band = plot.artist('share', 'share of A band').get_paths()[0].vertices
    assert band[:, 1].min() < fit.x.min()
    assert band[:, 1].max() > fit.x.max()


def test_the_plot_explains_itself(viewer_plot):
    # whose share, the model, noise and error mode, the outlier rule
    _, plot = viewer_plot
    texts = _texts(plot)
    assert 'stack: mix model · Gaussian noise · robust errors' in texts
    assert 'x: share of "A"' in texts
    assert OUTLIER_RULE in texts
    assert 'low R²' in OUTLIER_RULE and '5 SE' in OUTLIER_RULE
    assert plot.axes('share').get_ylabel().startswith('share of')
    assert '95 % interval' in texts
    assert 'brighter than the model' in texts  # the residual's colours


def test_title_names_noise_and_error_mode(make_napari_viewer):
    stack, ref1, ref2 = _stack((40,), size=16)
    stack = (stack * 1000).astype(np.uint16)
    fit = fit_stack(
        stack, ref1 * 1000, ref2 * 1000, noise='huber', stderr='ols'
    )
    _, plot = _viewer_with_plot(make_napari_viewer, stack, fit)
    assert 'stack: mix model · Huber noise · textbook errors' in _texts(plot)


def _band_height_px(plot, i):
    """Pixels of the band (not the line, not the panel) drawn at slice i."""
    plot.canvas.draw()
    image = np.asarray(plot.canvas.buffer_rgba())[..., :3].astype(float)
    ax = plot.axes('share')
    x = plot.artist('share', 'share of A').get_ydata()[i]
    px, py = ax.transData.transform((i, x))
    row = image.shape[0] - int(round(py))
    column = image[row - 12 : row + 13, int(round(px))]
    panel = column[0]  # far from the line, inside the panel
    text = np.array(to_rgba(plot.colors['text'])[:3]) * 255
    apart = np.abs(column - panel).max(axis=1) > 20
    not_line = np.abs(column - text).max(axis=1) > 60
    return int(np.count_nonzero(apart & not_line))


def test_band_visible_at_any_error_size(make_napari_viewer):
    # errors of 1e-6 are far below one pixel of the x axis: the band's
    # outline keeps it a few pixels wide
    stack, ref1, ref2 = _stack((50,), size=16, noise=1e-6)
    fit = fit_stack(stack.astype(np.float64), ref1, ref2)
    lo, hi = plot_span = fit.x.min(), fit.x.max()
    assert np.median(fit.x_stderr) < 1e-5 * (hi - lo), plot_span
    _, plot = _viewer_with_plot(make_napari_viewer, stack, fit)
    assert _band_height_px(plot, 27) >= 3


def test_one_slice_is_a_marked_point_with_its_interval(make_napari_viewer):
    stack, ref1, ref2 = _stack((1,), size=16, noise=0.05)
    fit = fit_stack(stack, ref1, ref2)
    _, plot = _viewer_with_plot(make_napari_viewer, stack, fit)
    line = plot.artist('share', 'share of A')
    assert line.get_marker() == 'o'
    assert list(line.get_xdata()) == [0]
    band = plot.artist('share', 'share of A band').get_paths()[0].vertices
    # a box around the point, ±1.96 SE high
    assert band[:, 0].min() < 0 < band[:, 0].max()
    se = 1.96 * fit.x_stderr[0]
    assert band[:, 1].min() == pytest.approx(fit.x[0] - se)
    assert band[:, 1].max() == pytest.approx(fit.x[0] + se)
    lo, hi = plot.axes('share').get_ylim()
    assert lo < fit.x[0] - se and hi > fit.x[0] + se
    ticks = plot.axes('R²').get_xticks()
    lo, hi = plot.axes('R²').get_xlim()
    assert list(ticks[(ticks >= lo) & (ticks <= hi)]) == [0]


def test_axis_names_follow_napari_and_ticks_are_integers(make_napari_viewer):
    stack, ref1, ref2 = _stack((3, 2), size=16)
    fit = fit_stack(stack, ref1, ref2)
    viewer, plot = _viewer_with_plot(make_napari_viewer, stack, fit)
    assert plot.axes('R²').get_xlabel() == 'slice (axis -4)'
    viewer.dims.axis_labels = ('t', 'z', 'y', 'x')
    plot.canvas.draw()
    assert plot.axes('R²').get_xlabel() == 't'
    j = viewer.dims.current_step[1]
    assert any(t.endswith(f'(z = {j})') for t in _texts(plot))
    ticks = plot.axes('R²').get_xticks()
    lo, hi = plot.axes('R²').get_xlim()
    shown = ticks[(ticks >= lo) & (ticks <= hi)]
    assert len(shown) >= 2
    assert np.all(shown == np.round(shown))


def test_coefficients_on_demand(make_napari_viewer):
    stack, ref1, ref2 = _stack((60,), size=16)
    fit = fit_stack(stack + 0.5, ref1, ref2, model='offset')
    _, plot = _viewer_with_plot(make_napari_viewer, stack, fit)
    button = plot._coefficients
    assert button.isEnabled() and not button.isChecked()
    assert len(plot.figure.axes) == 2
    button.click()
    assert [ax.get_ylabel().split('\n')[0] for ax in plot.figure.axes] == [
        'share of',
        'a, b',
        'c',
        'R²',
    ]
    for j, name in enumerate('abc'):
        panel = 'c' if name == 'c' else 'a, b'
        y = plot.artist(panel, name).get_ydata()
        np.testing.assert_array_equal(y, fit.coef[:, j])
    button.click()
    assert len(plot.figure.axes) == 2
    mix = fit_stack(stack, ref1, ref2)
    plot.set_fit(mix, SOURCE)
    assert not button.isEnabled()


def test_cursor_follows_slider(viewer_plot):
    viewer, plot = viewer_plot
    viewer.dims.set_current_step(0, 42)
    assert len(plot.cursors) == 2
    for line in plot.cursors:
        assert list(line.get_xdata()) == [42, 42]
        assert line.get_visible()
        assert line.get_animated()


def test_click_moves_slider(viewer_plot, data):
    viewer, plot = viewer_plot
    _, fit = data
    share, r2 = plot.axes('share'), plot.axes('R²')
    _click(plot, share, 123.3, fit.x[123])
    assert viewer.dims.current_step[0] == 123
    _click(plot, r2, 56.6, np.median(fit.r2))
    assert viewer.dims.current_step[0] == 57
    assert list(plot.cursors[0].get_xdata()) == [57, 57]
    # Clamped to the slices: the x axis has a margin past both ends.
    _click(plot, share, -0.4, fit.x[0])
    assert viewer.dims.current_step[0] == 0
    _click(plot, share, 299.4, fit.x[-1])
    assert viewer.dims.current_step[0] == 299


def test_click_ignored_outside_left_button_and_in_zoom_mode(viewer_plot):
    viewer, plot = viewer_plot
    share = plot.axes('share')
    viewer.dims.set_current_step(0, 10)
    _click(plot, share, 150, 0.5, button=3)
    assert viewer.dims.current_step[0] == 10
    plot.toolbar.zoom()
    try:
        _click(plot, share, 150, 0.5)
    finally:
        plot.toolbar.zoom()
    assert viewer.dims.current_step[0] == 10
    _click(plot, share, 150, 0.5)
    assert viewer.dims.current_step[0] == 150


def test_hover_shows_values(viewer_plot, data):
    _, plot = viewer_plot
    _, fit = data
    _hover(plot, plot.axes('share'), 42.2, fit.x[42])
    match = re.fullmatch(
        r'slice 42: x = (\S+) ± (\S+), R² = (\S+)', plot.message
    )
    assert match, plot.message
    x, se, r2 = (float(g) for g in match.groups())
    np.testing.assert_allclose(x, fit.x[42], atol=1e-3)
    np.testing.assert_allclose(se, fit.x_stderr[42], atol=1e-3)
    np.testing.assert_allclose(r2, fit.r2[42], atol=1e-3)
    _hover(plot, plot.axes('R²'), INJECTED[1], fit.r2[INJECTED[1]])
    assert plot.message.startswith(f'slice {INJECTED[1]}: ')
    assert plot.message.endswith(f'({OUTLIER_RULE})')


def test_outliers_marked(viewer_plot, data):
    _, plot = viewer_plot
    _, fit = data
    flagged = set(np.flatnonzero(plot.outliers))
    assert set(INJECTED) <= flagged
    assert len(flagged) <= 4
    marks = plot.artist('share', 'outliers')
    assert set(INJECTED) <= set(marks.get_xdata())
    assert set(INJECTED) <= set(plot.artist('R²', 'outliers').get_xdata())
    i = list(marks.get_xdata()).index(INJECTED[0])
    assert marks.get_ydata()[i] == fit.x[INJECTED[0]]


def test_theme_change_recolours(viewer_plot):
    viewer, plot = viewer_plot
    for name in ('light', 'dark'):
        viewer.theme = name
        theme = get_theme(name)
        bg = to_rgba(theme.background.as_hex())
        fg = to_rgba(theme.foreground.as_hex())
        text = to_rgba(theme.text.as_hex())
        assert plot.figure.get_facecolor() == bg
        for ax in plot.figure.axes:
            assert ax.get_facecolor() == fg
            assert to_rgba(ax.yaxis.label.get_color()) == text
            tick = ax.yaxis.get_major_ticks()[0]
            assert to_rgba(tick.label1.get_color()) == text
        assert to_rgba(plot.artist('share', 'share of A').get_color()) == text
        band = plot.artist('share', 'share of A band')
        assert to_rgba(band.get_facecolor()[0])[:3] == pytest.approx(
            to_rgba(theme.current.as_hex())[:3]
        )


def read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def test_export_csv_with_outliers_and_provenance(viewer_plot, data, tmp_path):
    _, plot = viewer_plot
    _, fit = data
    # a name typed without ".csv" gets it
    written = plot.export_csv(tmp_path / 'fit')
    assert written == str(tmp_path / 'fit.csv')
    rows = read_csv(written)
    assert len(rows) == 300
    assert list(rows[0]) == [*fit.table(), 'outlier']
    assert [int(r['index_0']) for r in rows] == list(range(300))
    np.testing.assert_allclose([float(r['x']) for r in rows], fit.x, rtol=1e-9)
    flags = [int(r['outlier']) for r in rows]
    assert flags == plot.outliers.astype(int).tolist()
    assert set(INJECTED) <= {i for i, f in enumerate(flags) if f}
    info = json.loads((tmp_path / 'fit.json').read_text())
    assert info['stack'] == 'stack'
    assert info['references'] == ['A', 'B']
    assert info['mask'] is None
    assert info['outliers'] == np.flatnonzero(plot.outliers).tolist()
    assert info['model'] == 'mix' and info['noise'] == 'gaussian'
    assert info['stderr_mode'] == 'auto'


def test_export_with_two_leading_axes_flags_every_line(
    make_napari_viewer, tmp_path
):
    stack, ref1, ref2 = _stack((40, 3), size=16, outliers=(10,))
    fit = fit_stack(stack, ref1, ref2)
    _, plot = _viewer_with_plot(make_napari_viewer, stack, fit)
    plot.export_csv(tmp_path / 'tz.csv')
    rows = read_csv(tmp_path / 'tz.csv')
    flagged = {
        (int(r['index_0']), int(r['index_1']))
        for r in rows
        if r['outlier'] == '1'
    }
    assert {(10, j) for j in range(3)} <= flagged
    info = json.loads((tmp_path / 'tz.json').read_text())
    assert sorted(map(tuple, info['outliers'])) == sorted(flagged)


def test_export_dialog_adds_csv_to_a_typed_name(viewer_plot, tmp_path, qtbot):
    _, plot = viewer_plot
    plot._export_button.click()
    dialog = plot.dialog
    qtbot.waitUntil(dialog.isVisible)
    dialog.setDirectory(str(tmp_path))
    dialog.selectFile(str(tmp_path / 'typed'))
    dialog.accept()
    qtbot.waitUntil(lambda: (tmp_path / 'typed.csv').exists())
    assert (tmp_path / 'typed.json').exists()
    assert 'typed.csv' in plot.message


def test_export_errors_in_words(viewer_plot, tmp_path):
    _, plot = viewer_plot
    missing = tmp_path / 'no such folder' / 'fit.csv'
    plot.export_to(missing)
    assert 'does not exist' in plot.message
    assert 'no such folder' in plot.message
    assert 'Errno' not in plot.message
    (tmp_path / 'taken.csv').mkdir()
    plot.export_to(tmp_path / 'taken.csv')
    assert 'folder' in plot.message and 'Errno' not in plot.message
    plot.save_to(tmp_path / 'no such folder' / 'plot')
    assert 'plot.png' in plot.message and 'does not exist' in plot.message


def test_save_png(viewer_plot, tmp_path):
    import matplotlib.pyplot as plt

    _, plot = viewer_plot
    plot.save_to(tmp_path / 'plot')
    assert all(line.get_visible() for line in plot.cursors)
    image = plt.imread(tmp_path / 'plot.png')
    assert image.shape[0] > 100
    assert image.shape[1] > 100
    # The screen cache is rebuilt after savefig's own draw.
    plot.canvas.draw()
    assert plot._background is not None


def test_export_without_fit_raises(viewer_plot, tmp_path):
    _, plot = viewer_plot
    plot.clear()
    with pytest.raises(RuntimeError, match='no fit'):
        plot.export_csv(tmp_path / 'fit.csv')


def test_clear(viewer_plot):
    viewer, plot = viewer_plot
    plot.clear()
    assert plot.fit is None
    assert plot.figure.axes == []
    assert any('No fit yet' in t for t in _texts(plot))
    assert not plot._export_button.isEnabled()
    viewer.dims.set_current_step(0, 5)  # no fit: nothing happens
    plot.canvas.draw()


def test_two_leading_axes(make_napari_viewer):
    stack, ref1, ref2 = _stack((40, 3), size=16, outliers=(10,))
    fit = fit_stack(stack, ref1, ref2)
    assert fit.lead_shape == (40, 3)
    viewer, plot = _viewer_with_plot(make_napari_viewer, stack, fit)
    j = viewer.dims.current_step[1]

    def x_line():
        return plot.artist('share', 'share of A')

    np.testing.assert_array_equal(x_line().get_ydata(), fit.x[:, j])
    assert any(t.endswith(f'(axis -3 = {j})') for t in _texts(plot))
    assert len(x_line().get_xdata()) == 40

    viewer.dims.set_current_step(1, 2)
    np.testing.assert_array_equal(x_line().get_ydata(), fit.x[:, 2])
    r2 = plot.artist('R²', 'R²').get_ydata()
    np.testing.assert_array_equal(r2, fit.r2[:, 2])
    assert any(t.endswith('(axis -3 = 2)') for t in _texts(plot))
    assert 10 in plot.artist('share', 'outliers').get_xdata()
    # The y limits follow the new line (x is 0.2 higher than at j = 0).
    lo, hi = plot.axes('share').get_ylim()
    assert lo < fit.x[:, 2].min() and hi > fit.x[:, 2].max()

    viewer.dims.set_current_step(0, 17)
    assert list(plot.cursors[1].get_xdata()) == [17, 17]
    _hover(plot, plot.axes('share'), 17, fit.x[17, 2])
    assert plot.message.startswith('slice (17, 2): x = ')
    _click(plot, plot.axes('share'), 33, fit.x[33, 2])
    assert viewer.dims.current_step[:2] == (33, 2)
    plot.canvas.draw()


def test_disconnect_on_close(viewer_plot):
    viewer, plot = viewer_plot
    viewer.dims.set_current_step(0, 20)
    plot.close()
    assert not plot.connected
    viewer.dims.set_current_step(0, 80)
    viewer.theme = 'light'
    assert list(plot.cursors[0].get_xdata()) == [20, 20]
    assert plot.figure.get_facecolor() == to_rgba(
        get_theme('dark').background.as_hex()
    )
    plot.disconnect_events()  # idempotent


def test_bad_fit_arguments(viewer_plot, data):
    _, plot = viewer_plot
    _, fit = data
    with pytest.raises(ValueError, match='first dims axis is -1'):
        plot.set_fit(fit, FitSource('s', ('A', 'B'), None, (), first_axis=-1))
    rng = np.random.default_rng(0)
    ref1, ref2 = rng.random((2, 8, 8))
    single = fit_stack(0.5 * (ref1 + ref2) + ref1 * 0.01, ref1, ref2)
    with pytest.raises(ValueError, match='no leading axis'):
        plot.set_fit(single)


def test_cursor_blits_with_10000_slices(make_napari_viewer, qtbot):
    stack, ref1, ref2 = _stack((10_000,), size=8)
    fit = fit_stack(stack, ref1, ref2)
    viewer = make_napari_viewer(show=True)
    viewer.add_image(stack, name='stack', contrast_limits=(0, 1))
    plot = CoefficientPlot(viewer)
    viewer.window.add_dock_widget(plot, name=DOCK_NAME, area='bottom')
    qtbot.wait(100)

    start = time.perf_counter()
    plot.set_fit(fit)
    plot.canvas.draw()
    full = time.perf_counter() - start
    assert plot._background is not None
    qtbot.wait(50)  # let set_fit's pending draw_idle run first

    draws = []
    plot.canvas.mpl_connect('draw_event', draws.append)
    steps = [100 + 197 * k for k in range(50)]
    handler, total = [], []
    for i in steps:
        start = time.perf_counter()
        viewer.dims.set_current_step(0, i)
        total.append(time.perf_counter() - start)
        assert list(plot.cursors[0].get_xdata()) == [i, i]
        start = time.perf_counter()
        plot._on_current_step()  # the plot's own share, again
        handler.append(time.perf_counter() - start)
    qtbot.wait(50)  # a pending draw_idle would run here
    print(
        f'\n10 000 slices: set_fit + full draw {1e3 * full:.0f} ms; '
        f'per slider step: plot handler {1e3 * np.mean(handler):.2f} ms, '
        f'set_current_step incl. napari {1e3 * np.mean(total):.2f} ms'
    )
    assert draws == []  # blitting only, never a full redraw per step


def test_screenshot(make_napari_viewer, data, qtbot, tmp_path):
    import matplotlib.pyplot as plt

    stack, fit = data
    viewer, plot = _viewer_with_plot(make_napari_viewer, stack, fit, show=True)
    viewer.window._qt_window.resize(1000, 760)
    viewer.dims.set_current_step(0, INJECTED[0])
    qtbot.wait(200)
    _hover(plot, plot.axes('share'), INJECTED[0], fit.x[INJECTED[0]])
    shot = viewer.screenshot(canvas_only=False, flash=False)
    path = tmp_path / 'viewer.png'
    plt.imsave(path, shot)
    shutil.copy(path, '/tmp/plot_screenshot.png')
    assert shot.shape[0] >= 700
    # The dock is drawn in the theme's background colour.
    bg = np.array(to_rgba(get_theme(viewer.theme).background.as_hex()))
    rgb = shot[..., :3].reshape(-1, 3) / 255
    assert np.mean(np.all(np.abs(rgb - bg[:3]) < 0.02, axis=1)) > 0.05
