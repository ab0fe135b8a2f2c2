"""Per-slice mixing coefficients of an image stack against reference images.

``import napari_mixcoef`` imports numpy and scipy only (numba comes with
the first fit): the napari widgets live in :mod:`napari_mixcoef._qt`,
which the plugin manifest (``napari.yaml``) names directly.
"""

from .core import (
    CONSTRAINTS,
    MODELS,
    NAN_POLICIES,
    NOISE_MODELS,
    STDERR_MODES,
    MixFit,
    fit_stack,
    iter_fit,
    reference_diagnostics,
    residuals,
    warm_up,
)
from .model.noise import DetectorWarning
from .model.references import CollinearityWarning
from .model.result import package_version

__version__ = package_version()

__all__ = [
    'CONSTRAINTS',
    'MODELS',
    'NAN_POLICIES',
    'NOISE_MODELS',
    'STDERR_MODES',
    'CollinearityWarning',
    'DetectorWarning',
    'MixFit',
    '__version__',
    'fit_stack',
    'iter_fit',
    'reference_diagnostics',
    'residuals',
    'warm_up',
]
