"""Out-of-core benchmark: a 6000×256×256 uint16 zarr stack on disk.

Run: ``python benchmarks/bench_scale.py [--slices N] [--keep DIR]``.

Prints, in one process (ratios, since absolute times are noise here):

* ``fit_stack`` on the zarr array vs reading every chunk once with the
  same two threads and no arithmetic (the I/O floor; target ≤ 1.3×);
* the growth of the peak resident memory while fitting, measured in a
  fresh subprocess (target ≤ 256 MB for a 786 MB stack);
* the same stack as a dask array on a 2-worker ``LocalCluster``
  (processes): time, and the largest difference from the zarr result
  (target ≤ 1e-6).

The in-memory ratios (float32/uint16 vs the one-read floor, the seed's
lstsq loop) are printed by ``benchmarks/bench_fit.py``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

SHAPE = (256, 256)
CHUNK = 32  # slices per zarr chunk: 4 MiB of uint16


def build(path: Path, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import zarr

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    a = 800 + 600 * np.sin(xx / 9.0) ** 2 + 100 * rng.random(SHAPE)
    b = 700 + 650 * np.cos(yy / 11.0) ** 2 + 100 * rng.random(SHAPE)
    x = 0.55 + 0.15 * np.sin(np.arange(n) / 300)
    z = zarr.create_array(
        store=path, shape=(n, *SHAPE), dtype='u2', chunks=(CHUNK, *SHAPE)
    )
    for i in range(0, n, 256):
        xs = x[i : i + 256, None, None]
        mean = xs * a + (1 - xs) * b
        noisy = mean + rng.standard_normal(mean.shape) * np.sqrt(mean)
        z[i : i + 256] = np.clip(noisy, 0, 65535).astype('u2')
    return a, b, x


def best(func, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        func()
        times.append(time.perf_counter() - t0)
    return min(times)


def read_once(z) -> None:
    """Every chunk read and decompressed once, two threads, no arithmetic."""
    starts = range(0, z.shape[0], CHUNK)
    with ThreadPoolExecutor(2) as pool:
        for _ in pool.map(lambda i: z[i : i + CHUNK], starts):
            pass


_RSS_CHILD = r"""
import sys, numpy as np, zarr
from napari_mixcoef import fit_stack
def kb(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1])
z = zarr.open_array(sys.argv[1], mode='r')
a, b = np.load(sys.argv[2]), np.load(sys.argv[3])
fit_stack(z[:CHUNK], a, b)
before = kb('VmRSS:')
fit_stack(z, a, b)
print((kb('VmHWM:') - before) / 1024)
""".replace('CHUNK', str(CHUNK))


def peak_rss_growth(path: Path, a_path: Path, b_path: Path) -> float:
    out = subprocess.run(
        [
            sys.executable,
            '-c',
            _RSS_CHILD,
            str(path),
            str(a_path),
            str(b_path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--slices', type=int, default=6000)
    parser.add_argument(
        '--keep', metavar='DIR', help='build (or reuse) the zarr stack in DIR'
    )
    args = parser.parse_args()

    import zarr

    from napari_mixcoef import fit_stack

    workdir = Path(args.keep or tempfile.mkdtemp(prefix='mixcoef-bench-'))
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f'stack{args.slices}.zarr'
    a_path, b_path = workdir / 'a.npy', workdir / 'b.npy'
    try:
        if not path.exists():
            t0 = time.perf_counter()
            a, b, _ = build(path, args.slices)
            np.save(a_path, a)
            np.save(b_path, b)
            print(f'built {path} in {time.perf_counter() - t0:.1f} s')
        a, b = np.load(a_path), np.load(b_path)
        z = zarr.open_array(path, mode='r')
        raw_mb = z.nbytes / 1e6
        disk_mb = sum(f.stat().st_size for f in path.rglob('*')) / 1e6
        print(
            f'stack {z.shape} {z.dtype}: {raw_mb:.0f} MB raw, '
            f'{disk_mb:.0f} MB on disk, chunks {z.chunks}'
        )

        fit_stack(z[:CHUNK], a, b)  # warm-up: imports, thread pool
        t_read = best(lambda: read_once(z))
        t_fit = best(lambda: fit_stack(z, a, b))
        fit = fit_stack(z, a, b)
        ratio = t_fit / t_read
        print(
            f'\nread every chunk once (2 threads, no arithmetic): '
            f'{t_read:.2f} s'
        )
        print(
            f'fit_stack on the zarr array:                      '
            f'{t_fit:.2f} s = {ratio:.2f}x the I/O floor  '
            f'(target <= 1.3x: {"PASS" if ratio <= 1.3 else "FAIL"})'
        )

        growth = peak_rss_growth(path, a_path, b_path)
        print(
            f'peak RSS growth while fitting (fresh process): '
            f'{growth:.0f} MB for a {raw_mb:.0f} MB stack  '
            f'(target <= 256 MB: {"PASS" if growth <= 256 else "FAIL"})'
        )

        import dask.array as da
        from distributed import Client, LocalCluster

        with (
            LocalCluster(
                n_workers=2,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=40,
            ) as cluster,
            Client(cluster),
        ):
            lazy = da.from_zarr(str(path))
            fit_stack(lazy[:CHUNK], a, b)  # warm the workers up
            t_dask = best(lambda: fit_stack(lazy, a, b), repeat=2)
            dfit = fit_stack(lazy, a, b)
        diff = float(np.max(np.abs(dfit.x - fit.x)))
        print(
            f'dask array on a 2-worker LocalCluster (processes): '
            f'{t_dask:.2f} s = {t_dask / t_read:.2f}x the I/O floor; '
            f'max |x - x_zarr| = {diff:.1e}  (target <= 1e-6: '
            f'{"PASS" if diff <= 1e-6 else "FAIL"})'
        )
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
    main()
