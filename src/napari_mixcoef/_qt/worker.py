"""A fit in a napari worker thread, stoppable, speaking the GUI's words.

:func:`start_fit` runs :func:`napari_mixcoef.iter_fit` in a generator
worker: each step reaches the event loop as progress, a stop closes the
fit in the worker's thread, warnings and errors come back as text for the
dock's status line.  Lazy (dask, zarr) references and masks are read here,
never on the GUI thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from napari_mixcoef import iter_fit, residuals
from napari_mixcoef.io import reword


class FitFailed(Exception):
    """A fit failed in the worker thread; the message is for the user."""


@dataclass(frozen=True)
class FitJob:
    """What to fit, and the names to speak of it.

    Attributes
    ----------
    stack : array_like
        The stack layer's data (numpy, dask, zarr), read by the fit.
    references : tuple of array_like
        The reference layers' data, in order.
    mask : array_like or None
        The mask layer's data (nonzero: fitted).
    options : dict
        Further keyword arguments of :func:`napari_mixcoef.iter_fit`.
    names : dict
        ``"stack"``, ``"references"`` (tuple) and ``"mask"`` layer names.
    prepare : callable, optional
        Called first, in the worker (e.g. imports the result will need).
    """

    stack: object
    references: tuple
    mask: object
    options: dict
    names: dict
    prepare: Callable[[], object] | None = field(default=None, repr=False)


def gui_message(err: BaseException, names: dict) -> str:
    """Say a fit error in the GUI's words (layer names, no Python)."""
    words = {
        f'ref{i}': f'reference {i} "{name}"'
        for i, name in enumerate(names['references'], start=1)
    }
    words.update(
        {
            'mask=': 'a mask layer',
            'model=': 'the {} model',
            'reference_diagnostics()': 'the diagnostics under the pickers',
        }
    )
    advice = (
        'pick a mask (a Labels layer, nonzero where the pixels are good) '
        'that leaves those pixels out'
    )
    return reword(str(err) or type(err).__name__, words, nan_advice=advice)


def _fit(job: FitJob):
    """Worker body: yield ``(done, total)`` per block; return the result."""
    if job.prepare is not None:
        job.prepare()
    try:
        references = [np.asarray(r) for r in job.references]
        mask = None if job.mask is None else np.asarray(job.mask) != 0
        fit = yield from iter_fit(
            job.stack, *references, mask=mask, **job.options
        )
        return fit, residuals(job.stack, *references, fit)
    except (ValueError, TypeError, RuntimeError, MemoryError) as err:
        # superqt ends a generator worker that raises RuntimeError without
        # any signal (it takes it for a deleted Qt object): re-raise as
        # another type, which reaches `errored`
        raise FitFailed(gui_message(err, job.names)) from err


def _steps_of(fit):
    """Yield the steps of the generator `fit`, return its value.

    The generator is made here, not by the worker, to close it when the
    worker stops.
    """
    return (yield from fit)


def start_fit(
    job: FitJob,
    *,
    progress: Callable,
    returned: Callable,
    errored: Callable,
    aborted: Callable,
    finished: Callable,
    warned: Callable,
):
    """Start the fit in a worker thread, handlers connected first.

    Parameters
    ----------
    job : FitJob
        What to fit.
    progress : callable
        ``progress((done, total))``, per block.
    returned : callable
        ``returned((fit, residual))`` when the fit ends.
    errored : callable
        ``errored(FitFailed)`` (the message is for the user).
    aborted, finished : callable
        After a stop; after every end.
    warned : callable
        ``warned(text)`` for each warning the fit raised.

    Returns
    -------
    napari.qt.threading.GeneratorWorker
        Running; ``quit()`` stops it at the next block.
    """
    from napari.qt.threading import create_worker
    from qtpy.QtCore import Qt

    fit = _fit(job)
    worker = create_worker(
        _steps_of, fit, _start_thread=False, _ignore_errors=True
    )
    # a stopped worker stops resuming the fit but leaves it suspended, with
    # its threads, BLAS limit and arrays, until garbage collection (never,
    # after a removed layer or a closed viewer): close it at once, in the
    # worker's thread, which sends `aborted` with the fit between steps
    worker.aborted.connect(fit.close, type=Qt.ConnectionType.DirectConnection)
    worker.yielded.connect(progress)
    worker.returned.connect(returned)
    worker.errored.connect(errored)
    worker.aborted.connect(aborted)
    worker.finished.connect(finished)
    worker.warned.connect(
        lambda w: warned(gui_message(w[0], job.names) if w else '')
    )
    worker.start()
    return worker
