"""How long the widget blocks napari's event loop, in a real viewer.

Run on a display (or ``xvfb-run -a python benchmarks/bench_gui.py``).  A
10 ms QTimer ticks while the widget fits a 3000×128×128 stack; the longest
gap between ticks is the longest time the GUI thread was blocked.

First, as a new user meets it (issue 17): in this fresh process, Run is
clicked as soon as the widget opens, while its background warm-up loads
numba's cached kernels and matplotlib; the gaps are timed from the click
until a second after the result is shown (residual layer, plot docked and
drawn).  Then, warm: the widget's warm-up alone, a fit of the numpy and of
the dask-backed stack (while the worker runs / showing the result), and one
slider step with the plot docked.  Targets (issue 4): longest block ≤ 100
ms while the worker runs; showing the results ≤ ~300 ms; a slider step
≤ 16 ms with 10 000 slices.
"""

from __future__ import annotations

import time

import numpy as np


def _wait(app, predicate, timeout=120.0):
    end = time.perf_counter() + timeout
    while not predicate():
        app.processEvents()
        if time.perf_counter() > end:
            raise TimeoutError
        time.sleep(0.001)


def measure(viewer, widget, app, label):
    from qtpy.QtCore import QTimer

    ticks = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    done = {}
    widget.fit_finished.connect(lambda fit: done.setdefault('fit', fit))
    shown = {}
    original = widget._on_returned

    def timed_returned(result):
        t0 = shown['returned'] = time.perf_counter()
        original(result)
        shown['layer'] = time.perf_counter() - t0

    timer.start()
    t0 = time.perf_counter()
    widget.run.native.click()
    click = time.perf_counter() - t0  # the Run handler, on the GUI thread
    widget._worker.returned.disconnect(widget._on_returned)
    widget._worker.returned.connect(timed_returned)
    _wait(app, lambda: 'fit' in done)
    total = time.perf_counter() - t0
    timer.stop()
    ticks = np.array(ticks)
    # gaps between the event loop's turns from the end of the click to the
    # result: with the edges, so that a loop that never turned shows as
    # one block that long
    running = np.diff(
        np.r_[t0 + click, ticks[ticks < shown['returned']], shown['returned']]
    )
    running = running * 1e3
    showing = (ticks[ticks >= shown['returned']][0] - shown['returned']) * 1e3
    print(
        f'{label:<12} fit+show {total:5.2f} s | Run click '
        f'{click * 1e3:5.1f} ms | while the worker runs: '
        f'longest GUI block {running.max():5.1f} ms (99th pct '
        f'{np.percentile(running, 99):5.1f} ms) | showing the result: '
        f'residual layer {shown["layer"] * 1e3:5.1f} ms, first event-loop '
        f'turn after it {showing:5.1f} ms'
    )
    return running.max()


def _gaps(ticks, start, end):
    """Gaps (ms) between the timer's ticks from `start` to `end`, edges in."""
    ticks = np.asarray(ticks)
    inside = ticks[(ticks > start) & (ticks < end)]
    return np.diff(np.r_[start, inside, end]) * 1e3


def measure_first_fit(viewer, app):
    """Run clicked at once in a fresh process: the first fit's GUI blocks."""
    from qtpy.QtCore import QTimer

    ticks = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    t_open = time.perf_counter()
    _, widget = viewer.window.add_plugin_dock_widget(
        'napari-mixcoef', 'Mixing coefficients'
    )
    done = {}
    widget.fit_finished.connect(
        lambda fit: done.setdefault('shown', time.perf_counter())
    )
    t_click = time.perf_counter()
    widget.run.native.click()
    returned = {}
    widget._worker.returned.connect(
        lambda _: returned.setdefault('t', time.perf_counter())
    )
    _wait(app, lambda: 'shown' in done)
    shown = done['shown']
    # the plot's first draw comes after: a second more of the event loop
    end = shown + 1.0
    _wait(app, lambda: time.perf_counter() > end)
    timer.stop()
    running = _gaps(ticks, t_click, returned['t'])
    showing = _gaps(ticks, returned['t'], end)
    warm = widget._warm_up_thread.is_alive()
    print(
        f'first fit in a fresh process (Run clicked as the widget opened, '
        f'{t_click - t_open:.2f} s after): result shown '
        f'{shown - t_click:.2f} s after the click; longest GUI block '
        f'{max(running.max(), showing.max()):.0f} ms (while the worker '
        f'ran {running.max():.0f} ms, 99th pct '
        f'{np.percentile(running, 99):.0f} ms; showing the result and the '
        f'first plot draw {showing.max():.0f} ms); warm-up still running '
        f'at the end: {warm}'
    )
    return widget


