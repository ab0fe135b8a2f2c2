import csv
import re
import shutil
import time

import numpy as np
import pytest
from matplotlib.backend_bases import MouseEvent
from matplotlib.colors import to_rgba
from napari.utils.theme import get_theme

from napari_mixcoef import fit_stack
from napari_mixcoef._qt.plot import CoefficientPlot

INJECTED = (100, 200)
DOCK_NAME = 'Mixing coefficients plot'


def _stack(lead, *, size=32, seed=0, outliers=()):
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
    stack += rng.normal(0, 0.02, stack.shape)
    for j, i in enumerate(outliers):
        if j % 2 == 0:
            noise = stack[i] - (xx[i] * ref1 + (1 - xx[i]) * ref2)
            stack[i] = 0.3 * ref1 + 0.7 * ref2 + noise
        else:
            stack[i] += rng.normal(0, 0.3, stack[i].shape)
    return stack.astype(np.float32), ref1, ref2


def _viewer_with_plot(make_napari_viewer, stack, fit, **kwargs):
    viewer = make_napari_viewer(**kwargs)
    viewer.add_image(stack, name='stack')
    plot = CoefficientPlot(viewer)
    viewer.window.add_dock_widget(plot, name=DOCK_NAME, area='bottom')
    plot.set_fit(fit, first_axis=0, title='stack')
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


def test_docked_and_plotted(viewer_plot, data):
    viewer, plot = viewer_plot
    _, fit = data
    assert viewer.window.dock_widgets[DOCK_NAME] is plot
    np.testing.assert_array_equal(plot._x_line.get_ydata(), fit.x)
    np.testing.assert_array_equal(plot._r2_line.get_ydata(), fit.r2)
    assert plot.axes_x.get_title() == 'stack'
    assert plot.axes_r2.get_shared_x_axes().joined(plot.axes_x, plot.axes_r2)
    # The ±1.96 SE band spans the line.
    band = plot._band.get_paths()[0].vertices
    assert band[:, 1].min() < fit.x.min()
    assert band[:, 1].max() > fit.x.max()


def test_cursor_follows_slider(viewer_plot):
    viewer, plot = viewer_plot
    viewer.dims.set_current_step(0, 42)
    for line in plot._cursor_lines:
        assert list(line.get_xdata()) == [42, 42]
        assert line.get_visible()
        assert line.get_animated()


def test_click_moves_slider(viewer_plot, data):
    viewer, plot = viewer_plot
    _, fit = data
    _click(plot, plot.axes_x, 123.3, fit.x[123])
    assert viewer.dims.current_step[0] == 123
    _click(plot, plot.axes_r2, 56.6, np.median(fit.r2))
    assert viewer.dims.current_step[0] == 57
    assert list(plot._cursor_lines[0].get_xdata()) == [57, 57]
    # Clamped to the slices: the x axis has a margin past both ends.
    _click(plot, plot.axes_x, -0.4, fit.x[0])
    assert viewer.dims.current_step[0] == 0
    _click(plot, plot.axes_x, 299.4, fit.x[-1])
    assert viewer.dims.current_step[0] == 299


def test_click_ignored_outside_left_button_and_in_zoom_mode(viewer_plot):
    viewer, plot = viewer_plot
    viewer.dims.set_current_step(0, 10)
    _click(plot, plot.axes_x, 150, 0.5, button=3)
    assert viewer.dims.current_step[0] == 10
    plot._toolbar.zoom()
    try:
        _click(plot, plot.axes_x, 150, 0.5)
    finally:
        plot._toolbar.zoom()
    assert viewer.dims.current_step[0] == 10
    _click(plot, plot.axes_x, 150, 0.5)
    assert viewer.dims.current_step[0] == 150


