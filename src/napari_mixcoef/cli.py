"""Command line: ``napari-mixcoef fit`` and ``napari-mixcoef demo``."""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import shutil
import sys
import time
from collections.abc import Sequence

import numpy as np

from . import CONSTRAINTS, MODELS, NOISE_MODELS, STDERR_MODES
from .io import SUFFIXES, check_output, describe_os_error, reword

PROG = 'napari-mixcoef'
#: The engine's Python words, as the command line says them.
_WORDS = {
    'ref1': '--ref1',
    'ref2': '--ref2',
    'mask=': '--mask',
    'model=': '--model {}',
    'reference_diagnostics()': 'the reference diagnostics',
}
_NAN_ADVICE = (
    'give a --mask file that is 0 on those pixels and 1 on the good ones'
)


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
        'against two or more reference images.',
    )
    sub = parser.add_subparsers(dest='command', required=True)
    fit = sub.add_parser(
        'fit',
        help='fit every slice of a stack and write a CSV',
        description='Fit every slice of STACK as a mix of the references '
        '(x·R1 + (1−x)·R2 for two; x1·R1 + … + xK·RK with Σx = 1 for K, or '
        'a free combination) and write one CSV row per slice. Give the '
        'references as --ref R1 --ref R2 [--ref R3 …] or as --ref1 R1 '
        '--ref2 R2. STACK, the references and M are .npy, .tif/.tiff or '
        '.zarr files. Non-finite pixels (NaN, inf) of a slice are left out '
        'of its fit and counted.',
    )
    fit.add_argument(
        'stacks',
        nargs='+',
        metavar='STACK',
        help='stack file(s); a glob pattern (quoted) fits every match into '
        'one CSV with a "file" column',
    )
    fit.add_argument(
        '--ref',
        action='append',
        dest='refs',
        metavar='R',
        help='a reference image (the shape of one slice); repeat it for '
        "each reference, in order (2 to any number; the first one's share "
        'is x)',
    )
    fit.add_argument(
        '--ref1',
        metavar='R1',
        help='reference image A (the shape of one slice); x is its share '
        '(the same as the first --ref; not with --ref)',
    )
    fit.add_argument(
        '--ref2',
        metavar='R2',
        help='reference image B, the same shape as R1 (with --ref1)',
    )
    fit.add_argument(
        '--model',
        choices=list(MODELS),
        default='mix',
        help='mix: x·R1 + (1−x)·R2, or Σ xk·Rk with Σ xk = 1 (default); '
        'scaled: a·R1 + b·R2 (Σ ak·Rk); offset: a·R1 + b·R2 + c',
    )
    fit.add_argument(
        '--constraint',
        choices=CONSTRAINTS,
        help='nonneg: every share ≥ 0 (mix: non-negative and summing to 1; '
        'scaled/offset: each a ≥ 0, c free), the exact constrained fit of '
        'each slice; the CSV gets an at_bound column (default: '
        'unconstrained)',
    )
    fit.add_argument(
        '--register',
        choices=('translation',),
        help="translation: estimate each slice's sub-pixel shift together "
        'with its mix (the stack is not changed); the CSV gets shift_0, '
        'shift_1, … and their errors (default: no registration)',
    )
    fit.add_argument(
        '--mask', metavar='M', help='only nonzero pixels of M are fitted'
    )
    fit.add_argument(
        '--csv',
        required=True,
        metavar='OUT.csv',
        help='the table to write, one row per slice; what was fitted goes '
        'to OUT.json beside it',
    )
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
        help='save a screenshot of the window and exit; without a display, '
        'runs on a virtual one (needs Xvfb)',
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


def _check_outputs(args: argparse.Namespace, batch: bool) -> None:
    """Refuse output paths that cannot be written, before any reading."""
    check_output(args.csv, ('.csv',), what='--csv')
    if args.residual:
        if batch:
            raise ValueError('--residual needs a single stack, not a batch')
        check_output(args.residual, SUFFIXES, what='--residual')


