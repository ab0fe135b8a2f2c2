"""Block means of images: the coarse estimate's reduced resolution."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

__all__ = ['block_means']


def block_means(images: NDArray, factor: int, ndim: int) -> NDArray:
    """Block means of ``factor`` pixels a side over the last ``ndim`` axes."""
    # float32: a coarse estimate needs no more, and halves the traffic
    if factor == 1:
        return images.astype(np.float32)
    lead = images.ndim - ndim
    keep = tuple(slice(0, (s // factor) * factor) for s in images.shape[lead:])
    x = images[(Ellipsis, *keep)]
    # an axis at a time, adding its strided views: a reduction over split
    # axes (mean(axis=...)) is several times slower
    for axis in range(images.ndim - 1, lead - 1, -1):
        shape = x.shape
        split = x.reshape(
            shape[:axis] + (shape[axis] // factor, factor) + shape[axis + 1 :]
        )
        at = (slice(None),) * (axis + 1)
        acc = split[(*at, 0)].astype(np.float32)
        for i in range(1, factor):
            acc += split[(*at, i)]
        x = acc
    return x / np.float32(factor**ndim)
