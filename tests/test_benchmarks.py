"""The benchmarks must keep running (their figures are not asserted here)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _quick(script: str) -> str:
    """Stdout of ``benchmarks/<script> --quick``, which must exit cleanly."""
    out = subprocess.run(
        [sys.executable, str(ROOT / 'benchmarks' / script), '--quick'],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert '== summary ==' in out.stdout
    return out.stdout


@pytest.mark.parametrize(
    ('script', 'lines'),
    [
        ('bench_fit.py', ['speed-up vs lstsq loop']),
        ('bench_spectral.py', ['× pinv']),
        ('bench_register.py', ['shift RMS', 'cover95']),
    ],
)
def test_bench_quick_runs(script, lines):
    stdout = _quick(script)
    for line in lines:
        assert line in stdout
