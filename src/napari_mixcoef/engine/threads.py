"""The chunk threads, and the process settings a running fit changes.

Fits run their blocks on a persistent pool of two threads (starting
threads and scanning the loaded libraries for BLAS take longer than
fitting a small stack).  While any fit runs, :data:`fit_settings` keeps

* every BLAS library on one thread: the chunk threads are the
  parallelism, and after a multi-threaded BLAS call OpenBLAS's idle threads
  spin for a while, taking the cores from them;
* a short GIL switch interval, so that a GUI thread gets the GIL within a
  fraction of a millisecond of asking, between the chunk threads' short
  Python steps.

Both are process-wide.  Several fits may overlap (in several threads), so
the first one in changes them and the last one out restores what the
first one found, whichever threads those are: OpenBLAS's count is set
through its own C function, which takes effect from any thread
(threadpoolctl's setter only lets the first thread that used it change
it, and silently ignored a restore from another one: numpy stayed on one
thread for a napari session when a fit started while the warm-up ran).
BLAS libraries whose limit is per thread (OpenMP) are limited in the
fit's own thread and restored there.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor

__all__ = ['SharedSetting', 'batch', 'fit_settings', 'pool', 'thread_run']


def _n_threads() -> int:
    return max(1, min(2, os.cpu_count() or 1))


_POOL: ThreadPoolExecutor | None = None
_BLAS: list = []  # (controller, process-wide setter or None) per library
_POOL_LOCK = threading.Lock()


def pool() -> ThreadPoolExecutor:
    """Return the shared chunk threads (made once)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(
                _n_threads(),
                thread_name_prefix='mixcoef',
                initializer=_limit_pool_thread,
            )
    return _POOL


def _limit_pool_thread() -> None:
    """Per-thread (OpenMP) BLAS on one thread in the chunk threads, for good.

    They are the fits' own threads: nothing else runs BLAS in them.
    """
    for lib, setter in blas_libraries():
        if setter is None:
            lib.set_num_threads(1)


def _process_setter(lib) -> Callable[[int], object] | None:
    """OpenBLAS's own thread-count setter (process-wide), if it has one."""
    if lib.internal_api != 'openblas' or lib.threading_layer == 'openmp':
        return None
    for prefix in ('', 'scipy_'):
        for suffix in ('', '64_', '_64'):
            name = f'{prefix}openblas_set_num_threads{suffix}'
            func = getattr(lib.dynlib, name, None)
            if func is not None:
                return func
    return None


def blas_libraries() -> list:
    """Return ``(controller, setter)`` of each loaded BLAS library.

    Read at the first fit, when numpy's BLAS is loaded; libraries loaded
    later by other code are never called by a fit.
    """
    with _POOL_LOCK:
        if not _BLAS:
            from threadpoolctl import ThreadpoolController

            libs = ThreadpoolController().select(user_api='blas')
            _BLAS.extend(
                (lib, _process_setter(lib)) for lib in libs.lib_controllers
            )
            if not _BLAS:
                _BLAS.append(None)  # none loaded: remember that we looked
    return [entry for entry in _BLAS if entry is not None]


class SharedSetting:
    """A process-wide setting changed while any of several users runs.

    ``with setting():`` around each user (a fit; fits may overlap in
    several threads).  The first one in calls ``apply()``, which changes
    the setting and returns what it replaced; the last one out passes that
    to ``restore``.  Each user restoring what it found itself would leave
    the setting changed for good when users end out of order.
    """

    def __init__(
        self, apply: Callable[[], object], restore: Callable[[object], object]
    ) -> None:
        self._apply, self._restore = apply, restore
        self._lock = threading.Lock()
        self._users = 0
        self._saved = None

    @contextlib.contextmanager
    def __call__(self):
        """Hold the setting changed while the ``with`` block runs."""
        with self._lock:
            if self._users == 0:
                self._saved = self._apply()
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._restore(self._saved)
                    self._saved = None


def _one_blas_thread() -> list:
    """Put the process-wide BLAS libraries on one thread; return the old."""
    found = []
    for lib, setter in blas_libraries():
        if setter is None:
            continue
        threads = lib.num_threads
        if threads != 1:
            setter(1)
            found.append((setter, threads))
    return found


def _restore_blas(found: list) -> None:
    for setter, threads in found:
        setter(threads)


def _short_switch_interval() -> float:
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, 0.0005))
    return interval


_shared_blas = SharedSetting(_one_blas_thread, _restore_blas)
_shared_switch = SharedSetting(_short_switch_interval, sys.setswitchinterval)


@contextlib.contextmanager
def _per_thread_blas():
    """Limit per-thread (OpenMP) BLAS libraries in this thread only."""
    found = []
    for lib, setter in blas_libraries():
        if setter is None and lib.num_threads != 1:
            found.append((lib, lib.num_threads))
            lib.set_num_threads(1)
    try:
        yield
    finally:
        for lib, threads in found:
            lib.set_num_threads(threads)


@contextlib.contextmanager
def fit_settings():
    """Context of a running fit: BLAS on one thread, a short GIL interval."""
    with _shared_blas(), _shared_switch(), _per_thread_blas():
        yield


def thread_run(
    groups: list,
    work: Callable[[object], None],
    check: Callable[[int, int], None],
    n_slices: int,
) -> Generator[tuple[int, int], None, None]:
    """Run ``work`` on every block on the chunk threads, in runs.

    ``groups`` are lists of blocks covering whole slices; a group runs in
    one thread (bands of a slice add into the same rows).  ``check(start,
    stop)`` runs in the caller's thread on each finished run of slices (it
    may raise, which stops the rest).  Yields ``(done_slices,
    total_slices)`` as runs finish, in order.  Run it inside
    :func:`fit_settings`.
    """
    stop_event = threading.Event()

    def run_task(task) -> None:
        # threads get runs of many blocks: a pool task costs about as much
        # as the work on one cache-sized block
        for group in task:
            if stop_event.is_set():
                return
            for block in group:
                work(block)

    tasks = batch(groups)
    yield 0, n_slices
    futures = [pool().submit(run_task, task) for task in tasks]
    try:
        for task, fut in zip(tasks, futures):
            fut.result()
            start, stop = task[0][0].start, task[-1][0].stop
            check(start, stop)
            yield stop, n_slices
    finally:
        # a closed generator (cancelled fit) stops the other tasks too,
        # and waits for the running ones: they write into the results
        stop_event.set()
        for fut in futures:
            fut.cancel()
        for fut in futures:
            if not fut.cancelled():
                fut.exception()


def batch(groups) -> list:
    """Split row groups into runs of ~16 chunk budgets of work each.

    Few enough that pool overhead vanishes, many enough (≥ 8 when there
    is work for it) for progress, cancellation and load balance.
    """
    per_task = max(1, min(16, len(groups) // 8))
    return [groups[i : i + per_task] for i in range(0, len(groups), per_task)]