def test_hover_shows_values(viewer_plot, data):
    _, plot = viewer_plot
    _, fit = data
    _hover(plot, plot.axes_x, 42.2, fit.x[42])
    text = plot._status.text()
    match = re.fullmatch(r'slice 42: x = (\S+) ± (\S+), R² = (\S+)', text)
    assert match, text
    x, se, r2 = (float(g) for g in match.groups())
    np.testing.assert_allclose(x, fit.x[42], atol=1e-3)
    np.testing.assert_allclose(se, fit.x_stderr[42], atol=1e-3)
    np.testing.assert_allclose(r2, fit.r2[42], atol=1e-3)
    _hover(plot, plot.axes_r2, INJECTED[1], fit.r2[INJECTED[1]])
    assert plot._status.text().startswith(f'slice {INJECTED[1]}: ')
    assert plot._status.text().endswith('(outlier)')


def test_outliers_marked(viewer_plot, data):
    _, plot = viewer_plot
    _, fit = data
    flagged = set(np.flatnonzero(plot.outliers))
    assert set(INJECTED) <= flagged
    assert len(flagged) <= 4
    assert set(INJECTED) <= set(plot._x_outliers.get_xdata())
    assert set(INJECTED) <= set(plot._r2_outliers.get_xdata())
    i = list(plot._x_outliers.get_xdata()).index(INJECTED[0])
    assert plot._x_outliers.get_ydata()[i] == fit.x[INJECTED[0]]


def test_theme_change_recolours(viewer_plot):
    viewer, plot = viewer_plot
    for name in ('light', 'dark'):
        viewer.theme = name
        theme = get_theme(name)
        bg = to_rgba(theme.background.as_hex())
        fg = to_rgba(theme.foreground.as_hex())
        text = to_rgba(theme.text.as_hex())
        assert plot.figure.get_facecolor() == bg
        for ax in (plot.axes_x, plot.axes_r2):
            assert ax.get_facecolor() == fg
            assert to_rgba(ax.yaxis.label.get_color()) == text
            tick = ax.yaxis.get_major_ticks()[0]
            assert to_rgba(tick.label1.get_color()) == text
        assert to_rgba(plot._x_line.get_color()) == text
        assert to_rgba(plot._band.get_facecolor()[0])[:3] == pytest.approx(
            to_rgba(theme.current.as_hex())[:3]
        )


def test_export_csv(viewer_plot, data, tmp_path):
    _, plot = viewer_plot
    _, fit = data
    path = tmp_path / 'fit.csv'
    plot.export_csv(path)
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 300
    assert [int(r['index_0']) for r in rows] == list(range(300))
    np.testing.assert_allclose([float(r['x']) for r in rows], fit.x, rtol=1e-9)
    np.testing.assert_allclose(
        [float(r['r2']) for r in rows], fit.r2, rtol=1e-9
    )


def test_save_png(viewer_plot, tmp_path):
    import matplotlib.pyplot as plt

    _, plot = viewer_plot
    path = tmp_path / 'plot.png'
    plot.save_png(path, dpi=100)
    assert all(line.get_visible() for line in plot._cursor_lines)
    image = plt.imread(path)
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
    assert len(plot._x_line.get_xdata()) == 0
    assert len(plot._r2_line.get_xdata()) == 0
    assert plot._band is None
    assert not any(line.get_visible() for line in plot._cursor_lines)
    assert not plot._export_button.isEnabled()
    viewer.dims.set_current_step(0, 5)  # no fit: nothing happens
    plot.canvas.draw()


