"""The samples: noisy uint16 stacks mixed from known references.

"mixture" mixes two references, "three_states" three; "drifting_mixture" is
the mixture with a slow sub-pixel drift of a few pixels.  Both are built from
images that ship inside scikit-image's wheel (nothing is downloaded): the
haematoxylin and DAB stain channels of its immunohistochemistry image
(separated with :func:`skimage.color.rgb2hed`) and its phase-contrast cell
image stand in for fluorophore distributions.  Pure numpy; no napari
import.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

#: Slices where the sample deliberately breaks the model, so that the
#: residual layer and the outlier marks have something to show: a bright
#: speck of debris drifting through, and one defocused frame.
DEBRIS_SLICES = (70, 71, 72)
DEFOCUS_SLICE = 150


def make_mixture(
    n_slices: int = 200,
    shape: tuple[int, int] = (128, 128),
    *,
    photons: float = 900.0,
    camera_offset: float = 100.0,
    read_noise: float = 3.0,
    seed: int = 0,
) -> tuple[
    NDArray[np.uint16],
    NDArray[np.float32],
    NDArray[np.float32],
    NDArray[np.float64],
]:
    """Make the mixture sample.

    Parameters
    ----------
    n_slices : int
        Number of slices.
    shape : tuple of int
        Slice shape (at most 512 × 512).
    photons : float
        Mean photon count of a reference image.
    camera_offset, read_noise : float
        Camera baseline (counts) and Gaussian read noise (counts, sd).
    seed : int
        Seed of the noise.

    Returns
    -------
    stack : (n_slices, *shape) ndarray of uint16
        ``x_i·A + (1−x_i)·B`` in photons, Poisson-sampled, plus read noise
        and the camera offset.
    ref1, ref2 : (*shape) ndarray of float32
        The noise-free references A and B in counts (offset included, as a
        dark-corrected average of many frames would be).
    truth_x : (n_slices,) ndarray of float64
        The mixing coefficients used, slowly varying within 0.4–0.7.
    """
    mean, a, b, truth = _mixture_mean(n_slices, shape, photons)
    rng = np.random.default_rng(seed)
    counts = rng.poisson(mean) + rng.normal(0, read_noise, mean.shape)
    stack = np.clip(np.rint(counts + camera_offset), 0, 65535)
    return (
        stack.astype(np.uint16),
        (a + camera_offset).astype(np.float32),
        (b + camera_offset).astype(np.float32),
        truth,
    )


def _mixture_mean(n_slices, shape, photons, defects=True):
    """Return the mixture's mean photons, references and x."""
    from skimage import filters

    a, b = _stains(shape, photons)
    t = np.arange(n_slices)
    truth = 0.55 + 0.1 * np.sin(2 * np.pi * t / 160) + 0.03 * np.sin(t / 9)
    truth = np.clip(truth, 0.4, 0.7)
    mean = truth[:, None, None] * a + (1 - truth[:, None, None]) * b
    for i in DEBRIS_SLICES if defects else ():
        if i < n_slices:
            yy, xx = np.mgrid[: shape[0], : shape[1]]
            cy = 0.3 * shape[0] + 4 * (i - DEBRIS_SLICES[0])
            cx = 0.6 * shape[1]
            mean[i] += (
                3
                * photons
                * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 3.0**2))
            )
    if defects and DEFOCUS_SLICE < n_slices:
        mean[DEFOCUS_SLICE] = filters.gaussian(mean[DEFOCUS_SLICE], sigma=2.5)
    return mean, a, b, truth


def drift_path(n_slices: int, amplitude: float = 3.0) -> NDArray[np.float64]:
    """Return a slow sub-pixel drift within ±amplitude pixels, (n, 2)."""
    t = np.arange(n_slices) / max(n_slices, 1)
    return np.stack(
        [
            amplitude * np.sin(2 * np.pi * 0.8 * t),
            0.85 * amplitude * np.cos(2 * np.pi * t + 0.4),
        ],
        axis=1,
    )


