"""Benchmark of ``napari_mixcoef.fit_stack``.

Run ``python benchmarks/bench_fit.py [--quick] [--profile]`` from the
repository root.  Everything is measured in one process and reported as
ratios of times taken in that process (best of several interleaved runs),
because absolute times on a small shared machine drift from run to run.

Sections
--------
(a) Seed case: thousands of small float64 images with Poisson noise.
    ``fit_stack`` (full statistics) against the approaches of the seed
    question -- a per-image ``scipy.linalg.lstsq`` loop and a per-image
    ``scipy.optimize.fsolve`` on an RMSE loss, both timed on a subset and
    scaled linearly -- and scikit-learn's multi-target
    ``LinearRegression`` (x only, no standard errors).
(b) Large stacks (2000 x 256 x 256) in float32 and uint16: ``fit_stack``
    time divided by the *one-read floor*, the best time of one float32
    matrix-vector product over the whole float32 stack (OpenBLAS GEMV on
    every core), i.e. the cost of reading the stack once.
(c) Peak extra memory of ``fit_stack`` (tracemalloc, which sees numpy's
    allocations), for the large stack and for a quarter of it.
(e) K references (2000 x 256 x 256 float32 and uint16): the default fit
    (robust errors) of K = 2, 4, 8 references over the one-read floor, and
    the constrained fit over the unconstrained one for K = 4.

``--profile`` adds a breakdown of ``fit_stack`` on the stacks of (b)
(float32, uint16) and (a) (float64): each backend's block sums over every
block in one thread, fit_stack itself, the design's set-up and the fit's
settings, the threading gain; then fit_stack / floor for chunk_bytes from
256 KiB to 4 MiB.  The breakdown uses the engine's layers (and is skipped
on a package without them).

A 2-core capacity probe (two threads vs one on a cache-resident ufunc)
runs at the start, between sections and at the end; below 1.4 another
process was using the second core and the two-thread figures are
unreliable (the script then prints a warning).
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import platform
import sys
import time
import tracemalloc
import warnings
from collections.abc import Callable

import numpy as np
import scipy
import threadpoolctl
from scipy import linalg
from scipy.optimize import fsolve

import napari_mixcoef
from napari_mixcoef import fit_stack

# Targets: (limit, stretch limit).  Ratios to the floor must stay below
# the limit; speed-ups must reach it; memory is in MB.  These are the
# scale issue's (the core issue asked for 5x and 25x).
FLOOR_TARGET = (2.5, 1.5)
SPEEDUP_TARGET = (60.0, 250.0)
MEMORY_TARGET_MB = 32.0
# Below this 2-core capacity another process had the second core.  An idle
# 2-vCPU VM reads about 1.6-1.9, a fully busy second core about 1.0.
CAPACITY_WARN = 1.4
#: Pause before each timed call (see best_times).
SETTLE = 0.2

BIG_SHAPE = (256, 256)
SMALL_SHAPE = (64, 64)

_rows: list[tuple[str, ...]] = []
_capacity_log: list[float] = []  # every 2-core capacity reading


# --------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------- #


def numpy_fit(stack, *references, **kwargs) -> Callable[[], object]:
    """A fit on the numpy backend instead of the compiled one.

    ``fit_stack(..., backend="numpy")`` where the package has it (the
    layered engine), else the older ``NAPARI_MIXCOEF_KERNEL`` switch, so
    that this script times the versions before and after it alike.
    """
    if 'backend' in inspect.signature(fit_stack).parameters:
        return lambda: fit_stack(stack, *references, backend='numpy', **kwargs)

    def run():
        os.environ['NAPARI_MIXCOEF_KERNEL'] = 'numpy'
        try:
            return fit_stack(stack, *references, **kwargs)
        finally:
            del os.environ['NAPARI_MIXCOEF_KERNEL']

    return run


def best_times(
    funcs: dict[str, Callable[[], object]],
    repeat: int,
    self_timed: frozenset[str] = frozenset(),
) -> dict[str, float]:
    """Best wall time of each callable, after one warm-up call each.

    The callables run interleaved (a, b, c, a, b, c, ...) so that a burst
    of load from another process hits all of them alike.  Each starts
    after a pause of SETTLE seconds: after a multi-threaded BLAS call (the
    floor's GEMV) OpenBLAS's idle threads spin for ~0.1 s and would take
    the cores from whatever runs next.  Callables named in `self_timed`
    return their own duration in seconds instead.
    """
    for f in funcs.values():
        f()
    best = dict.fromkeys(funcs, math.inf)
    for _ in range(repeat):
        for name, f in funcs.items():
            time.sleep(SETTLE)
            t0 = time.perf_counter()
            out = f()
            dt = time.perf_counter() - t0
            if name in self_timed:
                dt = float(out)
            best[name] = min(best[name], dt)
    return best


def fmt_time(seconds: float) -> str:
    """Format a duration with a unit that keeps 3 significant digits."""
    if abs(seconds) >= 1.0:
        return f'{seconds:.3g} s'
    if abs(seconds) >= 1e-3:
        return f'{seconds * 1e3:.3g} ms'
    return f'{seconds * 1e6:.3g} us'


def verdict(ok: bool) -> str:
    return 'PASS' if ok else 'FAIL'


def record(
    metric: str,
    value: float,
    unit: str,
    target: tuple[float, float | None] | None,
    higher_is_better: bool,
) -> None:
    """Add one row to the summary table printed at the end."""
    row = [metric, f'{value:.3g}{unit}']
    for limit in target or (None, None):
        if limit is None:
            row += ['-', '-']
            continue
        op = '>=' if higher_is_better else '<='
        ok = value >= limit if higher_is_better else value <= limit
        row += [f'{op} {limit:g}{unit}', verdict(ok)]
    _rows.append(tuple(row))


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]):
    widths = [
        max(len(str(r[i])) for r in [header, *rows])
        for i in range(len(header))
    ]
    line = '  '.join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    print(line)
    print('-' * len(line))
    for r in rows:
        print(
            '  '.join(str(c).ljust(w) for c, w in zip(r, widths, strict=True))
        )


def section(title: str) -> None:
    print()
    print(f'== {title} ==')


def blob_image(rng: np.random.Generator, shape, n_blobs: int) -> np.ndarray:
    """A positive float64 image: a gradient plus Gaussian blobs."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = 200.0 + 100.0 * rng.random() * (xx / w) + 50.0 * (yy / h)
    for _ in range(n_blobs):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        s = rng.uniform(0.04, 0.15) * max(h, w)
        amp = rng.uniform(300.0, 1500.0)
        img += amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    return img


def references(seed: int, shape) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return blob_image(rng, shape, 8), blob_image(rng, shape, 8)


def print_environment() -> None:
    print('napari-mixcoef fit_stack benchmark')
    print(
        f'python {platform.python_version()}, numpy {np.__version__}, '
        f'scipy {scipy.__version__}, '
        f'napari_mixcoef {napari_mixcoef.__version__}'
    )
    print(
        f'{platform.machine()}, os.cpu_count() = {os.cpu_count()}, '
        f'load average {os.getloadavg()[0]:.2f}'
    )
    env = [
        f'{k}={os.environ[k]}'
        for k in (
            'OPENBLAS_CORETYPE',
            'OPENBLAS_NUM_THREADS',
            'OMP_NUM_THREADS',
            'MKL_NUM_THREADS',
        )
        if k in os.environ
    ]
    print('thread env: ' + (', '.join(env) if env else '(none set)'))
    print('thread pools (threadpoolctl):')
    for info in threadpoolctl.threadpool_info():
        extra = ''
        if info.get('architecture'):
            extra = f', arch {info["architecture"]}'
        if info.get('threading_layer'):
            extra += f', {info["threading_layer"]}'
        print(
            f'  {info["user_api"]:6s} {info["internal_api"]:9s} '
            f'{info["num_threads"]} threads, '
            f'version {info.get("version")}{extra}  '
            f'[{os.path.basename(info["filepath"])}]'
        )


# --------------------------------------------------------------------- #
# (a) seed case
# --------------------------------------------------------------------- #


def lstsq_loop(stack, ref1, ref2) -> np.ndarray:
    """The seed's solution 2, once per image: x (and the seed's R²)."""
    a = (ref1 - ref2).reshape(-1, 1)
    x = np.empty(len(stack))
    for i, image in enumerate(stack):
        b = (image - ref2).reshape(-1, 1)
        coef, res, _, _ = linalg.lstsq(a, b)
        x[i] = coef[0, 0]
        _r2 = 1 - res / np.power(b, 2).sum()  # noqa: F841 (as the seed)
    return x


def fsolve_loop(stack, ref1, ref2) -> np.ndarray:
    """The seed's solution 1: fsolve on the RMSE loss, once per image."""
    x = np.empty(len(stack))
    for i, image in enumerate(stack):

        def rmse_loss(v, image=image):
            estimation = v * ref1 + (1 - v) * ref2
            return np.sqrt(np.sum(np.power(image - estimation, 2)))

        # The loss has no root, so fsolve always ends with "not making
        # good progress"; silence that warning as a user would.
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', RuntimeWarning)
            x[i] = fsolve(rmse_loss, x0=0)[0]
    return x


def sklearn_fit(stack, ref1, ref2):
    """Multi-target LinearRegression: Y is (pixels, images)."""
    from sklearn.linear_model import LinearRegression

    n = len(stack)
    design = (ref1 - ref2).reshape(-1, 1)
    y = (stack - ref2).reshape(n, -1).T  # (P, N): the subtraction copies
    reg = LinearRegression(fit_intercept=False).fit(design, y)
    return reg.coef_[:, 0]


def bench_seed(n_images: int, n_lstsq: int, n_fsolve: int, repeat: int):
    section(
        f'(a) seed case: {n_images} images {SMALL_SHAPE[0]}x'
        f'{SMALL_SHAPE[1]} float64, Poisson noise, x ~ U(0.4, 0.7)'
    )
    ref1, ref2 = references(1, SMALL_SHAPE)
    rng = np.random.default_rng(2)
    x_true = rng.uniform(0.4, 0.7, n_images)
    xs = x_true[:, None, None]
    stack = rng.poisson(xs * ref1 + (1 - xs) * ref2).astype(np.float64)
    sub_l, sub_f = stack[:n_lstsq], stack[:n_fsolve]
    flat = stack.reshape(n_images, -1)
    d = np.ones(flat.shape[1])

    funcs: dict[str, Callable[[], object]] = {
        'floor': lambda: flat @ d,
        'fit_stack': lambda: fit_stack(stack, ref1, ref2),
        'fit_stack_ols': lambda: fit_stack(stack, ref1, ref2, stderr='ols'),
        'fit_stack_numpy': numpy_fit(stack, ref1, ref2),
        'lstsq': lambda: lstsq_loop(sub_l, ref1, ref2),
        'fsolve': lambda: fsolve_loop(sub_f, ref1, ref2),
    }
    try:
        import sklearn  # noqa: F401

        funcs['sklearn'] = lambda: sklearn_fit(stack, ref1, ref2)
        have_sklearn = True
    except ImportError:
        have_sklearn = False
    t = best_times(funcs, repeat)
    full = {
        'fit_stack': t['fit_stack'],
        'fit_stack_ols': t['fit_stack_ols'],
        'fit_stack_numpy': t['fit_stack_numpy'],
        'lstsq': t['lstsq'] * n_images / n_lstsq,
        'fsolve': t['fsolve'] * n_images / n_fsolve,
    }
    if have_sklearn:
        full['sklearn'] = t['sklearn']

    labels = {
        'fit_stack': ('fit_stack, mix, robust errors (default)', 'all'),
        'fit_stack_ols': ('fit_stack, mix, textbook errors', 'all'),
        'fit_stack_numpy': ('fit_stack, default, numpy kernel', 'all'),
        'lstsq': ('seed 2: scipy.linalg.lstsq per image', f'{n_lstsq}'),
        'fsolve': ('seed 1: fsolve on RMSE loss per image', f'{n_fsolve}'),
        'sklearn': ('sklearn LinearRegression multi-target*', 'all'),
    }
    rows = []
    for key, total in full.items():
        label, timed = labels[key]
        ours = key.startswith('fit_stack')
        rows.append(
            (
                label,
                timed,
                fmt_time(total),
                fmt_time(total / n_images),
                '-' if ours else f'{total / full["fit_stack_ols"]:.1f}x',
                '-' if ours else f'{total / full["fit_stack"]:.1f}x',
            )
        )
    print_table(
        (
            'method',
            'timed on',
            f'time for {n_images}',
            'per image',
            'textbook fit faster by',
            'default fit faster by',
        ),
        rows,
    )
    print(
        f'times of subsets are scaled linearly to {n_images} images; '
        f'best of {repeat} after a warm-up'
    )
    print(
        f'one-read floor of this {stack.nbytes / 1e6:.0f} MB stack '
        f'(float64 GEMV): {fmt_time(t["floor"])}; fit_stack = '
        f'{t["fit_stack"] / t["floor"]:.2f}x floor'
    )
    if have_sklearn:
        print(
            '* includes building Y = (stack - B).reshape(N, -1).T; gives '
            'x only (no stderr, r2, rmse)'
        )
    else:
        print('scikit-learn not importable: LinearRegression skipped')

    fit = fit_stack(stack, ref1, ref2)
    x_l = lstsq_loop(sub_l, ref1, ref2)
    x_f = fsolve_loop(sub_f, ref1, ref2)
    print(
        f'max |x_fit_stack - x_lstsq| over {n_lstsq} images: '
        f'{np.abs(fit.x[:n_lstsq] - x_l).max():.2e}'
    )
    print(
        f'max |x_fsolve - x_lstsq| over {n_fsolve} images: '
        f'{np.abs(x_f - x_l[:n_fsolve]).max():.2e}'
    )
    if have_sklearn:
        x_s = sklearn_fit(stack, ref1, ref2)
        print(
            f'max |x_fit_stack - x_sklearn| over {n_images} images: '
            f'{np.abs(fit.x - x_s).max():.2e}'
        )
    print(
        f'max |x_fit_stack - x_true|: {np.abs(fit.x - x_true).max():.2e}'
        f' (median x_stderr {np.median(fit.x_stderr):.2e})'
    )

    # The target is the scale issue's, for what it names "the full
    # statistics (coefficients, sums for SSR and the centred total)": the
    # fit with textbook errors, which adds its standard errors to what the
    # lstsq loop gives.  The default's robust errors (the statistics
    # issue's) come on top; their speed-up and cost are printed as context,
    # as (b) does for the scaled and offset models.
    record(
        f'(a) speed-up vs lstsq loop, {n_images} imgs, stderr="ols"',
        full['lstsq'] / full['fit_stack_ols'],
        'x',
        SPEEDUP_TARGET,
        True,
    )
    record(
        '(a) same, default robust errors (context)',
        full['lstsq'] / full['fit_stack'],
        'x',
        None,
        True,
    )
    record(
        '(a) robust errors cost: default / ols time',
        full['fit_stack'] / full['fit_stack_ols'],
        'x',
        None,
        False,
    )
    record(
        f'(a) default fit time / floor, {n_images} imgs',
        t['fit_stack'] / t['floor'],
        'x',
        None,
        False,
    )
    record(
        f'(a) speed-up vs fsolve loop, {n_images} imgs',
        full['fsolve'] / full['fit_stack'],
        'x',
        None,
        True,
    )
    if have_sklearn:
        record(
            f'(a) speed-up vs sklearn, {n_images} imgs',
            full['sklearn'] / full['fit_stack'],
            'x',
            None,
            True,
        )
    record(
        '(a) same, numpy kernel (context)',
        full['lstsq'] / full['fit_stack_numpy'],
        'x',
        None,
        True,
    )
    return stack, ref1, ref2, t['floor']


# --------------------------------------------------------------------- #
# (b) large stacks against the one-read floor
# --------------------------------------------------------------------- #


def build_big(n: int, seed: int = 3):
    """float32 stack (Gaussian noise, sigma 20) and its uint16 rounding."""
    ref1, ref2 = references(seed, BIG_SHAPE)
    r1, r2 = ref1.astype(np.float32), ref2.astype(np.float32)
    rng = np.random.default_rng(seed + 1)
    x_true = rng.uniform(0.4, 0.7, n)
    s32 = np.empty((n, *BIG_SHAPE), np.float32)
    s16 = np.empty((n, *BIG_SHAPE), np.uint16)
    step = 50
    for i in range(0, n, step):
        j = min(n, i + step)
        xs = x_true[i:j, None, None].astype(np.float32)
        blk = s32[i:j]
        np.multiply(xs, r1 - r2, out=blk)
        blk += r2
        blk += rng.standard_normal(blk.shape, dtype=np.float32) * 20
        s16[i:j] = np.clip(np.rint(blk), 0, 65535)
    return s32, s16, ref1, ref2, x_true


def bench_big(s32, s16, ref1, ref2, x_true, repeat: int):
    n = len(s32)
    section(
        f'(b) {n}x{BIG_SHAPE[0]}x{BIG_SHAPE[1]} stacks: float32 '
        f'({s32.nbytes / 1e6:.0f} MB) and uint16 ({s16.nbytes / 1e6:.0f} MB)'
    )
    m32 = s32.reshape(n, -1)
    d = np.ones(m32.shape[1], np.float32)
    funcs: dict[str, Callable[[], object]] = {
        'floor': lambda: m32 @ d,
        'float32 mix': lambda: fit_stack(s32, ref1, ref2),
        'uint16 mix': lambda: fit_stack(s16, ref1, ref2),
        'float32 scaled': lambda: fit_stack(s32, ref1, ref2, model='scaled'),
        'float32 offset': lambda: fit_stack(s32, ref1, ref2, model='offset'),
        'float32 scaled-ols': lambda: fit_stack(
            s32, ref1, ref2, model='scaled', stderr='ols'
        ),
        'float32 offset-ols': lambda: fit_stack(
            s32, ref1, ref2, model='offset', stderr='ols'
        ),
        'uint16 max': s16.max,
        'float32 numpy': numpy_fit(s32, ref1, ref2),
        'uint16 numpy': numpy_fit(s16, ref1, ref2),
    }
    # Context: the sums-only standard errors, where fit_stack offers a
    # choice (its default may take a slower per-slice path).
    ols = 'stderr' in inspect.signature(fit_stack).parameters
    if ols:
        funcs['float32 ols'] = lambda: fit_stack(s32, ref1, ref2, stderr='ols')
    t = best_times(funcs, repeat)
    with threadpoolctl.threadpool_limits(limits=1, user_api='blas'):
        t1 = best_times({'floor': lambda: m32 @ d}, repeat)['floor']
    floor = t['floor']
    print(
        f'one-read floor: S.reshape(N, -1) @ d (float32 GEMV, all BLAS '
        f'threads) = {fmt_time(floor)} '
        f'({s32.nbytes / floor / 1e9:.1f} GB/s)'
    )
    # The targets are the scale issue's "full statistics (coefficients,
    # sums for SSR and the centred total)": the default fit for the mix
    # model (which adds robust errors from the same one pass), textbook
    # errors for the scaled and offset models.  Their default robust
    # errors take a second pass over the residuals: shown, as context.
    rows = []
    for key, target in (
        ('float32 mix', True),
        ('uint16 mix', True),
        ('float32 scaled-ols', True),
        ('float32 offset-ols', True),
        ('float32 scaled', False),
        ('float32 offset', False),
    ):
        dtype, model = key.split()
        model = model.replace('-ols', ", stderr='ols'")
        if not target:
            model += ' (context)'
        ratio = t[key] / floor
        limit, stretch = FLOOR_TARGET
        rows.append(
            (
                dtype,
                model,
                fmt_time(t[key]),
                f'{ratio:.2f}x',
                verdict(ratio <= limit) if target else '-',
                verdict(ratio <= stretch) if target else '-',
            )
        )
        record(
            f'(b) {dtype} {model}: time / floor',
            ratio,
            'x',
            FLOOR_TARGET if target else None,
            False,
        )
    print_table(
        (
            'stack',
            'model',
            'fit_stack',
            '/ floor',
            f'<= {FLOOR_TARGET[0]:g}x',
            f'stretch <= {FLOOR_TARGET[1]:g}x',
        ),
        rows,
    )
    print('context (not targets):')
    print(
        '  scaled and offset with their default robust errors: the one '
        'pass, then a second one over the residuals (their sandwich does '
        'not expand into a few sums)'
    )
    print(
        f'  float32 GEMV with 1 BLAS thread: {fmt_time(t1)} '
        f'= {t1 / floor:.2f}x floor'
    )
    if ols:
        print(
            "  float32 mix with stderr='ols' (per-slice sums only): "
            f'{fmt_time(t["float32 ols"])} = '
            f'{t["float32 ols"] / floor:.2f}x floor'
        )
    for dtype in ('float32', 'uint16'):
        print(
            f'  {dtype} mix with the numpy kernel (no numba): '
            f'{fmt_time(t[dtype + " numpy"])} = '
            f'{t[dtype + " numpy"] / floor:.2f}x floor'
        )
    print(
        f'  S16.max() (read-only uint16 pass, 1 thread): '
        f'{fmt_time(t["uint16 max"])} = {t["uint16 max"] / floor:.2f}x '
        'floor'
    )
    fit = fit_stack(s32, ref1, ref2)
    fit16 = fit_stack(s16, ref1, ref2)
    print(
        f'  max |x - x_true|: float32 {np.abs(fit.x - x_true).max():.1e}'
        f', uint16 {np.abs(fit16.x - x_true).max():.1e}'
    )
    print(f'best of {repeat}, interleaved, after a warm-up')
    return floor


# --------------------------------------------------------------------- #
# (e) K references
# --------------------------------------------------------------------- #

#: K = 4 at most 2x the floor (goal 1.5x), K = 8 at most 3x; the
#: constrained fit of K = 4 at most 1.3x the unconstrained one.
K_TARGETS = {4: (2.0, 1.5), 8: (3.0, 3.0)}
CONSTRAINED_TARGET = 1.3


def k_references(k: int, seed: int = 7) -> list[np.ndarray]:
    """K references with different patterns (blobs) in 50–450, float64."""
    rng = np.random.default_rng(seed)
    images = [blob_image(rng, BIG_SHAPE, 40) for _ in range(k)]
    return [50 + 400 * (im - im.min()) / np.ptp(im) for im in images]


def build_k(n: int, k: int, seed: int = 8):
    """float32 and uint16 stacks mixing K references (noise sigma 20)."""
    refs = k_references(k)
    rng = np.random.default_rng(seed)
    x = rng.dirichlet(np.full(k, 4.0), n).astype(np.float32)
    stack = np.tensordot(x, np.stack(refs).astype(np.float32), axes=(1, 0))
    stack += rng.standard_normal(stack.shape, dtype=np.float32) * 20
    return stack, np.clip(np.rint(stack), 0, 65535).astype(np.uint16), refs


def bench_k(n: int, repeat: int) -> None:
    """K = 2, 4, 8 over the floor; the constrained cost for K = 4."""
    if 'references' not in inspect.signature(fit_stack).parameters:
        print('\n(e) skipped: this fit_stack takes two references')
        return
    section(f'(e) K references, {n}x{BIG_SHAPE[0]}x{BIG_SHAPE[1]}')
    rows = []
    for k in (2, 4, 8):
        rows += _bench_one_k(n, k, repeat)
    print_table(('K', 'stack', 'fit_stack', '/ floor', 'target', 'goal'), rows)
    print(f'best of {repeat}, interleaved, after a warm-up')


def _bench_one_k(n: int, k: int, repeat: int) -> list[tuple[str, ...]]:
    s32, s16, refs = build_k(n, k)
    d = np.ones(BIG_SHAPE[0] * BIG_SHAPE[1], np.float32)
    m32 = s32.reshape(n, -1)
    funcs = {
        'floor': lambda: m32 @ d,
        'float32': lambda: fit_stack(s32, *refs),
        'uint16': lambda: fit_stack(s16, *refs),
    }
    if k == 4:
        funcs['nonneg'] = lambda: fit_stack(s32, *refs, constraint='nonneg')
    t = best_times(funcs, repeat)
    rows = []
    target = K_TARGETS.get(k)
    for dtype in ('float32', 'uint16'):
        ratio = t[dtype] / t['floor']
        rows.append(
            (
                str(k),
                dtype,
                fmt_time(t[dtype]),
                f'{ratio:.2f}x',
                verdict(ratio <= target[0]) if target else '-',
                verdict(ratio <= target[1]) if target else '-',
            )
        )
        record(
            f'(e) K = {k} {dtype}, default errors: time / floor',
            ratio,
            'x',
            target,
            False,
        )
    if k == 4:
        cost = t['nonneg'] / t['float32']
        record(
            '(e) K = 4 constrained / unconstrained (float32)',
            cost,
            'x',
            (CONSTRAINED_TARGET, CONSTRAINED_TARGET),
            False,
        )
        fit = fit_stack(s32, *refs, constraint='nonneg')
        print(
            f'  K = 4 nonneg: {fmt_time(t["nonneg"])} = {cost:.2f}x the '
            f'unconstrained fit; {int(fit.at_bound.sum())} slices at a bound'
        )
    return rows


# --------------------------------------------------------------------- #
# (d) the compiled kernel's weight
# --------------------------------------------------------------------- #

_FIRST_FIT = """
import time
t0 = time.perf_counter()
import numpy as np
import napari_mixcoef
t1 = time.perf_counter()
try:
    from napari_mixcoef import warm_up
except ImportError:  # before the layered engine
    from napari_mixcoef._fused import warm_up
warm_up()
t2 = time.perf_counter()
a = np.random.default_rng(0).random((64, 64)) + 1
s = (np.random.default_rng(1).random((50, 64, 64)) * 100).astype(np.uint16)
napari_mixcoef.fit_stack(s, a, a[::-1])
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def _installed_mb(dist: str) -> float:
    from importlib import metadata

    try:
        files = metadata.distribution(dist).files or []
    except metadata.PackageNotFoundError:
        return float('nan')
    total = 0
    for f in files:
        path = f.locate()
        if os.path.isfile(path):
            total += os.path.getsize(path)
    return total / 1e6


def bench_weight() -> None:
    """Install size and first-call latency of the compiled kernel."""
    import subprocess
    import tempfile

    section("(d) the compiled kernel's weight (numba)")
    sizes = {d: _installed_mb(d) for d in ('numba', 'llvmlite')}
    print(
        'installed: '
        + ', '.join(f'{d} {mb:.0f} MB' for d, mb in sizes.items())
        + f' (total {sum(sizes.values()):.0f} MB)'
    )

    def fresh(env=None) -> list[float]:
        out = subprocess.run(
            [sys.executable, '-c', _FIRST_FIT],
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
            check=True,
        )
        return [float(v) for v in out.stdout.split()]

    rows = []
    with tempfile.TemporaryDirectory() as cache:
        # an empty cache: what the very first fit after installing pays
        cold = fresh({'NUMBA_CACHE_DIR': cache})
        warm = min(
            (fresh({'NUMBA_CACHE_DIR': cache}) for _ in range(3)),
            key=sum,
        )
    plain = fresh(
        {'NAPARI_MIXCOEF_KERNEL': 'numpy', 'NAPARI_MIXCOEF_BACKEND': 'numpy'}
    )
    for label, (imp, warm_up, fit) in (
        ('first run after install (compiles)', cold),
        ('later runs (machine code cached)', warm),
        ('numpy kernel (no numba)', plain),
    ):
        rows.append((label, fmt_time(imp), fmt_time(warm_up), fmt_time(fit)))
    print_table(
        ('new process', 'import package', 'numba warm-up', 'first fit'),
        rows,
    )
    print(
        'the widget runs the warm-up in a background thread when it '
        'opens; a script or the CLI pays it on its first fit'
    )


# --------------------------------------------------------------------- #
# (c) memory
# --------------------------------------------------------------------- #


def peak_extra_mb(stack, ref1, ref2) -> float:
    """Peak memory traced by tracemalloc while fit_stack runs, in MB."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        fit = fit_stack(stack, ref1, ref2)
        peak = tracemalloc.get_traced_memory()[1] - base
        del fit
    finally:
        tracemalloc.stop()
    return peak / 1e6


def bench_memory(s32, s16, ref1, ref2):
    n = len(s32)
    quarter = max(1, n // 4)
    section('(c) peak extra memory of fit_stack (tracemalloc)')
    rows = []
    for label, stack in (
        (f'float32 {n} slices', s32),
        (f'float32 {quarter} slices', s32[:quarter]),
        (f'uint16 {n} slices', s16),
    ):
        mb = peak_extra_mb(stack, ref1, ref2)
        rows.append(
            (
                label,
                f'{stack.nbytes / 1e6:.0f} MB',
                f'{mb:.2f} MB',
                verdict(mb <= MEMORY_TARGET_MB),
            )
        )
        record(
            f'(c) peak extra memory, {label}',
            mb,
            ' MB',
            (MEMORY_TARGET_MB, None),
            False,
        )
    print_table(
        ('stack', 'stack size', 'peak extra', f'<= {MEMORY_TARGET_MB:g} MB'),
        rows,
    )
    print(
        'tracing starts after the stack exists; the peak includes the '
        'result arrays and every worker buffer'
    )


# --------------------------------------------------------------------- #
# --profile: where the float32 fit spends its time
# --------------------------------------------------------------------- #


def _capacity_probe(repeat: int) -> float:
    """How many cores this process gets now: 2 threads vs 1 on a ufunc.

    Each thread subtracts into its own cache-resident buffer (the GIL is
    released inside the ufunc); 2.0 means two free cores, 1.0 means the
    second core is busy elsewhere (other processes, or the hypervisor).
    """
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(0)
    bufs = [
        (rng.random((4, 65536), np.float32), np.empty((4, 65536), np.float32))
        for _ in range(2)
    ]
    d = np.ones(65536, np.float32)

    def work(i: int) -> None:
        src, dst = bufs[i]
        for _ in range(200):
            np.subtract(src, d, out=dst)

    with ThreadPoolExecutor(2) as pool:
        t = best_times(
            {
                'one': lambda: work(0),
                'two': lambda: list(pool.map(work, (0, 1))),
            },
            repeat,
        )
    _capacity_log.append(2 * t['one'] / t['two'])
    return _capacity_log[-1]


def bench_profile(label, stack, ref1, ref2, floor, repeat):
    """Where one fit_stack call spends its time (the engine's layers).

    Times the backend's block function over every block in this thread,
    the design's set-up and a fit's settings; prints "skipped" on a
    package without the layered engine.
    """
    section(f'profile: {label}')
    try:
        _profile(stack, ref1, ref2, floor, repeat)
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        print(f'skipped: no layered engine here ({exc!r})')


def _profile(stack, ref1, ref2, floor, repeat):
    from napari_mixcoef.backends import get_backend
    from napari_mixcoef.engine.blocks import pixel_range, plan_blocks
    from napari_mixcoef.engine.local import IN_MEMORY_BLOCK_BYTES, Views
    from napari_mixcoef.engine.threads import fit_settings
    from napari_mixcoef.model.design import make_design
    from napari_mixcoef.model.references import checked_references
    from napari_mixcoef.model.sums import SumsLayout

    n = len(stack)
    refs = checked_references([ref1, ref2])
    design = make_design(refs, 'mix', stack.dtype)
    groups = plan_blocks(
        (n,), design.shape, design.dtype.itemsize, IN_MEMORY_BLOCK_BYTES
    )
    blocks = [b for group in groups for b in group]
    rows = stack.reshape(n, -1)
    layout = SumsLayout(design.k)
    views = Views(design)

    def loop(name: str) -> Callable[[], float]:
        backend = get_backend(name)

        def run() -> float:
            sums = layout.empty(n)
            with fit_settings():
                t0 = time.perf_counter()
                for b in blocks:
                    view = views(pixel_range(b, design.shape))
                    backend.block_sums(
                        rows[b.start : b.stop],
                        view,
                        sums.rows(b.start, b.stop),
                    )
                return time.perf_counter() - t0

        return run

    def settings_cycle() -> None:
        with fit_settings():
            pass

    funcs: dict[str, Callable[[], object]] = {
        'loop': loop('numba'),
        'loop numpy': loop('numpy'),
        'fit': lambda: fit_stack(stack, ref1, ref2, stderr='ols'),
        'design': lambda: make_design(refs, 'mix', stack.dtype),
        'settings': settings_cycle,
    }
    t = best_times(funcs, repeat, self_timed=frozenset({'loop', 'loop numpy'}))
    capacity = _capacity_probe(repeat)

    def row(name, v, per_block=True):
        return (
            name,
            fmt_time(v),
            f'{v / floor:.2f}x',
            fmt_time(v / len(blocks)) if per_block else '-',
        )

    print(
        f'{len(blocks)} blocks of {blocks[0].stop - blocks[0].start} slices; '
        f'the loops run in this thread with 1 BLAS thread; best of '
        f'{repeat}, interleaved'
    )
    print_table(
        ('part', 'time', '/ floor', 'per block'),
        [
            row('block sums, numba, 1 thread', t['loop']),
            row('block sums, numpy, 1 thread', t['loop numpy']),
            row("fit_stack, stderr='ols' (2 threads)", t['fit']),
            row('design (references, set-up)', t['design'], False),
            row('fit settings in+out', t['settings'], False),
        ],
    )
    print(
        f'threading: 1-thread numba loop / fit_stack = '
        f'{t["loop"] / t["fit"]:.2f}x (2.0 = perfect on 2 cores, before '
        f'fixed costs); a pure ufunc gave {capacity:.2f}x just now'
    )


def bench_k_profile(n: int, repeat: int) -> None:
    """Where a default fit of K references spends its time, per layer.

    The set-up (design, noise kernel, sandwich terms) runs once in the
    calling thread before the blocks; the block work (sums, then each
    slice's fit and meat) is timed over every block in this thread.
    """
    section(f'profile: (e) K references, float32 {n} slices, default errors')
    rows = [row for k in (4, 8) for row in _k_profile_rows(n, k, repeat)]
    print_table(('K', 'part', 'time', '/ floor'), rows)
    print(f'floor: 2 BLAS threads; best of {repeat}, interleaved')


def _k_profile_rows(n: int, k: int, repeat: int) -> list[tuple[str, ...]]:
    from napari_mixcoef.backends import get_backend
    from napari_mixcoef.engine.blocks import pixel_range, plan_blocks
    from napari_mixcoef.engine.fit import noise_kernel, sample_terms
    from napari_mixcoef.engine.local import IN_MEMORY_BLOCK_BYTES, Views
    from napari_mixcoef.engine.threads import fit_settings
    from napari_mixcoef.model.design import make_design
    from napari_mixcoef.model.noise import NoiseSpec
    from napari_mixcoef.model.references import checked_references
    from napari_mixcoef.model.sums import SumsLayout

    backend, spec = get_backend('numba'), NoiseSpec()
    s32, _, refs = build_k(n, k)
    checked = checked_references(refs)
    design = make_design(checked, 'mix', s32.dtype)
    rho = noise_kernel(s32, (n,), design, spec, backend, 'raise', [])
    views = Views(design, calibrated=sample_terms(design, rho, backend))
    groups = plan_blocks((n,), design.shape, 4, IN_MEMORY_BLOCK_BYTES)
    blocks = [b for group in groups for b in group]
    flat = s32.reshape(n, -1)

    def blocks_loop(fit: bool) -> float:
        with fit_settings():
            t0 = time.perf_counter()
            for b in blocks:
                view = views(pixel_range(b, design.shape))
                y = flat[b.start : b.stop]
                if fit:
                    backend.fit_block(y, view, spec, None)
                else:
                    backend.block_sums(y, view, SumsLayout(k).empty(len(y)))
            return time.perf_counter() - t0

    d = np.ones(flat.shape[1], np.float32)
    funcs: dict[str, Callable[[], object]] = {
        'floor': lambda: flat @ d,
        'fit': lambda: fit_stack(s32, *refs),
        'design': lambda: make_design(checked, 'mix', s32.dtype),
        'kernel': lambda: noise_kernel(
            s32, (n,), design, spec, backend, 'raise', []
        ),
        'terms': lambda: sample_terms(design, rho, backend),
        'sums': lambda: blocks_loop(False),
        'blocks': lambda: blocks_loop(True),
    }
    t = best_times(funcs, repeat, self_timed=frozenset({'sums', 'blocks'}))
    t['ideal'] = t['design'] + t['kernel'] + t['terms'] + t['blocks'] / 2
    names = (
        ('fit_stack (2 threads)', 'fit'),
        ('set-up: design', 'design'),
        ('set-up: noise kernel', 'kernel'),
        ('set-up: sandwich terms', 'terms'),
        ('blocks: sums only, 1 thread', 'sums'),
        ('blocks: sums + fit + meat, 1 thread', 'blocks'),
        ('set-up + blocks / 2 (2 ideal threads)', 'ideal'),
    )
    return [
        (str(k), name, fmt_time(t[key]), f'{t[key] / t["floor"]:.2f}x')
        for name, key in names
    ]


CHUNK_SIZES = [1 << k for k in range(18, 23)]  # 256 KiB .. 4 MiB


def bench_chunk_sizes(label, stack, ref1, ref2, floor, repeat):
    """Row of fit_stack time / floor for each of CHUNK_SIZES."""
    funcs: dict[str, Callable[[], object]] = {
        str(cb): (lambda cb=cb: fit_stack(stack, ref1, ref2, chunk_bytes=cb))
        for cb in CHUNK_SIZES
    }
    t = best_times(funcs, repeat)
    return (label, *(f'{t[str(cb)] / floor:.2f}x' for cb in CHUNK_SIZES))


# --------------------------------------------------------------------- #


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--quick', action='store_true', help='small sizes, for a smoke run'
    )
    parser.add_argument(
        '--profile',
        action='store_true',
        help='add a per-stage breakdown of the float32 fit',
    )
    args = parser.parse_args(argv)

    if args.quick:
        n_small, n_lstsq, n_fsolve, n_big, repeat = 1000, 100, 10, 500, 3
    else:
        n_small, n_lstsq, n_fsolve, n_big, repeat = 5000, 200, 20, 2000, 5

    t_start = time.perf_counter()
    print_environment()
    print(f'mode: {"quick" if args.quick else "full"}')

    def probe(where: str) -> None:
        print(f'[2-core capacity {where}: {_capacity_probe(repeat):.2f}x]')

    print(
        '2-core capacity = time of one thread / time of two threads each '
        'doing\nthe same cache-resident ufunc work (2.0 = both cores free)'
    )
    probe('at start')

    # (a)'s calls take tens of ms: three times the rounds cost seconds and
    # keep one burst of load from another process from deciding the best
    seed = bench_seed(n_small, n_lstsq, n_fsolve, 3 * repeat)
    probe('after (a)')
    if not args.profile:
        del seed

    t0 = time.perf_counter()
    s32, s16, ref1, ref2, x_true = build_big(n_big)
    print(
        f'\n(built the {n_big}-slice stacks in '
        f'{time.perf_counter() - t0:.1f} s)'
    )
    floor = bench_big(s32, s16, ref1, ref2, x_true, repeat)
    probe('after (b)')
    bench_memory(s32, s16, ref1, ref2)
    if not args.profile:
        del s32, s16
    bench_k(n_big, repeat)
    probe('after (e)')
    bench_weight()
    if args.profile:
        stack, r1, r2, floor_a = seed
        for label, args_ in (
            (f'(b) float32 {n_big} slices, mix', (s32, ref1, ref2, floor)),
            (
                f'(b) uint16 {n_big} slices, mix (/ float32 floor)',
                (s16, ref1, ref2, floor),
            ),
            (
                f'(a) float64 {n_small} images 64x64, mix',
                (stack, r1, r2, floor_a),
            ),
        ):
            bench_profile(label, *args_, repeat)
            probe('after this profile')
        bench_k_profile(n_big, repeat)
        probe('after the K profile')
        section('fit_stack time / floor against chunk_bytes (default 1 MiB)')
        print_table(
            ('stack', *(f'{cb >> 10} KiB' for cb in CHUNK_SIZES)),
            [
                bench_chunk_sizes(
                    'float32 (b)', s32, ref1, ref2, floor, repeat
                ),
                bench_chunk_sizes(
                    'float64 (a)', stack, r1, r2, floor_a, repeat
                ),
            ],
        )
        probe('after the sweep')

    section('summary')
    print_table(
        ('metric', 'value', 'target', 'status', 'stretch', 'status'),
        _rows,
    )
    probe('at end')
    print(
        f'2-core capacity over the run: min {min(_capacity_log):.2f}x, '
        f'max {max(_capacity_log):.2f}x; '
        f'load average {os.getloadavg()[0]:.2f}; '
        f'total run time {time.perf_counter() - t_start:.0f} s'
    )
    if min(_capacity_log) < CAPACITY_WARN:
        print(
            'WARNING: the second core was busy at some point (capacity < '
            f'{CAPACITY_WARN}x): two-thread figures (floor, fit_stack) are '
            'unreliable; rerun on a quiet machine'
        )
    return 0


if __name__ == '__main__':
    sys.exit(main())
