"""The fit's form: the layer pickers and the options.

The pickers offer only layers that can be used and say in a line under
them which layers they leave out and why.  The references are an
ordered list of pickers (:mod:`.reflist`): two by default, up to eight,
each layer at most once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import ComboBox, Container, FloatSpinBox, Label

from napari_mixcoef import (
    CONSTRAINTS,
    MODELS,
    NOISE_MODELS,
    STDERR_MODES,
)

from .record import (
    BASIS_KEY,
    CONSTRAINT_LABELS,
    MODEL_LABELS,
    NOISE_LABELS,
    STDERR_LABELS,
    VIEW_LABELS,
    record_of,
)
from .reflist import ReferenceList, letter

if TYPE_CHECKING:
    import napari

_MUTED = 'color: #a0a4ab;'


def _is(layer, kind: str) -> bool:
    import napari.layers

    return isinstance(layer, getattr(napari.layers, kind))


def _plain_shape(layer) -> tuple[int, ...] | None:
    """Shape of a single-scale, non-RGB image's data, else None."""
    if getattr(layer, 'multiscale', False) or getattr(layer, 'rgb', False):
        return None
    return tuple(layer.data.shape)


def _is_input(layer) -> bool:
    """Tell whether a layer is an image of the user's (not one we made)."""
    return (
        _is(layer, 'Image')
        and record_of(layer) is None
        and BASIS_KEY not in layer.metadata
    )


def _why_not_reference(layer, slices: tuple[int, ...]) -> str | None:
    """Why an image cannot be a reference for slices of that shape."""
    if getattr(layer, 'rgb', False):
        return f'"{layer.name}" is RGB (right-click it ▸ Split RGB)'
    if getattr(layer, 'multiscale', False):
        return f'"{layer.name}" is multiscale (pick one of its levels)'
    shape = tuple(layer.data.shape)
    if len(shape) >= len(slices) + 1:
        return None  # another stack, not a would-be reference
    if len(shape) >= 2 and slices[len(slices) - len(shape) :] == shape:
        return None
    return f'"{layer.name}" has shape {shape} ≠ the stack\'s slices {slices}'


def _is_binary(layer) -> bool:
    """Bool data, or integers that are all 0 or 1 (read only if in memory)."""
    data = layer.data
    kind = np.dtype(data.dtype).kind
    if kind == 'b':
        return True
    if kind not in 'iu' or not isinstance(data, np.ndarray) or not data.size:
        return False
    return bool(data.min() >= 0 and data.max() <= 1)