def measure_warm_up(widget, app):
    """The widget's background warm-up (numba) against the event loop."""
    from qtpy.QtCore import QTimer

    thread = getattr(widget, '_warm_up_thread', None)
    if thread is None:
        return
    ticks = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    t0 = time.perf_counter()
    _wait(app, lambda: not thread.is_alive())
    timer.stop()
    gaps = np.diff(ticks) * 1e3 if len(ticks) > 1 else np.zeros(1)
    print(
        f'opening the widget: background warm-up (numba, matplotlib) '
        f'{time.perf_counter() - t0:.2f} s more; longest GUI block '
        f'meanwhile {gaps.max():.1f} ms (99th pct '
        f'{np.percentile(gaps, 99):.1f} ms)'
    )


def main():
    import dask.array as da
    import napari
    from qtpy.QtWidgets import QApplication

    rng = np.random.default_rng(0)
    n = 3000
    a, b = (rng.random((2, 128, 128)) * 500 + 200).astype(np.float32)
    x = rng.uniform(0.4, 0.7, n).astype(np.float32)[:, None, None]
    stack = (x * a + (1 - x) * b).astype(np.uint16)
    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    viewer.add_image(a, name='A')
    viewer.add_image(b, name='B')
    viewer.add_image(stack, name='numpy stack', contrast_limits=(0, 800))
    app.processEvents()
    print(f'stack {stack.shape} {stack.dtype}')
    widget = measure_first_fit(viewer, app)
    measure_warm_up(widget, app)
    measure(viewer, widget, app, 'numpy layer')
    viewer.add_image(
        da.from_array(stack, chunks=(100, 128, 128)),
        name='dask stack',
        contrast_limits=(0, 800),
    )
    widget.stack.value = viewer.layers['dask stack']
    # let napari show the new layer first (its first paint, thumbnail and
    # slice take a second or so here): the blocks measured are the fit's
    end = time.perf_counter() + 2.0
    _wait(app, lambda: time.perf_counter() > end)
    measure(viewer, widget, app, 'dask layer')

    viewer.close()
    # slider steps with 10 000 slices, in a viewer holding just that stack
    viewer = napari.Viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget(
        'napari-mixcoef', 'Mixing coefficients'
    )
    big = rng.random((10_000, 16, 16), dtype=np.float32)
    viewer.add_image(big, name='10k', contrast_limits=(0, 1))
    a16, b16 = rng.random((2, 16, 16)).astype(np.float32)
    viewer.add_image(a16, name='a16')
    viewer.add_image(b16, name='b16')
    widget.stack.value = viewer.layers['10k']
    widget.reference_1.value = viewer.layers['a16']
    widget.reference_2.value = viewer.layers['b16']
    done = {}
    widget.fit_finished.connect(lambda fit: done.setdefault('fit', fit))
    widget.run.native.click()
    _wait(app, lambda: 'fit' in done)
    app.processEvents()
    plot = next(
        w for name, w in viewer.window.dock_widgets.items() if 'plot' in name
    )
    steps, cursor = [], []
    for i in range(0, 2000, 20):
        t0 = time.perf_counter()
        viewer.dims.set_current_step(0, i)
        app.processEvents()
        steps.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        plot._on_current_step()  # the plot's own share: blit the cursor
        cursor.append(time.perf_counter() - t0)
    print(
        f'slider step, 10 000 slices: the plot cursor alone median '
        f'{np.median(cursor) * 1e3:.1f} ms (max {np.max(cursor) * 1e3:.1f}'
        f' ms); the whole step with napari slicing and drawing the canvas '
        f'median {np.median(steps) * 1e3:.1f} ms'
    )
    viewer.close()


if __name__ == '__main__':
    main()
