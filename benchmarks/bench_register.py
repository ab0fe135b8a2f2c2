"""Registration benchmark: accuracy, honesty and cost of register=.

Run: ``python benchmarks/bench_register.py [--quick]``.

1. Accuracy on the "drifting_mixture" sample's settings (128×128, ±3 px
   slow sub-pixel drift, 900 photons, Poisson and read noise; the
   sample's debris and defocus left out): RMS error of the shift per
   axis (target ≤ 0.05 px); std of x against the Poisson Cramér–Rao
   bound over the fitted pixels and against a fit of the same mixture
   without drift over the same pixels (target within 10 %).
2. Seeded Monte-Carlo, 1000 slices of 64×64 at the same noise (the
   settings of ``tests/test_registration.py``): coverage of the 95 %
   intervals of x and of the shift, for each noise model and error mode
   (target 93–97 % with errors that model the noise: Poisson, or "auto").
3. Cost on 2000×128×128 uint16 (500 with ``--quick``): the registered
   fit over the unregistered one, same options, best of 3 interleaved
   rounds in one process, each call after a 0.2 s pause (as
   bench_stats'); target ≤ 5×.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from napari_mixcoef import fit_stack
from napari_mixcoef.sample_data import make_drifting_mixture, make_mixture

OFFSET = 100.0
READ = 3.0
ROUNDS = 3
SETTLE = 0.2
COST_TARGET = 5.0


def verdict(ok: bool) -> str:
    return 'PASS' if ok else 'FAIL'


def fitted_mask(fit, shape) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[fit._registration.box] = True
    return mask


def crb(a, b, x, mask) -> float:
    """Poisson CRB of x (photons + read noise), RMS over the slices."""
    d = (a - b)[mask]
    mean = (
        x[:, None] * (a - OFFSET)[mask] + (1 - x[:, None]) * (b - OFFSET)[mask]
    )
    fisher = np.sum(d * d / (mean + READ**2), axis=1)
    return float(np.sqrt(np.mean(1.0 / fisher)))


def accuracy(n: int) -> None:
    shape = (128, 128)
    print(f'== accuracy: {n} slices of {shape}, +-3 px drift, sample noise ==')
    stack, a, b, x, truth = make_drifting_mixture(n, shape, defects=False)
    still, _, _, _ = make_mixture(n, shape)
    clean = np.ones(n, bool)
    from napari_mixcoef.sample_data import DEBRIS_SLICES, DEFOCUS_SLICE

    clean[[i for i in (*DEBRIS_SLICES, DEFOCUS_SLICE) if i < n]] = False
    poisson = {'noise': 'poisson', 'camera_offset': OFFSET}
    for label, kwargs in (('least squares', {}), ('poisson', poisson)):
        fit = fit_stack(stack, a, b, register='translation', **kwargs)
        mask = fitted_mask(fit, shape)
        rms = np.sqrt(np.nanmean((fit.shift - truth) ** 2, axis=0))
        sd = float(np.std(fit.x - x))
        bound = crb(a, b, x, mask)
        ref = fit_stack(still[clean], a, b, mask=mask, **kwargs)
        sd0 = float(np.std(ref.x - x[clean]))
        print(
            f'noise={label:<14} shift RMS {rms[0]:.4f}, {rms[1]:.4f} px '
            f'[target <= 0.05: {verdict((rms <= 0.05).all())}]  '
            f'failed {int(fit.registration_failed.sum())}/{n}'
        )
        print(
            f'{"":<20} x sd / CRB {sd / bound:.3f}, x sd / no-drift sd '
            f'{sd / sd0:.3f} [target within 10 %: '
            f'{verdict(abs(sd / bound - 1) <= 0.1)}]  '
            f'({fit.n_pixels} of {a.size} pixels fitted)'
        )


def coverage(n: int) -> None:
    shape = (64, 64)
    print(f'\n== coverage: {n} slices of {shape}, seeded ==')
    print(f'{"noise":<10}{"errors":<8}{"x cover95":>11}{"shift cover95":>15}')
    stack, a, b, x, truth = make_drifting_mixture(
        n, shape, defects=False, seed=1
    )
    for noise in ('gaussian', 'poisson', 'huber'):
        for mode in ('auto', 'ols'):
            fit = fit_stack(
                stack,
                a,
                b,
                register='translation',
                noise=noise,
                stderr=mode,
                camera_offset=OFFSET if noise == 'poisson' else 0.0,
            )
            cx = np.mean(np.abs(fit.x - x) <= 1.96 * fit.x_stderr)
            cs = np.mean(np.abs(fit.shift - truth) <= 1.96 * fit.shift_stderr)
            print(f'{noise:<10}{mode:<8}{100 * cx:10.1f} %{100 * cs:13.1f} %')
    print(
        '  target 93-97 %; Poisson counts: textbook ("ols") errors of '
        'least squares assume an even variance, so only "auto" or the '
        'Poisson model is held to it'
    )


def cost(n: int) -> None:
    shape = (128, 128)
    stack, a, b, _, _ = make_drifting_mixture(n, shape, defects=False)
    print(
        f'\n== cost: {stack.shape} {stack.dtype} '
        f'({stack.nbytes / 1e6:.0f} MB), best of {ROUNDS} =='
    )
    fit_stack(stack[:16], a, b, register='translation')  # warm-up
    cases = {
        'default': {},
        'stderr=ols': {'stderr': 'ols'},
        'poisson': {'noise': 'poisson', 'camera_offset': OFFSET},
    }
    times: dict[tuple[str, bool], float] = {}
    for _ in range(ROUNDS):
        for label, kwargs in cases.items():
            for registered in (False, True):
                extra = {'register': 'translation'} if registered else {}
                time.sleep(SETTLE)
                t0 = time.perf_counter()
                fit_stack(stack, a, b, **kwargs, **extra)
                t = time.perf_counter() - t0
                key = (label, registered)
                times[key] = min(t, times.get(key, t))
    print(f'{"options":<14}{"plain":>10}{"registered":>12}{"ratio":>9}')
    for label in cases:
        plain, reg = times[label, False], times[label, True]
        ratio = reg / plain
        print(
            f'{label:<14}{plain * 1e3:8.0f}ms{reg * 1e3:10.0f}ms'
            f'{ratio:8.1f}x   target <= {COST_TARGET:g}x: '
            f'{verdict(ratio <= COST_TARGET)}'
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true')
    args = parser.parse_args()
    accuracy(60 if args.quick else 200)
    coverage(300 if args.quick else 1000)
    cost(500 if args.quick else 2000)
    print('\n== summary ==')
    print('figures above; benchmarks/README.md says what they mean')


if __name__ == '__main__':
    main()