def make_drifting_mixture(
    n_slices: int = 200,
    shape: tuple[int, int] = (128, 128),
    *,
    amplitude: float = 3.0,
    photons: float = 900.0,
    camera_offset: float = 100.0,
    read_noise: float = 3.0,
    defects: bool = True,
    seed: int = 0,
) -> tuple[
    NDArray[np.uint16],
    NDArray[np.float32],
    NDArray[np.float32],
    NDArray[np.float64],
    NDArray[np.float64],
]:
    """Make the "drifting_mixture" sample: the mixture, slowly drifting.

    Parameters
    ----------
    n_slices, shape, photons, camera_offset, read_noise, seed
        As :func:`make_mixture`.
    amplitude : float
        Largest drift along an axis (pixels).
    defects : bool
        Whether the debris and defocused slices of the mixture are in.

    Returns
    -------
    stack : (n_slices, *shape) ndarray of uint16
        Slice ``i`` is ``scipy.ndimage.shift(mean_i, truth_shift[i])``
        (cubic spline, edges continued), Poisson-sampled, plus read noise
        and the camera offset.
    ref1, ref2 : (*shape) ndarray of float32
        The references (not shifted), in counts.
    truth_x : (n_slices,) ndarray of float64
        The mixing coefficients.
    truth_shift : (n_slices, 2) ndarray of float64
        The drift (:func:`drift_path`), pixels along each axis.
    """
    from scipy import ndimage

    mean, a, b, truth = _mixture_mean(n_slices, shape, photons, defects)
    shift = drift_path(n_slices, amplitude)
    for i in range(n_slices):
        mean[i] = ndimage.shift(mean[i], shift[i], order=3, mode='nearest')
    rng = np.random.default_rng(seed)
    counts = rng.poisson(np.maximum(mean, 0)) + rng.normal(
        0, read_noise, mean.shape
    )
    stack = np.clip(np.rint(counts + camera_offset), 0, 65535)
    return (
        stack.astype(np.uint16),
        (a + camera_offset).astype(np.float32),
        (b + camera_offset).astype(np.float32),
        truth,
        shift,
    )


def sample_drifting_mixture() -> list[tuple]:
    """Return the "drifting_mixture" sample as napari layer data tuples.

    Returns
    -------
    list of (data, kwargs, layer_type)
        "reference 1", "reference 2" and "drifting mixture stack" (uint16,
        ``metadata["truth_x"]`` and ``metadata["truth_shift"]`` (n, 2)).
    """
    stack, ref1, ref2, truth, shift = make_drifting_mixture()
    layers = _mixture_layers(stack, ref1, ref2, 'drifting mixture stack')
    layers[-1][1]['metadata']['truth_x'] = truth
    layers[-1][1]['metadata']['truth_shift'] = shift
    return layers


def sample_mixture() -> list[tuple]:
    """Return the "mixture" sample as napari layer data tuples.

    Returns
    -------
    list of (data, kwargs, layer_type)
        "mixture stack" (uint16, ``metadata["truth_x"]``), "reference 1"
        and "reference 2".
    """
    stack, ref1, ref2, truth = make_mixture()
    layers = _mixture_layers(stack, ref1, ref2, 'mixture stack')
    layers[-1][1]['metadata']['truth_x'] = truth
    return layers


def _mixture_layers(stack, ref1, ref2, name: str) -> list[tuple]:
    """Return the two references (hidden) and the stack's layer tuples."""
    limits = [
        float(min(ref1.min(), ref2.min())),
        float(max(ref1.max(), ref2.max())),
    ]
    return [
        (
            ref1,
            {
                'name': 'reference 1',
                'colormap': 'magenta',
                'contrast_limits': limits,
                'visible': False,
            },
            'image',
        ),
        (
            ref2,
            {
                'name': 'reference 2',
                'colormap': 'green',
                'contrast_limits': limits,
                'visible': False,
            },
            'image',
        ),
        (
            stack,
            {
                'name': name,
                'contrast_limits': limits,
                'metadata': {'references': ['reference 1', 'reference 2']},
            },
            'image',
        ),
    ]


def _photons(image: NDArray, photons: float) -> NDArray[np.float64]:
    """Scale a pattern to a reference in photons, with a dim background.

    No pixel is dark: real references never are, and Poisson noise needs a
    positive mean.
    """
    image = (image - image.min()) / (np.ptp(image) or 1.0)
    return photons * (0.25 + 1.5 * image / image.mean() / 2)


