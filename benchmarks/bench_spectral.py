"""Benchmark of per-pixel (spectral) unmixing with ``fit_stack``.

Run ``python benchmarks/bench_spectral.py [--quick]`` from the repository
root.  A channel-last image ``(Y, X, C)`` fitted with K reference spectra
of length C is Y·X slices of C values (issue 15, item 9).  Everything is
measured in one process, best of several interleaved runs, and reported
as ratios to the plain unmixing every tool offers::

    Y.reshape(-1, C) @ pinv(D).T      # D = (C, K): the spectra as columns

(float32 BLAS on every core; coefficients only, no statistics).

Rows
----
``fit_stack``  the default fit (``stderr="auto"``: sandwich errors) with
               full statistics: coef, stderr, fractions and their errors,
               x, R², RMSE per pixel, float64.
``ols``        the same with textbook errors.
``outputs``    only allocating and writing arrays of the size of the
               fit's outputs (18 float64 + 1 bool per pixel): the part of
               the floor that the size of the result sets, whatever the
               fit does.

Cases: 2048×2048×8 float32 with K = 4 and the "scaled" model (the target:
``fit_stack`` ≤ 3× pinv); then, as context, other models, K = 2, K = 8
with C = 16, and C = 32.  ``--quick`` runs 256×256 images.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable

import numpy as np

from napari_mixcoef import fit_stack

#: Seconds to wait before each timed call (OpenBLAS's idle threads spin
#: for a while after a multi-threaded call).
SETTLE = 0.05
#: fit_stack's default fit over pinv, at most.
TARGET = 3.0


def spectra(n_channels: int, k: int, seed: int = 0) -> np.ndarray:
    """K smooth, overlapping emission spectra (K, C), float64."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(0.0, 1.0, n_channels)
    centres = np.linspace(0.15, 0.85, k) + rng.normal(0, 0.02, k)
    width = 0.35 / k + 0.02
    return np.exp(-0.5 * ((grid - centres[:, None]) / width) ** 2) + 0.05


def spectral_image(side: int, refs: np.ndarray, seed: int = 1) -> np.ndarray:
    """A (side, side, C) float32 image of abundances times spectra."""
    rng = np.random.default_rng(seed)
    k, c = refs.shape
    out = np.empty((side * side, c), np.float32)
    step = 1 << 18
    for start in range(0, side * side, step):
        rows = min(step, side * side - start)
        coef = rng.random((rows, k)) * 100.0
        noise = rng.normal(0.0, 1.0, (rows, c))
        out[start : start + rows] = coef @ refs + noise
    return out.reshape(side, side, c)


def best_times(funcs: dict[str, Callable[[], object]], repeat: int):
    """Best wall time of each callable (interleaved, after a warm-up)."""
    for f in funcs.values():
        f()
    best = dict.fromkeys(funcs, math.inf)
    for _ in range(repeat):
        for name, f in funcs.items():
            time.sleep(SETTLE)
            t0 = time.perf_counter()
            f()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def write_outputs(n: int, m: int, k: int) -> Callable[[], object]:
    """Allocate and write arrays as large as a fit's outputs."""

    def run():
        arrays = [np.empty((n, m)) for _ in range(2)]
        arrays += [np.empty((n, k)) for _ in range(2)]
        arrays += [np.empty(n) for _ in range(4)]
        for a in arrays:
            a.fill(1.0)
        return arrays, np.zeros(n, bool)

    return run


def bench_case(side, c, k, model, repeat, extra=True) -> float:
    """Print one case's times and ratios; return fit_stack / pinv."""
    refs = spectra(c, k)
    image = spectral_image(side, refs)
    pinv = np.linalg.pinv(refs.T).T.astype(np.float32)  # (C, K)
    flat = image.reshape(-1, c)
    m = k + (model == 'offset') - (model == 'mix' and k == 2)
    funcs = {
        'pinv': lambda: flat @ pinv,
        'fit_stack': lambda: fit_stack(image, *refs, model=model),
    }
    if extra:
        funcs['ols'] = lambda: fit_stack(
            image, *refs, model=model, stderr='ols'
        )
        funcs['outputs'] = write_outputs(side * side, m, k)
    best = best_times(funcs, repeat)
    fit = fit_stack(image, *refs, model=model)
    check = ''
    if model == 'scaled':
        gap = np.abs(fit.coef.reshape(-1, k) - flat @ pinv).max()
        check = f'  (max |coef − pinv| {gap:.2g})'
    floor = best['pinv']
    print(
        f'{side}×{side}×{c} float32, K = {k}, {model}: pinv '
        f'{floor * 1e3:.0f} ms{check}'
    )
    for name, t in best.items():
        if name != 'pinv':
            print(f'  {name:10s} {t * 1e3:7.0f} ms  {t / floor:5.2f}× pinv')
    return best['fit_stack'] / floor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--quick', action='store_true', help='256×256 images, smoke run'
    )
    args = parser.parse_args(argv)
    side = 256 if args.quick else 2048
    repeat = 3 if args.quick else 5
    print(f'mode: {"quick" if args.quick else "full"}')
    print('== target case ==')
    ratio = bench_case(side, 8, 4, 'scaled', repeat)
    print('== context ==')
    for model in ('mix', 'offset'):
        bench_case(side, 8, 4, model, repeat, extra=False)
    for c, k in ((8, 2), (16, 8), (32, 4)):
        bench_case(side, c, k, 'scaled', repeat, extra=False)
    print('== summary ==')
    ok = 'PASS' if ratio <= TARGET else 'FAIL'
    print(
        f'fit_stack (stderr="auto") / pinv, {side}×{side}×8, K = 4: '
        f'{ratio:.2f}× (target ≤ {TARGET:g}×) {ok}'
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
