"""What a fit leaves in the viewer, and the words the faces use for it.

The residual layer's ``metadata["mixcoef"]`` is the record of a run: the
fit, the names and ids of the layers it used and its options.  The plot
reads it (also when it is opened alone from the Plugins menu), the layer
logic writes it; neither imports the other, both import this module.
No Qt here.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from napari_mixcoef import MixFit

#: Key of a run's record in the residual layer's metadata.
OUTPUT_KEY = 'mixcoef'
#: Key marking the avg/diff basis layers (never offered as inputs).
BASIS_KEY = 'mixcoef_basis'

MODEL_LABELS = {
    'mix': 'x·A + (1−x)·B  (mix)',
    'scaled': 'a·A + b·B  (scaled)',
    'offset': 'a·A + b·B + c  (offset)',
}
NOISE_LABELS = {
    'gaussian': 'Gaussian (least squares)',
    'poisson': 'Poisson (photon counts)',
    'huber': 'Huber (robust to hot pixels)',
}
STDERR_LABELS = {
    'auto': 'robust (unequal, correlated noise)',
    'ols': 'textbook OLS',
}
CONSTRAINT_LABELS = {
    None: 'none',
    'nonneg': 'non-negative (shares ≥ 0)',
}
#: How the residual is shown, for the form: (label, value) pairs.
VIEW_LABELS = {
    'grid': 'beside the stack (grid)',
    'blend': 'blended over the stack',
}
# the short forms, for a plot title
_NOISE_WORDS = {'gaussian': 'Gaussian', 'poisson': 'Poisson', 'huber': 'Huber'}
_STDERR_WORDS = {'auto': 'robust', 'ols': 'textbook'}

#: The residual's colours, negative to positive: black where the model
#: explains the pixel, so that blended over the stack it adds nothing there.
RESIDUAL_COLORS = ('#3d9cff', '#000000', '#ff9d2e')
RESIDUAL_LEGEND = (
    'residual (data − model): orange brighter than the model, blue darker, '
    'black where it fits'
)

_runs = itertools.count(1)


@dataclass(frozen=True)
class FitSource:
    """The layers a fit was made from, by name and by napari's unique id.

    Attributes
    ----------
    stack : str
        Name of the stack layer when the fit ran.
    references : tuple of str
        Names of the reference layers, in order (K of them).
    mask : str or None
        Name of the mask layer.
    ids : tuple
        ``unique_id`` of the stack, each reference and the mask.
    first_axis : int
        The viewer's dims axis of the stack's first leading axis.
    """

    stack: str
    references: tuple[str, ...]
    mask: str | None
    ids: tuple[Hashable, ...]
    first_axis: int = 0

    @property
    def stack_id(self) -> Hashable:
        """``unique_id`` of the stack layer."""
        return self.ids[0]


def make_record(fit: MixFit, source: FitSource) -> dict:
    """Return the metadata record of a run (the contract's keys first).

    Parameters
    ----------
    fit : MixFit
        The run's result.
    source : FitSource
        What it was fitted from.

    Returns
    -------
    dict
        ``x``, ``x_stderr``, ``r2``, ``rmse``, ``coef``, ``stderr``,
        ``names``, ``model``, ``noise``, ``stderr_mode``, ``n_pixels``,
        ``fractions``, ``fractions_stderr``, ``references`` (the layer
        names, in order), ``at_bound``, ``constraint``, ``n_omitted``, the
        other layer names, and ``fit``, ``source`` and ``run`` (a counter
        that tells the latest run).
    """
    record = {
        'x': fit.x,
        'x_stderr': fit.x_stderr,
        'r2': fit.r2,
        'rmse': fit.rmse,
        'coef': fit.coef,
        'stderr': fit.stderr,
        'names': fit.names,
        'model': fit.model,
        'noise': fit.noise,
        'stderr_mode': fit.stderr_mode,
        'n_pixels': fit.n_pixels,
        'fractions': fit.fractions,
        'fractions_stderr': fit.fractions_stderr,
        'references': list(source.references),
        'at_bound': fit.at_bound,
        'constraint': fit.constraint,
        'n_omitted': fit.n_omitted,
        'shift': fit.shift,
        'shift_stderr': fit.shift_stderr,
        'registration_failed': fit.registration_failed,
        'stack': source.stack,
        'mask': source.mask,
        'fit': fit,
        'source': source,
        'run': next(_runs),
    }
    for i, name in enumerate(source.references, start=1):
        record[f'reference_{i}'] = name
    return record


def record_of(layer) -> dict | None:
    """Return the run record a layer carries, or None."""
    record = getattr(layer, 'metadata', {}).get(OUTPUT_KEY)
    if isinstance(record, dict) and 'fit' in record and 'source' in record:
        return record
    return None


def outputs(layers: Iterable, stack_id: Hashable | None = None) -> list:
    """Return the output layers, of one stack's runs if `stack_id` is set.

    Found by their records, not by name or identity: a renamed residual is
    still found, and napari hands plugins proxies of its layers, so an
    identity check never matches.
    """
    found = []
    for layer in layers:
        record = record_of(layer)
        if record is not None and (
            stack_id is None or record['source'].stack_id == stack_id
        ):
            found.append(layer)
    return found


def latest_output(layers: Iterable):
    """Return the output layer of the latest run, or None."""
    found = outputs(layers)
    return max(found, key=lambda la: record_of(la)['run'], default=None)


def describe_fit(fit: MixFit) -> str:
    """``mix model · Gaussian noise · robust errors`` for a title."""
    noise = _NOISE_WORDS.get(fit.noise, fit.noise)
    errors = _STDERR_WORDS.get(fit.stderr_mode, fit.stderr_mode)
    return f'{fit.model} model · {noise} noise · {errors} errors'


def slices_word(n: int) -> str:
    """``1 slice``, ``200 slices``."""
    return f'{n} slice' if n == 1 else f'{n} slices'


def plural(n: int, word: str) -> str:
    """``1 pixel``, ``3 pixels``."""
    return f'{n} {word}' if n == 1 else f'{n} {word}s'


def bound_summary(fit: MixFit) -> str:
    """Say how many slices a constraint holds, or have a share off [0, 1].

    Returns
    -------
    str
        ``"41 slices at a bound"`` for a constrained fit; else ``"3 slices
        with a share outside [0, 1]"``, or ``""`` when there are none and
        the fit has two references (whose one share says it already).
    """
    if fit.constraint is not None:
        n = int(np.count_nonzero(fit.at_bound))
        return f'{slices_word(n)} at a bound ({fit.constraint})'
    shares = np.asarray(fit.fractions, dtype=np.float64)
    off = (shares < 0) | (shares > 1)
    n = int(np.count_nonzero(off.any(axis=-1)))
    if n == 0 and fit.n_references <= 2:
        return ''
    return f'{slices_word(n)} with a share outside [0, 1]'


def omitted_summary(fit: MixFit) -> str:
    """``"3 pixels in 2 slices left out (NaN or inf)"``, or ``""``."""
    omitted = fit.n_omitted
    if omitted is None or not np.any(omitted):
        return ''
    pixels = int(np.sum(omitted))
    slices = int(np.count_nonzero(omitted))
    return (
        f'{plural(pixels, "pixel")} in {slices_word(slices)} left out '
        '(NaN or inf)'
    )
