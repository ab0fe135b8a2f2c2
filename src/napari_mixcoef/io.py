"""Files for the command line: .npy, .tif/.tiff and .zarr, read lazily.

Also what both faces (command line and napari) say about what went wrong
in words of their own: :func:`reword` for the engine's messages, which
speak Python (``ref1``, ``mask=``), :func:`describe_os_error` for a failed
write.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

SUFFIXES = ('.npy', '.tif', '.tiff', '.zarr')


def reword(message: str, words: dict[str, str], *, nan_advice: str) -> str:
    """Say an engine error in a face's words.

    Parameters
    ----------
    message : str
        The engine's message (it names Python arguments: ``ref1``,
        ``ref2``, ``mask=``, ``model="scaled"``).
    words : dict of str to str
        What the face calls each: ``{"ref1": "--ref1", "mask=": "--mask"}``.
        ``model=`` stands for every ``model="name"``, with ``{}`` for the
        name (``"--model {}"``).
    nan_advice : str
        Replaces the engine's advice (which names numpy functions) after a
        message about NaN or infinite values.

    Returns
    -------
    str
        One line.
    """
    text = ' '.join(message.split())
    if 'NaN' in text:
        text = text.split(';')[0].rstrip('. ') + '; ' + nan_advice
    model = words.get('model=')
    if model is not None:
        text = re.sub(r'model="(\w+)"', lambda m: model.format(m[1]), text)
    for python, face in words.items():
        if python != 'model=':
            text = re.sub(rf'\b{re.escape(python)}(?![\w(])', face, text)
    return text


def describe_os_error(err: OSError, path: str | os.PathLike) -> str:
    """Say in words why reading or writing `path` failed (no ``[Errno]``).

    Parameters
    ----------
    err : OSError
        What the read or write raised.
    path : str or path-like
        The file.

    Returns
    -------
    str
        ``"fit.csv": the folder "/data/x" does not exist``.
    """
    name = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(name))
    if isinstance(err, IsADirectoryError):
        why = 'that is a folder; give a file name'
    elif isinstance(err, FileNotFoundError) and not os.path.isdir(folder):
        why = f'the folder "{folder}" does not exist'
    elif isinstance(err, PermissionError):
        why = f'no permission to write in "{folder}"'
    elif err.errno == errno.ENOSPC:
        why = 'the disk is full'
    elif err.errno == errno.EROFS:
        why = 'the disk is read-only'
    else:
        why = (err.strerror or str(err) or type(err).__name__).lower()
    return f'"{os.path.basename(name) or name}": {why}'


def check_output(
    path: str | os.PathLike, suffixes: tuple[str, ...], *, what: str
) -> None:
    """Raise ValueError if `path` cannot be written, before any work.

    Parameters
    ----------
    path : str or path-like
        The output file to be.
    suffixes : tuple of str
        Allowed suffixes, lower case with the dot.
    what : str
        How the user named it (``"--csv"``), for the message.

    Raises
    ------
    ValueError
        Wrong suffix, a folder that does not exist or cannot be written,
        or a path that is a folder.
    """
    name = os.fspath(path)
    suffix = Path(name).suffix.lower()
    if suffix not in suffixes:
        kind = suffix or 'a file without a suffix'
        raise ValueError(
            f'{what} {name}: cannot write {kind}; give a name ending in '
            + ' or '.join(suffixes)
        )
    folder = os.path.dirname(os.path.abspath(name))
    if os.path.isdir(name) and suffix != '.zarr':
        raise ValueError(f'{what} {name}: that is a folder; give a file name')
    if not os.path.isdir(folder):
        raise ValueError(
            f'{what} {name}: the folder "{folder}" does not exist'
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(
            f'{what} {name}: no permission to write in "{folder}"'
        )


def _suffix(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(
            f'{os.fspath(path)!r}: unsupported file type {suffix or "(none)"}'
            f'; use one of {", ".join(SUFFIXES)}'
        )
    return suffix


@contextlib.contextmanager
def opened(path: str | os.PathLike) -> Iterator:
    """Open an image file as an array without reading it into memory.

    Parameters
    ----------
    path : str or path-like
        A ``.npy`` file (memory-mapped), a TIFF (memory-mapped when its
        pages are stored plainly, else read page by page through tifffile's
        zarr store) or a ``.zarr`` array (or a group holding one array).

    Yields
    ------
    array_like
        numpy memmap or zarr array with ``shape`` and ``dtype``; files the
        reader opened are closed when the context ends.

    Raises
    ------
    ValueError
        Missing or unreadable file, unsupported type, or a zarr group that
        does not hold exactly one array.
    """
    suffix = _suffix(path)
    name = os.fspath(path)
    if not os.path.exists(name):
        raise ValueError(f'{name!r} does not exist')
    with contextlib.ExitStack() as files:
        try:
            if suffix == '.npy':
                array = np.load(name, mmap_mode='r', allow_pickle=False)
            elif suffix in ('.tif', '.tiff'):
                array = _open_tiff(name, files)
            else:
                array = _open_zarr(name)
        except ValueError:
            raise
        except Exception as err:  # readers raise many types; CLI wants one
            raise ValueError(f'cannot read {name!r}: {err}') from err
        yield array


def _open_tiff(name: str, files: contextlib.ExitStack):
    import tifffile

    try:
        return tifffile.memmap(name, mode='r')
    except ValueError:  # compressed or tiled: read through the zarr store
        import zarr

        tif = files.enter_context(tifffile.TiffFile(name))
        store = files.enter_context(tif.aszarr())
        return zarr.open(store, mode='r')


def _open_zarr(name: str):
    node = _open_zarr_node(name)
    if hasattr(node, 'shape'):
        return node
    arrays = list(node.arrays())
    if len(arrays) != 1:
        raise ValueError(
            f'{name!r} is a zarr group with {len(arrays)} arrays; give the '
            'path of the array itself (e.g. data.zarr/0)'
        )
    return arrays[0][1]


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a small image (a reference or a mask) fully into memory."""
    with opened(path) as array:
        return np.asarray(array[...])


