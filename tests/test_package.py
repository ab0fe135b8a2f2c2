"""Packaging: the manifest ships, validates, and the core stays pure."""

import subprocess
import sys
from pathlib import Path

import napari_mixcoef

ROOT = Path(__file__).resolve().parents[1]


def test_core_imports_neither_napari_nor_qt():
    code = (
        'import sys, napari_mixcoef, napari_mixcoef.core; '
        'bad = [m for m in sys.modules if m.split(".")[0] in '
        '("napari", "qtpy", "PyQt6", "PyQt5", "PySide6", "magicgui", '
        '"vispy", "matplotlib")]; '
        'print(bad); sys.exit(1 if bad else 0)'
    )
    out = subprocess.run(
        [sys.executable, '-c', code],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_manifest_ships_with_the_package_and_validates():
    shipped = Path(napari_mixcoef.__file__).parent / 'napari.yaml'
    assert shipped.read_text() == (ROOT / 'napari.yaml').read_text()
    npe2 = Path(sys.executable).parent / 'npe2'
    out = subprocess.run(
        [str(npe2), 'validate', 'napari-mixcoef'],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert 'valid' in out.stdout


def test_manifest_declares_what_exists():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution('napari-mixcoef')
    commands = {c.id: c.python_name for c in manifest.contributions.commands}
    for python_name in commands.values():
        module, attr = python_name.split(':')
        assert hasattr(__import__(module, fromlist=[attr]), attr)
    widgets = {
        w.display_name: commands[w.command]
        for w in manifest.contributions.widgets
    }
    # the plot has its own entry, so that a closed plot can be reopened
    assert widgets == {
        'Mixing coefficients': 'napari_mixcoef._qt.widget:MixcoefWidget',
        'Mixing coefficients plot': 'napari_mixcoef._qt.plot:CoefficientPlot',
    }
    keys = [s.key for s in manifest.contributions.sample_data]
    assert keys == ['mixture', 'three_states', 'drifting_mixture']