def _run_fit(args: argparse.Namespace) -> int:
    from . import fit_stack, residuals
    from . import io as _io
    from .core import write_csv

    ref_files = _reference_files(args)
    files, batch = _expand(args.stacks)
    _check_outputs(args, batch)
    options = _fit_options(args)
    refs = [_io.read_image(path) for path in ref_files]
    mask = _io.read_image(args.mask) if args.mask else None
    names = {
        'references': ref_files,
        'mask': args.mask,
    }
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
        fits, failed = [], 0
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
                        *refs,
                        mask=mask,
                        progress=_ProgressBar(label),
                        **options,
                    )
                    if args.residual:
                        _io.write_stack(
                            residuals(stack, *refs, fit),
                            args.residual,
                            progress=_ProgressBar('residual'),
                        )
                _same_columns(fits, fit)
            except (ValueError, TypeError, OSError) as err:
                if not batch:
                    raise
                failed += 1
                _report(f'{path}: {_words(err, path)}')
                continue
            fits.append((path, fit))
        if not fits:
            raise ValueError(
                f'none of the {len(files)} stacks could be fitted'
            )
        if batch:
            write_csv(
                args.csv,
                _concat(fits),
                provenance=_batch_provenance(fits, names),
            )
        else:
            fits[0][1].to_csv(
                args.csv, provenance={'stack': files[0], **names}
            )
    finally:
        if client is not None:
            client.close()
    print(_summary(fits, failed, args))
    return 1 if failed else 0


def _reference_files(args: argparse.Namespace) -> list[str]:
    """Return the reference files in order (--ref, or --ref1/--ref2)."""
    pair = [r for r in (args.ref1, args.ref2) if r is not None]
    if args.refs and pair:
        raise ValueError(
            'give the references either as --ref R1 --ref R2 [--ref R3 …] '
            'or as --ref1 R1 --ref2 R2, not both'
        )
    if args.refs:
        return list(args.refs)
    if len(pair) == 2:
        return pair
    if pair:
        missing = '--ref2' if args.ref1 is not None else '--ref1'
        raise ValueError(
            f'{missing} is missing: give both --ref1 and --ref2 (or --ref '
            'once for each reference)'
        )
    raise ValueError(
        'no references: give --ref R1 --ref R2 [--ref R3 …] (or --ref1 R1 '
        '--ref2 R2)'
    )


def _fit_options(args: argparse.Namespace) -> dict:
    """Return the keyword arguments of fit_stack the options set."""
    return {
        'model': args.model,
        'noise': args.noise,
        'gain': args.gain,
        'camera_offset': args.camera_offset,
        'read_noise': args.read_noise,
        'stderr': args.stderr,
        'constraint': args.constraint,
        # a NaN pixel (dead, stitched border) is left out of its slice and
        # counted in the summary, not the end of the run
        'nan_policy': 'omit',
        'register': args.register,
    }


def _same_columns(fits, fit) -> None:
    """Refuse a batch file whose table has other index columns."""
    if fits and len(fits[0][1].lead_shape) != len(fit.lead_shape):
        first, other = fits[0]
        raise ValueError(
            f'it has {len(fit.lead_shape)} slice axes but {first} has '
            f'{len(other.lead_shape)}: one CSV needs one set of index '
            'columns; fit it on its own'
        )


def _concat(fits) -> dict[str, np.ndarray]:
    """Stack the single-file tables of the fits after a "file" column."""
    tables = [(path, fit.table()) for path, fit in fits]
    out = {
        'file': np.concatenate(
            [np.full(len(t['x']), path) for path, t in tables]
        )
    }
    for name in tables[0][1]:
        out[name] = np.concatenate([t[name] for _, t in tables])
    return out


def _batch_provenance(fits, names: dict) -> dict:
    """One fit's provenance (all share it), with each file's slices."""
    info = fits[0][1].provenance()
    info.pop('lead_shape', None)
    info['files'] = [
        {'stack': path, 'lead_shape': list(fit.lead_shape)}
        for path, fit in fits
    ]
    return {**info, **names}