def write_stack(
    stack,
    path: str | os.PathLike,
    *,
    slices_per_block: int = 16,
    progress: Callable[[int, int], object] | None = None,
) -> None:
    """Write an array-like to ``.npy``, ``.tif`` or ``.zarr``, streaming.

    Parameters
    ----------
    stack : (*lead, Y, X) array_like
        Read ``slices_per_block`` slices of the first axis at a time (e.g.
        a lazy residual stack), so memory stays bounded.
    path : str or path-like
        Output file; its suffix picks the format.
    progress : callable, optional
        ``progress(done, total)`` over the first axis.
    """
    suffix = _suffix(path)
    name = os.fspath(path)
    shape = tuple(stack.shape)
    dtype = np.dtype(stack.dtype)
    n = shape[0] if shape else 1
    blocks = [
        (i, min(i + slices_per_block, n))
        for i in range(0, n, slices_per_block)
    ]
    if suffix == '.npy':
        out = np.lib.format.open_memmap(
            name, mode='w+', dtype=dtype, shape=shape
        )
        for i, j in blocks:
            out[i:j] = stack[i:j]
            if progress:
                progress(j, n)
        out.flush()
        del out
    elif suffix == '.zarr':
        import zarr

        out = zarr.create_array(
            store=name,
            shape=shape,
            dtype=dtype,
            overwrite=True,
            chunks=(min(slices_per_block, n), *shape[1:]),
        )
        for i, j in blocks:
            out[i:j] = np.asarray(stack[i:j])
            if progress:
                progress(j, n)
    else:
        import tifffile

        plane = shape[-2:]

        def pages():
            for i, j in blocks:
                block = np.asarray(stack[i:j], dtype=dtype)
                yield from block.reshape((-1, *plane))
                if progress:
                    progress(j, n)

        big = math.prod(shape) * dtype.itemsize > 2**31
        tifffile.imwrite(name, pages(), shape=shape, dtype=dtype, bigtiff=big)


class FileArray:
    """A stack file opened afresh on each read; pickles as its path only.

    For a dask.distributed cluster: the workers read their own blocks from
    the file instead of receiving the data from the client.  It needs a
    path the workers can see (a shared file system, or a local cluster).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with opened(self.path) as array:
            self.shape = tuple(array.shape)
            self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key) -> np.ndarray:
        with opened(self.path) as array:
            return np.asarray(array[key])


def open_dask(path: str | os.PathLike, *, chunk_bytes: int = 32 << 20):
    """Open a stack file as a dask array that a cluster can read itself.

    Parameters
    ----------
    path : str or path-like
        ``.npy``, ``.tif/.tiff`` or ``.zarr``.
    chunk_bytes : int
        Target size of a block along the first axis (zarr keeps its own
        chunks).

    Returns
    -------
    dask.array.Array
        Lazy; its tasks open the file by path.
    """
    import dask.array as da

    name = os.fspath(path)
    if _suffix(name) == '.zarr':
        with opened(name):  # checks the path: one array, readable
            pass
        node = _open_zarr_node(name)
        component = (
            None if hasattr(node, 'shape') else next(iter(node.array_keys()))
        )
        return da.from_zarr(name, component=component)
    lazy = FileArray(name)
    slice_bytes = max(1, math.prod(lazy.shape[1:]) * lazy.dtype.itemsize)
    rows = max(1, chunk_bytes // slice_bytes)
    chunks = (rows,) + lazy.shape[1:] if lazy.shape else ()
    return da.from_array(lazy, chunks=chunks, asarray=True, name=False)


def _open_zarr_node(name: str):
    import zarr

    return zarr.open(name, mode='r')