def test_two_leading_axes(make_napari_viewer):
    stack, ref1, ref2 = _stack((40, 3), size=16, outliers=(10,))
    fit = fit_stack(stack, ref1, ref2)
    assert fit.lead_shape == (40, 3)
    viewer, plot = _viewer_with_plot(make_napari_viewer, stack, fit)
    j = viewer.dims.current_step[1]
    np.testing.assert_array_equal(plot._x_line.get_ydata(), fit.x[:, j])
    assert plot.axes_x.get_title() == f'stack (axis 1 = {j})'
    assert len(plot._x_line.get_xdata()) == 40

    viewer.dims.set_current_step(1, 2)
    np.testing.assert_array_equal(plot._x_line.get_ydata(), fit.x[:, 2])
    np.testing.assert_array_equal(plot._r2_line.get_ydata(), fit.r2[:, 2])
    assert plot.axes_x.get_title() == 'stack (axis 1 = 2)'
    assert 10 in plot._x_outliers.get_xdata()
    # The y limits follow the new line (x is 0.2 higher than at j = 0).
    lo, hi = plot.axes_x.get_ylim()
    assert lo < fit.x[:, 2].min() and hi > fit.x[:, 2].max()

    viewer.dims.set_current_step(0, 17)
    assert list(plot._cursor_lines[1].get_xdata()) == [17, 17]
    _hover(plot, plot.axes_x, 17, fit.x[17, 2])
    assert plot._status.text().startswith('slice (17, 2): x = ')
    _click(plot, plot.axes_x, 33, fit.x[33, 2])
    assert viewer.dims.current_step[:2] == (33, 2)
    plot.canvas.draw()


def test_disconnect_on_close(viewer_plot):
    viewer, plot = viewer_plot
    viewer.dims.set_current_step(0, 20)
    plot.close()
    assert not plot._connected
    viewer.dims.set_current_step(0, 80)
    viewer.theme = 'light'
    assert list(plot._cursor_lines[0].get_xdata()) == [20, 20]
    assert plot.figure.get_facecolor() == to_rgba(
        get_theme('dark').background.as_hex()
    )
    plot._disconnect_events()  # idempotent


def test_disconnect_events(viewer_plot):
    viewer, plot = viewer_plot
    plot._disconnect_events()
    viewer.dims.set_current_step(0, 80)
    assert list(plot._cursor_lines[0].get_xdata()) != [80, 80]
    plot._connect_events()
    viewer.dims.set_current_step(0, 81)
    assert list(plot._cursor_lines[0].get_xdata()) == [81, 81]


def test_bad_fit_arguments(viewer_plot, data):
    _, plot = viewer_plot
    _, fit = data
    with pytest.raises(ValueError, match='first_axis is -1'):
        plot.set_fit(fit, first_axis=-1)
    rng = np.random.default_rng(0)
    ref1, ref2 = rng.random((2, 8, 8))
    single = fit_stack(0.5 * (ref1 + ref2) + ref1 * 0.01, ref1, ref2)
    with pytest.raises(ValueError, match='no leading axis'):
        plot.set_fit(single, first_axis=0)


def test_cursor_blits_with_10000_slices(make_napari_viewer, qtbot):
    stack, ref1, ref2 = _stack((10_000,), size=8)
    fit = fit_stack(stack, ref1, ref2)
    viewer = make_napari_viewer(show=True)
    viewer.add_image(stack, name='stack', contrast_limits=(0, 1))
    plot = CoefficientPlot(viewer)
    viewer.window.add_dock_widget(plot, name=DOCK_NAME, area='bottom')
    qtbot.wait(100)

    start = time.perf_counter()
    plot.set_fit(fit, first_axis=0)
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
        assert list(plot._cursor_lines[0].get_xdata()) == [i, i]
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
    _hover(plot, plot.axes_x, INJECTED[0], fit.x[INJECTED[0]])
    shot = viewer.screenshot(canvas_only=False, flash=False)
    path = tmp_path / 'viewer.png'
    plt.imsave(path, shot)
    shutil.copy(path, '/tmp/plot_screenshot.png')
    assert shot.shape[0] >= 700
    # The dock is drawn in the theme's background colour.
    bg = np.array(to_rgba(get_theme(viewer.theme).background.as_hex()))
    rgb = shot[..., :3].reshape(-1, 3) / 255
    assert np.mean(np.all(np.abs(rgb - bg[:3]) < 0.02, axis=1)) > 0.05