class FitForm(Container):
    """Pickers for the stack, the references and a mask; the fit options.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer whose layers are offered.
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        widgets = _widgets()
        widgets.insert(
            1,
            ReferenceList(
                name='references',
                label='references',
                tooltip='The reference images, in order (A, B, …): each '
                'slice is fitted as a mix of them; x is the share of A',
            ),
        )
        super().__init__(widgets=widgets)
        self._viewer = viewer
        self.stack.choices = self._stack_choices
        self.references.candidates = self._reference_candidates
        self.mask.choices = self._mask_choices
        self.model.choices = self._model_choices
        self.not_offered.native.setWordWrap(True)
        self.not_offered.native.setStyleSheet(_MUTED)
        self.stack.changed.connect(self._on_stack_changed)
        self.references.changed.connect(self._on_reference_changed)
        self.noise.changed.connect(self._on_noise_changed)
        self._on_noise_changed()
        self.reset_choices()
        self._pick_named_references()  # a stack picked before the connect

    @property
    def reference_1(self) -> ComboBox:
        """The first reference's picker."""
        return self.references.rows[0]

    @property
    def reference_2(self) -> ComboBox:
        """The second reference's picker."""
        return self.references.rows[1]

    # -- choices ------------------------------------------------------------

    def _images(self) -> list:
        return [layer for layer in self._viewer.layers if _is_input(layer)]

    def _stack_choices(self, _widget=None) -> list[tuple[str, object]]:
        return [
            (layer.name, layer)
            for layer in self._images()
            if len(_plain_shape(layer) or ()) >= 3
        ]

    def _slices(self) -> tuple[int, ...] | None:
        """Shape of the stack's slices for 2-D references, or None."""
        stack = self.stack.value
        shape = None if stack is None else _plain_shape(stack)
        return shape[1:] if shape else None

    def _reference_candidates(self) -> list:
        slices, stack = self._slices(), self.stack.value
        if slices is None:
            return []
        return [
            layer
            for layer in self._images()
            if layer is not stack
            and layer != stack
            and _plain_shape(layer) is not None
            and 2 <= len(layer.data.shape) <= len(slices)
            and _why_not_reference(layer, slices) is None
        ]

    def _mask_choices(self, _widget=None) -> list[tuple[str, object]]:
        ref = self.reference_1.value
        shape = None if ref is None else _plain_shape(ref)
        if shape is None:
            return []
        return [
            (layer.name, layer)
            for layer in self._viewer.layers
            # the shape first: _is_binary reads the data
            if _plain_shape(layer) == shape
            and layer not in self.reference_layers()
            and (
                _is(layer, 'Labels')
                or (_is_input(layer) and _is_binary(layer))
            )
        ]

    def reset_choices(self, *_args) -> None:
        """Refresh every picker from the viewer's layers, say what is left."""
        super().reset_choices()
        self._explain()

    def _explain(self) -> None:
        """Say which images the reference pickers leave out, and why."""
        slices, stack = self._slices(), self.stack.value
        reasons = []
        if slices is not None:
            for layer in self._images():
                if layer != stack:
                    why = _why_not_reference(layer, slices)
                    if why is not None:
                        reasons.append(why)
        n = len(reasons)
        self.not_offered.value = (
            f'{n} layer{"s" if n > 1 else ""} not offered: '
            + '; '.join(reasons)
            if reasons
            else ''
        )
        self.not_offered.visible = bool(reasons)

    def _on_stack_changed(self, _value=None) -> None:
        self.references.reset_choices()
        self._pick_named_references()
        self._explain()

    def _pick_named_references(self) -> None:
        """Pick the references a stack names (``metadata["references"]``).

        The samples name theirs, so that the three-state sample opens
        with its three; names of layers that are not open, or not
        offered, leave the pickers as they are.
        """
        stack = self.stack.value
        names = getattr(stack, 'metadata', {}).get('references')
        if not isinstance(names, (list, tuple)):
            return
        offered = {layer.name: layer for layer in self._reference_candidates()}
        layers = [offered.get(name) for name in names]
        if None in layers or len(set(names)) != len(names):
            return
        try:
            self.references.value = layers
        except ValueError:  # too few or too many to pick
            return

    def _on_reference_changed(self, _value=None) -> None:
        self.mask.reset_choices()
        self._label_models()

    def _label_models(self) -> None:
        """Write the model choices with as many references as there are."""
        if self.model.native.itemText(0) != self._model_choices()[0][0]:
            self.model.reset_choices()

    def _model_choices(self, _widget=None) -> list[tuple[str, str]]:
        k = len(self.references.rows)
        if k == 2:
            labels = MODEL_LABELS
        else:
            terms = ' + '.join(f'x{i + 1}·{letter(i)}' for i in range(k))
            free = ' + '.join(f'a{i + 1}·{letter(i)}' for i in range(k))
            labels = {
                'mix': f'{terms}  (mix, Σx = 1)',
                'scaled': f'{free}  (scaled)',
                'offset': f'{free} + c  (offset)',
            }
        return [(labels[m], m) for m in MODELS]

    def _on_noise_changed(self, _value=None) -> None:
        poisson = self.noise.value == 'poisson'
        for widget in (self.gain, self.camera_offset, self.read_noise):
            widget.visible = poisson

    # -- what the form says ---------------------------------------------------

    def reference_layers(self) -> list:
        """Return the picked reference layers, in order (None if unpicked)."""
        return list(self.references.value)

    def options(self) -> dict:
        """Keyword arguments of :func:`napari_mixcoef.fit_stack`."""
        return {
            'model': self.model.value,
            'noise': self.noise.value,
            'gain': float(self.gain.value),
            'camera_offset': float(self.camera_offset.value),
            'read_noise': float(self.read_noise.value),
            'stderr': self.stderr.value,
            'constraint': self.constraint.value,
            'register': self.register.value,
            # a NaN pixel (a dead pixel, a stitched border) is left out of
            # its slice, not the end of the run; the status line counts them
            'nan_policy': 'omit',
        }

    def problem(self) -> str:
        """Say what keeps the form from running ('' if nothing)."""
        if self.stack.value is None:
            return (
                'no stack: open an image stack with at least 3 dimensions '
                '(or File ▸ Open Sample ▸ napari-mixcoef)'
            )
        refs = self.reference_layers()
        if None in refs:
            have = len(self._reference_candidates())
            k = len(refs)
            want = 'two' if k == 2 else str(k)
            fewer = (
                '; remove a row (×) to fit fewer'
                if k > 2 and have >= 2
                else ''
            )
            return (
                f"pick {want} reference layers whose shape is the stack's "
                f'slices {self._slices()}: {have} such layer'
                f'{"" if have == 1 else "s"} open{fewer}'
            )
        return ''


