"""The dock's two small panels: the references' diagnostics and Run.

:class:`Diagnostics` says how well the picked references can be told
apart (before any fit) and can show their avg/diff basis;
:class:`RunControls` holds Run, Cancel, the progress bar and the status
line.  Both only show what they are told.
"""

from __future__ import annotations

import numpy as np
from magicgui.widgets import Container, Label, ProgressBar, PushButton

from napari_mixcoef import reference_diagnostics

_COLORS = {'error': '#e06c75', 'warning': '#e5c07b', '': ''}


def _style(label: Label, tone: str) -> None:
    color = _COLORS[tone]
    label.native.setStyleSheet(f'color: {color};' if color else '')


def _wrapped(label: Label, lines: int) -> None:
    # a word-wrapped label in a form row needs room for its lines
    label.native.setWordWrap(True)
    line = label.native.fontMetrics().lineSpacing()
    label.native.setMinimumHeight(int((lines + 0.5) * line))


class Diagnostics(Container):
    """How well the references can be told apart; two's avg/diff basis."""

    def __init__(self) -> None:
        super().__init__(
            widgets=[
                Label(name='diagnostics', label=' ', value=''),
                PushButton(
                    name='show_basis',
                    text='Show avg/diff basis',
                    tooltip='Add (A+B)/√2 and (A−B)/√2 as layers: only '
                    'pixels bright in the second tell a mix apart',
                ),
            ]
        )
        self.diagnostics.native.setWordWrap(True)
        self._described: tuple | None = None
        self.diagnostics.tooltip = (
            'How well the references can be told apart, before any fit. '
            'Two: the share of their energy in A−B, and the error of x per '
            'unit σ of white noise per pixel (in counts). More: the '
            'condition number of the design, the reference least unlike '
            'the others (the share of its energy outside their span) and '
            'the largest error of a share per unit σ'
        )

    def update_for(self, references, mask=None, *, names=None) -> None:
        """Describe in-memory references (and mask), or say nothing.

        Parameters
        ----------
        references : list of array_like or None
            The picked references' data; anything missing, repeated or not
            in memory (lazy data is read by the fit, not here) clears the
            text.
        mask : array_like, optional
        names : list of str, optional
            The references' layer names, to say which is least distinct.
        """
        arrays = _in_memory(references)
        names = list(names or [])
        self.show_basis.enabled = arrays is not None and len(arrays) == 2
        self.show_basis.visible = len(references) == 2
        mask = mask if isinstance(mask, np.ndarray) else None
        # napari asks for new choices on every layer event: say it again
        # only when the arrays change
        key = None if arrays is None else (*arrays, mask, *names)
        if _same(key, self._described):
            return
        self._described = key
        if arrays is None:
            self.diagnostics.value = ''
            return
        try:
            d = reference_diagnostics(*arrays, mask=mask)
        except (ValueError, TypeError) as err:
            self.diagnostics.value = str(err).splitlines()[0]
            _style(self.diagnostics, 'error')
            return
        text = _describe(d, names)
        if d['collinear']:
            text = (
                'The references are collinear: x cannot be measured. ' + text
            )
        elif d.get('nearly_collinear'):
            text = (
                'The references are nearly collinear: x is poorly known. '
                + text
            )
        self.diagnostics.value = text
        bad = d['collinear'] or d.get('nearly_collinear')
        _style(self.diagnostics, 'warning' if bad else '')


def _describe(d: dict, names: list) -> str:
    """Say in a line what :func:`reference_diagnostics` found."""
    if d['n_references'] == 2:
        return (
            f'The references differ in '
            f'{100 * d["diff_energy_fraction"]:.3g} % of their energy: x to '
            f'± {d["x_stderr_per_noise"]:.2g} σ'
        )
    unique = np.asarray(d['unique_energy_fraction'])
    k = int(np.argmin(unique))
    name = names[k] if k < len(names) and names[k] else f'reference {k + 1}'
    worst = float(np.max(d['fraction_stderr_per_noise']))
    return (
        f'condition number {d["condition_number"]:.3g}; least distinct: '
        f'"{name}" ({100 * unique[k]:.3g} % of its energy outside the '
        f"others' span); shares to ± {worst:.2g} σ"
    )


def _same(a: tuple | None, b: tuple | None) -> bool:
    """Tell whether two tuples hold the very same objects."""
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(
        x is y or (isinstance(x, str) and x == y) for x, y in zip(a, b)
    )


def _in_memory(references) -> list | None:
    """Return the reference arrays if all are picked, distinct, in memory."""
    if any(r is None for r in references):
        return None
    if len({id(r) for r in references}) < len(references):
        return None
    if not all(isinstance(r, np.ndarray) for r in references):
        return None
    return list(references)


class RunControls(Container):
    """Run and Cancel, the progress bar and the status line."""

    def __init__(self) -> None:
        run = PushButton(
            name='run',
            text='Run',
            tooltip='Fit every slice of the stack (in the background)',
        )
        cancel = PushButton(
            name='cancel',
            text='Cancel',
            enabled=False,
            tooltip='Stop the fit; nothing it made is kept',
        )
        super().__init__(
            widgets=[
                Container(
                    name='buttons',
                    label=' ',
                    layout='horizontal',
                    labels=False,
                    widgets=[run, cancel],
                ),
                ProgressBar(name='progress', value=0, min=0, max=1),
                Label(name='status', label=' ', value=''),
            ]
        )
        self.buttons.margins = (0, 0, 0, 0)
        self.progress.tooltip = 'Slices fitted so far'
        _wrapped(self.status, 3)

    @property
    def run(self) -> PushButton:
        """The Run button."""
        return self.buttons.run

    @property
    def cancel(self) -> PushButton:
        """The Cancel button."""
        return self.buttons.cancel

    def running(self, on: bool) -> None:
        """Enable Cancel while a fit runs, Run otherwise."""
        self.run.enabled = not on
        self.cancel.enabled = on
        if on:
            self.progress.max, self.progress.value = 1, 0

    def set_progress(self, done: int, total: int) -> None:
        """Show `done` of `total` slices."""
        self.progress.max = max(total, 1)
        self.progress.value = done

    def reset(self) -> None:
        """Empty the bar and the status line."""
        self.progress.max, self.progress.value = 1, 0
        self.show_status('')

    def show_status(self, text: str, *, tone: str = '') -> None:
        """Show the status; `tone` "error" or "warning" colours it."""
        self.status.value = text
        self.status.tooltip = text
        _style(self.status, tone)
