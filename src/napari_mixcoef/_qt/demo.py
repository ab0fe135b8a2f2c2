"""``napari-mixcoef demo``: napari with the sample, the widget and a fit."""

from __future__ import annotations


def run_demo(screenshot: str | None = None) -> int:
    """Open napari with the sample mixture, dock the widget and run the fit.

    Parameters
    ----------
    screenshot : str, optional
        Save a screenshot of the whole window here once the plot shows the
        fit, then close napari (works on a virtual display).

    Returns
    -------
    int
        Exit code: 0, or 1 if the fit did not finish.
    """
    import napari
    from qtpy.QtCore import QTimer

    viewer = napari.Viewer(title='napari-mixcoef demo')
    viewer.window.resize(1500, 950)
    viewer.open_sample('napari-mixcoef', 'mixture')
    _, widget = viewer.window.add_plugin_dock_widget(
        'napari-mixcoef', 'Mixing coefficients'
    )
    # show a slice the model does not explain (the sample's debris)
    viewer.dims.set_current_step(0, 71)
    outcome = {'code': 1}

    def finished(fit) -> None:
        outcome['code'] = 0 if fit is not None else 1
        if screenshot:
            QTimer.singleShot(300, save_and_quit)

    def save_and_quit() -> None:
        from skimage.io import imsave

        image = viewer.screenshot(canvas_only=False, flash=False)
        imsave(screenshot, image, check_contrast=False)
        print(f'screenshot saved to {screenshot}')
        viewer.close()

    widget.fit_finished.connect(finished)
    QTimer.singleShot(0, widget.run.native.click)
    napari.run()
    return outcome['code'] if screenshot else 0