def _widgets() -> list:
    """Make the form's widgets, each with a tooltip."""

    def combo(name, label, tip, **kwargs):
        return ComboBox(name=name, label=label, tooltip=tip, **kwargs)

    def number(name, label, tip, **kwargs):
        return FloatSpinBox(name=name, label=label, tooltip=tip, **kwargs)

    return [
        combo(
            'stack',
            'stack',
            'The image stack to fit, slice by slice: any image layer with '
            'at least 3 dimensions',
        ),
        Label(name='not_offered', label=' ', value=''),
        combo(
            'mask',
            'mask',
            'Optional: only pixels where this Labels layer (or 0/1 image) '
            'is nonzero are fitted',
            nullable=True,
        ),
        combo(
            'model',
            'model',
            'mix: I ≈ x·A + (1−x)·B; scaled: free a, b; offset: free a, b '
            'and a constant c',
            choices=[(MODEL_LABELS[m], m) for m in MODELS],
            value='mix',
        ),
        combo(
            'constraint',
            'constraint',
            'none: shares may leave [0, 1] (a sign that a reference is '
            'missing or wrong); non-negative: every share ≥ 0 (for mix they '
            'also sum to 1; for scaled/offset each a ≥ 0, c free), exact per '
            'slice; a share held at 0 has no error bar',
            choices=[(CONSTRAINT_LABELS[c], c) for c in (None, *CONSTRAINTS)],
            value=None,
        ),
        combo(
            'register',
            'register',
            'none: the slices are taken as aligned with the references; '
            "translation: estimate each slice's sub-pixel shift (drift) "
            'together with its mix, with its error (the plot shows it); the '
            'stack is not changed',
            choices=[('none', None), ('translation', 'translation')],
            value=None,
        ),
        combo(
            'noise',
            'noise',
            'Gaussian: least squares; Poisson: photon counts (set the '
            'camera below); Huber: robust to hot pixels and debris',
            choices=[(NOISE_LABELS[m], m) for m in NOISE_MODELS],
            value='gaussian',
        ),
        number(
            'gain',
            'gain (counts/photon)',
            'Camera counts per detected photon (Poisson noise)',
            value=1.0,
            min=1e-6,
            max=1e6,
            step=0.1,
        ),
        number(
            'camera_offset',
            'camera offset',
            'Counts the camera reads with no light (Poisson noise)',
            value=0.0,
            min=-1e9,
            max=1e9,
            step=1.0,
        ),
        number(
            'read_noise',
            'read noise (photons)',
            "The camera's read noise, rms, in photons (Poisson noise)",
            value=0.0,
            min=0.0,
            max=1e6,
            step=0.1,
        ),
        combo(
            'stderr',
            'errors',
            'robust: right for photon counts and noise correlated between '
            'neighbouring pixels; textbook: independent, equal noise only',
            choices=[(STDERR_LABELS[m], m) for m in STDERR_MODES],
            value='auto',
        ),
        combo(
            'residual_view',
            'show residual',
            "Where the residual layer goes: beside the stack in napari's "
            'grid, or added over it (black where the model fits)',
            choices=[(label, view) for view, label in VIEW_LABELS.items()],
            value='grid',
        ),
    ]
