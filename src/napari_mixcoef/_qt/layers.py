"""The layers a run leaves in the viewer: the residual and the basis.

The residual is shown with the data, not instead of it: beside the stack
in napari's grid, or blended over it (its colormap is black where the
model fits, so adding it changes nothing there).  The user's layer
selection is kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .record import (
    BASIS_KEY,
    OUTPUT_KEY,
    RESIDUAL_COLORS,
    outputs,
)

if TYPE_CHECKING:
    import napari


def residual_colormap():
    """Blue (darker than the model) – black (fits) – orange (brighter)."""
    from napari.utils.colormaps import Colormap

    return Colormap(
        list(RESIDUAL_COLORS), name='mixcoef residual', display_name='residual'
    )


def _selection(viewer):
    selection = viewer.layers.selection
    return set(selection), selection.active


def _restore_selection(viewer, chosen: tuple) -> None:
    layers, active = chosen
    alive = [layer for layer in layers if layer in viewer.layers]
    viewer.layers.selection.clear()
    viewer.layers.selection.update(alive)
    if active is not None and active in viewer.layers:
        viewer.layers.selection.active = active


def show_residual(
    viewer: napari.viewer.Viewer,
    stack_layer,
    residual,
    record: dict,
    *,
    view: str = 'grid',
):
    """Add the residual layer, or update the one of an earlier run.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
    stack_layer : napari.layers.Image
        The fitted stack; the residual takes its scale and translation and
        goes just above it.
    residual : array_like
        The lazy residual stack (never read whole: the contrast limits are
        given, from the fit's RMSE).
    record : dict
        The run's record (:func:`.record.make_record`).
    view : {"grid", "blend"}
        Beside the stack in napari's grid, or blended over it.

    Returns
    -------
    napari.layers.Image
        The residual layer, named ``"<stack> residual"``.
    """
    name = f'{stack_layer.name} residual'
    fit = record['fit']
    spread = (
        float(np.nanmedian(fit.rmse)) if np.isfinite(fit.rmse).any() else 0
    )
    spread = 4 * spread if np.isfinite(spread) and spread > 0 else 1.0
    props = {
        'contrast_limits': (-spread, spread),
        'colormap': residual_colormap(),
        'scale': stack_layer.scale,
        'translate': stack_layer.translate,
        'blending': 'additive' if view == 'blend' else 'translucent',
        'metadata': {OUTPUT_KEY: record},
    }
    chosen = _selection(viewer)
    # this stack's output of an earlier run, found by its record (renamed
    # or not); several only if made by hand: keep one
    existing = outputs(viewer.layers, record['source'].stack_id)
    for layer in existing[1:]:
        viewer.layers.remove(layer)
    layer = existing[0] if existing else None
    if layer is not None and layer.data.shape != residual.shape:
        viewer.layers.remove(layer)
        layer = None
    if layer is None:
        layer = viewer.add_image(residual, name=name, **props)
        # just above the stack, where a blend adds to it
        here = viewer.layers.index(layer)
        above = viewer.layers.index(stack_layer) + 1
        if here != above:
            viewer.layers.move(here, above)
    else:
        layer.data = residual
        for key, value in props.items():
            setattr(layer, key, value)
        layer.name = name
    # no colour bar: drawn over the canvas it often hid the image, and its
    # first showing was a third of the result's cost (the plot's legend
    # row says what the colours and their limits mean)
    layer.visible = True
    _restore_selection(viewer, chosen)
    return layer


def _grid(viewer):
    # napari 0.9 moved the grid to viewer.canvas (the old name warns)
    canvas = getattr(viewer, 'canvas', None)
    return canvas.grid if canvas is not None else viewer.grid


def show_view(viewer: napari.viewer.Viewer, view: str) -> bool:
    """Turn napari's grid on for ``"grid"``; return whether it changed."""
    grid = _grid(viewer)
    if view != 'grid' or grid.enabled:
        return False
    grid.enabled = True
    return True


def show_basis(viewer: napari.viewer.Viewer, ref_layer, a, b) -> None:
    """Add (or update) the avg/diff basis of two references as layers.

    ``(A+B)/√2`` is what the references share, ``(A−B)/√2`` where they
    differ: only pixels bright in the second tell a mix apart.
    """
    a, b = (np.asarray(v, dtype=np.float32) for v in (a, b))
    avg, diff = (a + b) / np.sqrt(2), (a - b) / np.sqrt(2)
    spread = float(np.abs(diff).max()) or 1.0
    chosen = _selection(viewer)
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
            scale=ref_layer.scale,
            translate=ref_layer.translate,
            metadata={BASIS_KEY: True},
        )
        mine = [
            layer
            for layer in viewer.layers
            if layer.name == name and BASIS_KEY in layer.metadata
        ]
        if mine:
            mine[0].data = data
            for key, value in props.items():
                setattr(mine[0], key, value)
        else:
            viewer.add_image(data, name=name, **props)
    _restore_selection(viewer, chosen)
