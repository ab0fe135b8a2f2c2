"""Command line: ``napari-mixcoef fit`` and ``napari-mixcoef demo``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from .core import MODELS

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
    fit.add_argument('stack', metavar='STACK')
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
        help='also write the residual stack (.npy/.tif/.zarr)',
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


def _run_fit(args: argparse.Namespace) -> None:
    from . import _io
    from .core import fit_stack, residuals

    ref1 = _io.read_image(args.ref1)
    ref2 = _io.read_image(args.ref2)
    mask = _io.read_image(args.mask) if args.mask else None
    with _io.opened(args.stack) as stack:
        fit = fit_stack(
            stack,
            ref1,
            ref2,
            model=args.model,
            mask=mask,
            progress=_ProgressBar('fitting'),
        )
        fit.to_csv(args.csv)
        if args.residual:
            _io.write_stack(
                residuals(stack, ref1, ref2, fit),
                args.residual,
                progress=_ProgressBar('residual'),
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (2 on bad input)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == 'fit':
            _run_fit(args)
        else:
            from ._demo import run_demo

            return run_demo(screenshot=args.screenshot)
    except (ValueError, TypeError, OSError) as err:
        message = str(err).splitlines()[0] if str(err) else repr(err)
        print(f'{PROG}: error: {message}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
