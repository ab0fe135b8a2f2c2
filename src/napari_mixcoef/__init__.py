"""Per-slice mixing coefficients of an image stack against two references.

``import napari_mixcoef`` imports numpy and scipy only (numba comes with
the first fit): the napari widgets live in private modules that the
plugin manifest (``napari.yaml``) names directly.
"""

try:
    from ._version import version as __version__
except ImportError:  # running from a source tree that was never installed
    __version__ = 'unknown'

from ._design import CollinearityWarning
from ._estimators import NOISE_MODELS, STDERR_MODES
from .core import (
    MODELS,
    MixFit,
    fit_stack,
    iter_fit,
    reference_diagnostics,
    residuals,
    warm_up,
)

__all__ = [
    'MODELS',
    'CollinearityWarning',
    'NOISE_MODELS',
    'STDERR_MODES',
    'MixFit',
    '__version__',
    'fit_stack',
    'iter_fit',
    'reference_diagnostics',
    'residuals',
    'warm_up',
]