def _summary(fits, failed: int, args: argparse.Namespace) -> str:
    """Say in a line what was fitted, the median x, what went where."""
    x = np.concatenate([fit.x.ravel() for _, fit in fits])
    n = x.size
    what = (
        f'{n} slice{"s" if n != 1 else ""} of {fits[0][0]}'
        if len(fits) == 1 and not failed
        else f'{n} slices in {len(fits)} files ({failed} failed)'
    )
    first = fits[0][1]
    k = first.n_references
    how = f'{k} reference{"s" if k != 1 else ""}'
    if first.constraint is not None:
        bound = sum(int(np.count_nonzero(f.at_bound)) for _, f in fits)
        how += f', {first.constraint} ({bound} at a bound)'
    if first.register:
        how += f', registered ({first.register})'
    what += f' with {how}'
    if not np.isfinite(x).any():
        median = 'no finite x'
    elif k <= 2:
        median = f'median x = {np.nanmedian(x):.4f}'
    else:
        shares = np.concatenate(
            [f.fractions.reshape(-1, k) for _, f in fits], axis=0
        )
        median = 'median shares = ' + '/'.join(
            f'{m:.4f}' for m in np.nanmedian(shares, axis=0)
        )
    omitted = [f.n_omitted for _, f in fits if f.n_omitted is not None]
    pixels = sum(int(o.sum()) for o in omitted)
    if pixels:
        slices = sum(int(np.count_nonzero(o)) for o in omitted)
        median += (
            f'; {pixels} pixel{"s" if pixels != 1 else ""} in {slices} '
            f'slice{"s" if slices != 1 else ""} left out (NaN or inf)'
        )
    # to_csv and write_csv put the provenance at the CSV's name, .json
    json = os.path.splitext(args.csv)[0] + '.json'
    wrote = f'wrote {args.csv} and {json}'
    if args.residual:
        wrote += f', residual {args.residual}'
    return f'{PROG}: fitted {what}, {median}; {wrote}'


def _words(err: BaseException, path: str | None = None) -> str:
    """Say an error in the command line's words, in one line."""
    if isinstance(err, OSError) and (err.filename or path):
        return describe_os_error(err, err.filename or path)
    text = str(err) or repr(err)
    return reword(text, _WORDS, nan_advice=_NAN_ADVICE)


def _report(message: str) -> None:
    message = message.splitlines()[0] if message else 'failed'
    print(f'{PROG}: error: {message}', file=sys.stderr)


def _has_display() -> bool:
    return bool(os.environ.get('DISPLAY') or os.environ.get('WAYLAND_DISPLAY'))


def _run_demo(args: argparse.Namespace) -> int:
    """Open the demo; without a display, save it from a virtual one."""
    if args.screenshot:
        check_output(args.screenshot, ('.png',), what='--screenshot')
    if _has_display():
        from ._qt.demo import run_demo

        return run_demo(screenshot=args.screenshot)
    if not args.screenshot:
        raise ValueError(
            'no display to open napari on; add --screenshot OUT.png to run '
            'on a virtual display and save the window'
        )
    try:
        from pyvirtualdisplay import Display
    except ImportError:
        Display = None
    if Display is None:
        if shutil.which('xvfb-run') is None:
            raise ValueError(_NO_XVFB)
        # a virtual display for this same command, which then has one
        os.execvp(
            'xvfb-run',
            [
                'xvfb-run',
                '-a',
                '-s',
                '-screen 0 1600x1000x24',
                sys.executable,
                '-m',
                'napari_mixcoef.cli',
                'demo',
                '--screenshot',
                args.screenshot,
            ],
        )
    try:
        display = Display(visible=False, size=(1600, 1000)).start()
    except Exception as err:  # its errors name neither Xvfb nor a fix
        raise ValueError(_NO_XVFB) from err
    try:
        from ._qt.demo import run_demo

        return run_demo(screenshot=args.screenshot)
    finally:
        display.stop()


_NO_XVFB = (
    'no display, and no virtual one could be started: install Xvfb (e.g. '
    '"sudo apt install xvfb") or run on a desktop'
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (2 on bad input)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == 'fit':
            return _run_fit(args)
        return _run_demo(args)
    except (ValueError, TypeError, OSError) as err:
        _report(_words(err))
        return 2


if __name__ == '__main__':
    sys.exit(main())
