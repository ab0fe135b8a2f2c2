"""Screenshots of the plugin as a user meets it, for a look after a change.

Run ``xvfb-run -a .venv/bin/python scripts/screenshots.py OUT_DIR`` (or on
a desktop without ``xvfb-run``).  Each view is a fresh napari window of
1500 x 950 with the widget docked, saved as ``OUT_DIR/<name>.png``:

- ``mixture``: the mixture sample after Run (data, residual, plot dock);
- ``band``: the plot zoomed on a few slices, where the 95 % band shows;
- ``four_d``: a (t, z, y, x) stack whose plot follows napari's axis labels;
- ``rgb_pickers``: an RGB layer open: the line under the pickers says why
  it is not offered;
- ``three_states``: the three-reference sample, constrained fit;
- ``drifting_mixture``: the drifting sample, registered, with the shift
  panel (when the installed package registers).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def _viewer():
    import napari

    viewer = napari.Viewer(title='napari-mixcoef')
    viewer.window.resize(1500, 950)
    _, widget = viewer.window.add_plugin_dock_widget(
        'napari-mixcoef', 'Mixing coefficients'
    )
    return viewer, widget


def _run(widget, timeout: float = 120.0):
    """Click Run and process events until the fit has finished."""
    import time

    from qtpy.QtWidgets import QApplication

    done = []
    widget.fit_finished.connect(done.append)
    widget.run.native.click()
    t0 = time.perf_counter()
    while not done and time.perf_counter() - t0 < timeout:
        QApplication.processEvents()
        time.sleep(0.01)
    if not done or done[0] is None:
        raise RuntimeError(f'the fit did not finish: {widget.status.value}')
    return done[0]


def _save(viewer, path: Path) -> None:
    import time

    from qtpy.QtWidgets import QApplication
    from skimage.io import imsave

    for _ in range(30):  # let the docks and the canvas settle
        QApplication.processEvents()
        time.sleep(0.02)
    image = viewer.screenshot(canvas_only=False, flash=False)
    imsave(path, image, check_contrast=False)
    print(f'{path}: {image.shape[1]}x{image.shape[0]}')
    viewer.close()


def mixture(out: Path) -> None:
    """Save the mixture sample after Run."""
    viewer, widget = _viewer()
    viewer.open_sample('napari-mixcoef', 'mixture')
    _run(widget)
    viewer.dims.set_current_step(0, 71)
    _save(viewer, out / 'mixture.png')


def band(out: Path) -> None:
    """Save the plot zoomed on slices 60-90."""
    from napari_mixcoef._qt.widget import find_plot

    viewer, widget = _viewer()
    viewer.open_sample('napari-mixcoef', 'mixture')
    _run(widget)
    plot = find_plot(viewer)
    plot.axes('share').set_xlim(60, 90)
    plot.figure.canvas.draw_idle()
    viewer.dims.set_current_step(0, 75)
    _save(viewer, out / 'band.png')


def four_d(out: Path) -> None:
    """Save a (t, z, y, x) stack after Run."""
    from napari_mixcoef.sample_data import make_mixture

    viewer, widget = _viewer()
    stack, a, b, _ = make_mixture(n_slices=48, shape=(96, 96))
    viewer.add_image(a, name='A')
    viewer.add_image(b, name='B')
    viewer.add_image(stack.reshape(8, 6, 96, 96), name='tz stack')
    viewer.dims.axis_labels = ('t', 'z', 'y', 'x')
    _run(widget)
    viewer.dims.set_current_step(1, 3)
    _save(viewer, out / 'four_d.png')


def rgb_pickers(out: Path) -> None:
    """Save the pickers with an RGB layer open."""
    viewer, widget = _viewer()
    viewer.open_sample('napari-mixcoef', 'mixture')
    rng = np.random.default_rng(0)
    viewer.add_image(rng.random((64, 64, 3)), rgb=True, name='photo')
    _save(viewer, out / 'rgb_pickers.png')


def three_states(out: Path) -> None:
    """Save the three-reference sample, constrained, after Run."""
    viewer, widget = _viewer()
    viewer.open_sample('napari-mixcoef', 'three_states')
    if hasattr(widget, 'constraint'):
        widget.constraint.value = 'nonneg'
    _run(widget)
    _save(viewer, out / 'three_states.png')


def drifting_mixture(out: Path) -> None:
    """Save the drifting sample, registered, after Run."""
    viewer, widget = _viewer()
    try:
        viewer.open_sample('napari-mixcoef', 'drifting_mixture')
    except Exception as exc:  # noqa: BLE001 - a package without the sample
        print(f'drifting_mixture skipped: {exc}')
        viewer.close()
        return
    if hasattr(widget, 'register'):
        widget.register.value = 'translation'
    _run(widget)
    _save(viewer, out / 'drifting_mixture.png')


VIEWS = [mixture, band, four_d, rgb_pickers, three_states, drifting_mixture]


def main(argv: list[str]) -> int:
    """Save the views named after OUT_DIR (default: all)."""
    out = Path(argv[0] if argv else 'screenshots')
    out.mkdir(parents=True, exist_ok=True)
    names = set(argv[1:])
    for view in VIEWS:
        if not names or view.__name__ in names:
            view(out)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
