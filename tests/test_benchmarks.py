"""The benchmark must keep running (its figures are not asserted here)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_fit_quick_runs():
    out = subprocess.run(
        [sys.executable, str(ROOT / 'benchmarks' / 'bench_fit.py'), '--quick'],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert '== summary ==' in out.stdout
    assert 'speed-up vs lstsq loop' in out.stdout


def test_bench_register_quick_runs():
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / 'benchmarks' / 'bench_register.py'),
            '--quick',
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert '== summary ==' in out.stdout
    assert 'shift RMS' in out.stdout and 'cover95' in out.stdout
