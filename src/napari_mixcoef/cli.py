"""Command line: ``napari-mixcoef fit`` and ``napari-mixcoef demo``."""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from .core import MODELS, NOISE_MODELS, STDERR_MODES

PROG = 'napari-mixcoef'


class _ProgressBar:
    """A one-line progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, label: str, stream=None):
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        frac = done / total if total else 1.0
        bar = '#' * int(30 * frac)
        self.stream.write(
            f'\r{self.label} [{bar:<30}] {frac:6.1%} ({done}/{total})'
        )
        if done >= total:
            self.stream.write('\n')
        self.stream.flush()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description='Per-slice mixing coefficients of an image stack '
        'against two reference images.',
    )
    sub = parser.add_subparsers(dest='command', required=True)
    fit = sub.add_parser(
        'fit',
        help='fit every slice of a stack and write a CSV',
        description='Fit every slice of STACK as x·R1 + (1−x)·R2 (or a '
        'free combination) and write one CSV row per slice. STACK, R1, R2 '
        'and M are .npy, .tif/.tiff or .zarr files.',
    )
    fit.add_argument(
        'stacks',
        nargs='+',
        metavar='STACK',
        help='stack file(s); a glob pattern (quoted) fits every match into '
        'one CSV with a "file" column',
    )
    fit.add_argument('--ref1', required=True, metavar='R1')
    fit.add_argument('--ref2', required=True, metavar='R2')
    fit.add_argument('--model', choices=list(MODELS), default='mix')
    fit.add_argument(
        '--mask', metavar='M', help='only nonzero pixels of M are fitted'
    )
    fit.add_argument('--csv', required=True, metavar='OUT.csv')
    fit.add_argument(
        '--residual',
        metavar='OUT',
        help='also write the residual stack (.npy/.tif/.zarr); one stack only',
    )
    stats = fit.add_argument_group('statistics')
    stats.add_argument(
        '--noise',
        choices=NOISE_MODELS,
        default='gaussian',
        help='noise model (default: gaussian, i.e. least squares)',
    )
    stats.add_argument(
        '--gain', type=float, default=1.0, help='counts per photon (poisson)'
    )
    stats.add_argument(
        '--camera-offset',
        type=float,
        default=0.0,
        help='counts at zero light (poisson)',
    )
    stats.add_argument(
        '--read-noise',
        type=float,
        default=0.0,
        help='read noise in photons rms (poisson)',
    )
    stats.add_argument(
        '--stderr',
        choices=STDERR_MODES,
        default='auto',
        help='auto: robust to unequal and correlated noise '
        '(default); ols: textbook',
    )
    fit.add_argument(
        '--scheduler',
        metavar='ADDRESS',
        help='run on an existing dask.distributed cluster (its workers '
        'must see the files)',
    )
    demo = sub.add_parser(
        'demo',
        help='open napari with the sample data and run the fit',
        description='Open napari with the sample mixture, dock the widget, '
        'run the fit and show the coefficient plot.',
    )
    demo.add_argument(
        '--screenshot',
        metavar='OUT.png',
        help='save a screenshot of the window and exit',
    )
    return parser


def _expand(patterns: Sequence[str]) -> tuple[list[str], bool]:
    """Files named by the STACK arguments, and whether it is a batch."""
    files: list[str] = []
    batch = len(patterns) > 1
    for pattern in patterns:
        if glob.has_magic(pattern):
            batch = True
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise ValueError(f'no file matches {pattern!r}')
            files += matches
        else:
            files.append(pattern)
    return files, batch


def _run_fit(args: argparse.Namespace) -> int:
    from . import io as _io
    from .core import fit_stack, residuals, write_csv

    files, batch = _expand(args.stacks)
    if batch and args.residual:
        raise ValueError('--residual needs a single stack, not a batch')
    ref1 = _io.read_image(args.ref1)
    ref2 = _io.read_image(args.ref2)
    mask = _io.read_image(args.mask) if args.mask else None
    client = None
    if args.scheduler:
        try:
            from distributed import Client
        except ImportError as err:
            raise ValueError(
                '--scheduler needs dask.distributed: pip install '
                '"napari-mixcoef[cluster]"'
            ) from err
        client = Client(args.scheduler, timeout='10s')
    try:
        tables, failed = [], 0
        for path in files:
            label = os.path.basename(path) if batch else 'fitting'
            try:
                with contextlib.ExitStack() as files_open:
                    if client is not None:
                        stack = _io.open_dask(path)
                    else:
                        stack = files_open.enter_context(_io.opened(path))
                    fit = fit_stack(
                        stack,
                        ref1,
                        ref2,
                        model=args.model,
                        mask=mask,
                        progress=_ProgressBar(label),
                        noise=args.noise,
                        gain=args.gain,
                        camera_offset=args.camera_offset,
                        read_noise=args.read_noise,
                        stderr=args.stderr,
                    )
                    if args.residual:
                        _io.write_stack(
                            residuals(stack, ref1, ref2, fit),
                            args.residual,
                            progress=_ProgressBar('residual'),
                        )
            except (ValueError, TypeError, OSError) as err:
                if not batch:
                    raise
                failed += 1
                _report(f'{path}: {err}')
                continue
            tables.append((path, fit.table()))
        if not tables:
            raise ValueError(
                f'none of the {len(files)} stacks could be fitted'
            )
        if batch:
            write_csv(args.csv, _concat(tables))
        else:
            write_csv(args.csv, tables[0][1])
    finally:
        if client is not None:
            client.close()
    return 1 if failed else 0


def _concat(tables) -> dict[str, np.ndarray]:
    """One table with a leading "file" column from per-file tables."""
    names = ['file']
    for _, table in tables:
        names += [n for n in table if n not in names]
    out = {}
    for name in names:
        parts = []
        for path, table in tables:
            n = len(next(iter(table.values())))
            if name == 'file':
                parts.append(np.full(n, path, dtype=object))
            elif name in table:
                parts.append(table[name].astype(object))
            else:  # another file had more leading dimensions
                parts.append(np.full(n, '', dtype=object))
        out[name] = np.concatenate(parts) if parts else np.array([])
    return out


def _report(message: str) -> None:
    message = message.splitlines()[0] if message else 'failed'
    print(f'{PROG}: error: {message}', file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (2 on bad input)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == 'fit':
            return _run_fit(args)
        from ._qt.demo import run_demo

        return run_demo(screenshot=args.screenshot)
    except (ValueError, TypeError, OSError) as err:
        _report(str(err) or repr(err))
        return 2


if __name__ == '__main__':
    sys.exit(main())
