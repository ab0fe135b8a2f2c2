import numpy as np
import pytest


@pytest.fixture(scope='session', autouse=True)
def compiled_kernels():
    """Compile numba's kernels once, before any test runs.

    On a fresh checkout that takes ~30 s; without this, the first tests
    that fit (or the widget's background warm-up racing a GUI test) would
    pay it inside their own time limits.  Later runs load the cache.
    """
    from napari_mixcoef import warm_up

    warm_up((np.uint16, np.float32, np.float64))


def make_refs(shape=(24, 20), seed=0):
    """Two positive, clearly different reference images (float64)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    a = 300 + 200 * np.sin(xx / 3.0) ** 2 + 50 * rng.random(shape)
    b = 250 + 220 * np.cos(yy / 4.0) ** 2 + 50 * rng.random(shape)
    return a, b


def make_stack(lead=(40,), shape=(24, 20), noise=10.0, seed=0):
    """A stack with known x per slice, Gaussian noise; returns truth too."""
    rng = np.random.default_rng(seed + 1)
    a, b = make_refs(shape, seed)
    x = rng.uniform(0.4, 0.7, lead)
    ex = x[(...,) + (np.newaxis,) * len(shape)]
    clean = ex * a + (1 - ex) * b
    stack = clean + rng.normal(0, noise, clean.shape)
    return stack, a, b, x


@pytest.fixture
def synthetic():
    return make_stack()


def _present_backends():
    from napari_mixcoef.backends import BACKENDS, get_backend

    return [name for name in BACKENDS if get_backend(name) is not None]


@pytest.fixture(params=_present_backends())
def backend(request):
    """Each backend that is installed: every engine test runs on each."""
    return request.param