def _stains(shape: tuple[int, int], photons: float) -> list[NDArray]:
    """Haematoxylin and DAB of a field with both stains, in photons."""
    from skimage import color, data, filters

    hed = color.rgb2hed(data.immunohistochemistry())
    y0, x0 = 200, 240
    crop = (slice(y0, y0 + shape[0]), slice(x0, x0 + shape[1]))
    return [
        _photons(filters.gaussian(hed[..., channel], sigma=1.0)[crop], photons)
        for channel in (0, 2)
    ]


def _cells(shape: tuple[int, int], photons: float) -> NDArray[np.float64]:
    """Phase-contrast cells (scikit-image's cell image), in photons."""
    from skimage import data, filters, transform

    cells = data.cell().astype(np.float64)
    cells = transform.resize(cells[:512, :512], shape, anti_aliasing=True)
    return _photons(filters.gaussian(cells, sigma=1.0), photons)


def three_state_fractions(n_slices: int) -> NDArray[np.float64]:
    """Return smoothly varying fractions of three states, (n_slices, 3).

    They sum to one, and each is zero over a stretch of slices.
    """
    t = np.arange(n_slices) / max(n_slices, 1)
    phase = 2 * np.pi * t + 2 * np.pi * np.arange(3)[:, None] / 3
    raw = np.clip(1 / 3 + 0.55 * np.cos(phase), 0, None).T
    return raw / raw.sum(axis=1, keepdims=True)


def make_three_states(
    n_slices: int = 300,
    shape: tuple[int, int] = (128, 128),
    *,
    photons: float = 900.0,
    camera_offset: float = 100.0,
    read_noise: float = 3.0,
    seed: int = 0,
) -> tuple[NDArray[np.uint16], list[NDArray[np.float32]], NDArray]:
    """Make the "three_states" sample.

    Parameters
    ----------
    n_slices : int
        Number of slices.
    shape : tuple of int
        Slice shape (at most 512 × 512).
    photons : float
        Mean photon count of a reference image.
    camera_offset, read_noise : float
        Camera baseline (counts) and Gaussian read noise (counts, sd).
    seed : int
        Seed of the noise.

    Returns
    -------
    stack : (n_slices, *shape) ndarray of uint16
        ``Σ_k x_k R_k`` in photons, Poisson-sampled, plus read noise and
        the camera offset.
    references : list of three (*shape) ndarray of float32
        The noise-free states in counts (offset included).
    truth : (n_slices, 3) ndarray of float64
        The fractions used (:func:`three_state_fractions`).
    """
    refs = [*_stains(shape, photons), _cells(shape, photons)]
    truth = three_state_fractions(n_slices)
    mean = np.tensordot(truth, np.stack(refs), axes=(1, 0))
    rng = np.random.default_rng(seed)
    counts = rng.poisson(mean) + rng.normal(0, read_noise, mean.shape)
    stack = np.clip(np.rint(counts + camera_offset), 0, 65535)
    return (
        stack.astype(np.uint16),
        [(r + camera_offset).astype(np.float32) for r in refs],
        truth,
    )


def sample_three_states() -> list[tuple]:
    """Return the "three_states" sample as napari layer data tuples.

    Returns
    -------
    list of (data, kwargs, layer_type)
        "state 1", "state 2", "state 3" and "three states stack" (uint16,
        ``metadata["truth_fractions"]`` of shape (n, 3)).
    """
    stack, refs, truth = make_three_states()
    limits = [
        float(min(r.min() for r in refs)),
        float(max(r.max() for r in refs)),
    ]
    layers = [
        (
            ref,
            {
                'name': f'state {i + 1}',
                'colormap': colormap,
                'contrast_limits': limits,
                'visible': False,
            },
            'image',
        )
        for i, (ref, colormap) in enumerate(
            zip(refs, ('magenta', 'green', 'cyan'))
        )
    ]
    layers.append(
        (
            stack,
            {
                'name': 'three states stack',
                'contrast_limits': limits,
                'metadata': {
                    'truth_fractions': truth,
                    # the widget picks these when the stack is picked
                    'references': [f'state {i + 1}' for i in range(3)],
                },
            },
            'image',
        )
    )
    return layers
