"""Each slice's sub-pixel translation, estimated with its mix.

How a registered fit works
--------------------------
1. **Coarse**: each slice's cross-correlation with the mean reference,
   by FFT over blocks of slices at a reduced resolution, gives its shift
   to about a pixel (the peak, refined by a parabola).
2. **Joint refinement**: passes over the stack (:data:`.passes.PASSES`;
   the first reads a quarter of the rows of a large box), each reading
   every slice once at its integer offset and fitting the model's
   coefficients and the rest of the shift together, by Gauss–Newton on
   the products with a design shared by all slices of a bin of fractional
   shifts (:mod:`napari_mixcoef.model.shifts`).
3. **The fit**: the engine fits the *registered stack*, a lazy view of
   each slice read at its integer offset plus the noise-free model's
   change over the fractional rest (:class:`RegisteredStack`), against
   the references over the box every slice covers: every model, noise
   model, error mode and constraint as without registration, and the
   slice's own noise untouched (no interpolation of the data).
4. **Errors of the shift** from the joint fit's Jacobian, with the same
   estimator as the coefficients' (textbook, or the sandwich with the
   noise's spatial correlation).

A slice with no structure to register on (its pattern does not stand out
of its noise), or shifted beyond ``max_shift``, is flagged in
``registration_failed``: its shift is NaN and its coefficients are those
of the unregistered slice over the same pixels.

Modules
-------
:mod:`.coarse` (step 1), :mod:`.passes` (step 2 and the options),
:mod:`.stack` (step 3), :mod:`.errors` (step 4).
"""

from __future__ import annotations

from .errors import shift_errors
from .passes import (
    REGISTRATIONS,
    Registration,
    check_register,
    register_stack,
)
from .stack import RegisteredStack

__all__ = [
    'REGISTRATIONS',
    'RegisteredStack',
    'Registration',
    'check_register',
    'register_stack',
    'shift_errors',
]
