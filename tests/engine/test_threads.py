"""The settings a running fit changes are restored, whatever the order.

While any fit runs BLAS is on one thread and the GIL switch interval is
short; the last fit to end restores both, whichever thread it ends in
(threadpoolctl's setter ignores every thread but the first that used it,
which left numpy on one thread when a fit started during the warm-up).
"""

import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import threadpoolctl

from napari_mixcoef import fit_stack, warm_up
from napari_mixcoef.backends import get_backend, register
from napari_mixcoef.engine.threads import blas_libraries, fit_settings

from conftest import make_stack


def blas_threads() -> list[int]:
    """Threads of the BLAS libraries fits limit (numpy's among them)."""
    return [lib.num_threads for lib, _ in blas_libraries()]


def all_blas_threads() -> list[int]:
    info = threadpoolctl.threadpool_info()
    return [i['num_threads'] for i in info if i['user_api'] == 'blas']


def test_fits_in_several_threads_leave_blas_threads_as_found():
    stack, a, b, _ = make_stack(lead=(30,), noise=2.0)
    fit_stack(stack, a, b)  # every BLAS library loaded
    before = all_blas_threads()
    with ThreadPoolExecutor(3) as pool:
        fits = list(pool.map(lambda _: fit_stack(stack, a, b), range(9)))
    assert all_blas_threads() == before
    assert all(np.array_equal(f.x, fits[0].x) for f in fits)


class SpyBackend:
    """numpy's backend, recording BLAS's threads while it works."""

    name = 'spy'

    def __init__(self) -> None:
        self.inner = get_backend('numpy')
        self.seen: list[list[int]] = []

    def __getattr__(self, attr):
        return getattr(self.inner, attr)

    def block_sums(self, y, view, sums) -> None:
        self.seen.append(blas_threads())
        self.inner.block_sums(y, view, sums)


def test_blas_is_on_one_thread_while_a_fit_runs():
    spy = SpyBackend()
    register('spy', lambda: spy)
    stack, a, b, _ = make_stack(lead=(30,), noise=2.0)
    fit_stack(stack, a, b)  # numpy's BLAS is loaded
    before = blas_threads()
    assert before
    fit = fit_stack(stack, a, b, stderr='ols', backend='spy')
    assert fit.backend == 'spy'
    assert spy.seen and all(t == [1] * len(before) for t in spy.seen)
    assert blas_threads() == before


@pytest.mark.parametrize('last', ['other thread', 'this thread'])
def test_settings_restored_whichever_thread_ends_last(last):
    fit_stack(*make_stack(lead=(3,))[:3])
    before, switch = blas_threads(), sys.getswitchinterval()
    inside, release, out = (threading.Event() for _ in range(3))

    def other():
        with fit_settings():
            inside.set()
            release.wait(10)
        out.set()

    thread = threading.Thread(target=other)
    thread.start()
    assert inside.wait(10)
    with fit_settings():
        assert blas_threads() == [1] * len(before)
        assert sys.getswitchinterval() == min(switch, 0.0005)
        if last == 'this thread':
            release.set()
            assert out.wait(10)
            # the first one out restores nothing while another runs
            assert blas_threads() == [1] * len(before)
    if last == 'other thread':
        assert blas_threads() == [1] * len(before)
        release.set()
    thread.join(10)
    assert blas_threads() == before
    assert sys.getswitchinterval() == switch


def test_a_fit_during_the_warm_up_leaves_blas_as_found():
    # the widget warms up in a thread while the user may press Run
    stack, a, b, _ = make_stack(lead=(200,), noise=2.0)
    fit_stack(stack, a, b)
    before, switch = blas_threads(), sys.getswitchinterval()
    for _ in range(3):
        thread = threading.Thread(target=warm_up)
        thread.start()
        fit_stack(stack, a, b)
        thread.join(60)
        assert blas_threads() == before
        assert sys.getswitchinterval() == switch
