"""The ordered list of reference pickers: two by default, up to eight.

:class:`ReferenceList` is a magicgui value widget whose ``value`` is the
list of picked layers, in order.  Each row is a picker (named
``reference_1``, ``reference_2``, …) that never offers a layer an
earlier row holds, so that a layer cannot be picked twice; rows beyond
the second can be moved up or removed, and "add reference" grows the
list.  Which layers are offered at all is the caller's (a callable).
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence

from magicgui.widgets import ComboBox, Container, Label, PushButton
from magicgui.widgets.bases import ValuedContainerWidget

#: Fewest and most references the list holds.
MIN_REFERENCES, MAX_REFERENCES = 2, 8


def letter(i: int) -> str:
    """Return the letter of reference `i` (0-based): A, B, C and so on."""
    return string.ascii_uppercase[i]


def _same(a, b) -> bool:
    # napari hands plugins proxies of its layers: identity may not match
    return a is b or (a is not None and b is not None and a == b)


class _Row(Container):
    """One picker with its letter, a move-up and a remove button."""

    def __init__(self, i: int, owner: ReferenceList) -> None:
        widgets = [
            Label(name='letter', value=''),
            ComboBox(name='combo'),
            PushButton(name='move', text='↑'),
            PushButton(name='drop', text='×'),
        ]
        super().__init__(layout='horizontal', labels=False, widgets=widgets)
        self._letter, self.combo_box, self.up_button, self.remove_button = (
            widgets
        )
        self.margins = (0, 0, 0, 0)
        for button in (self.up_button, self.remove_button):
            button.native.setFixedWidth(28)
        height = self.combo_box.native.sizeHint().height()
        self.native.setMinimumHeight(height)
        metrics = self._letter.native.fontMetrics()
        self._letter.native.setFixedWidth(metrics.horizontalAdvance('W') + 6)
        self.number(i)
        self.combo_box.choices = lambda _w=None: owner.choices_for(self)
        self.combo_box.changed.connect(lambda _v=None: owner.row_changed(self))
        self.up_button.changed.connect(lambda _v=None: owner.move_up(self))
        self.remove_button.changed.connect(lambda _v=None: owner.remove(self))

    def number(self, i: int) -> None:
        """Name the row's picker after its place (0-based `i`)."""
        self.combo_box.name = f'reference_{i + 1}'
        self._letter.value = letter(i)
        self.combo_box.tooltip = (
            f'Reference {i + 1} ({letter(i)}): an image the shape of one '
            'slice' + ('; x is its share' if i == 0 else '')
        )
        self.up_button.tooltip = f'Move reference {i + 1} up, before {i}'
        self.remove_button.tooltip = f'Leave reference {i + 1} out'


class ReferenceList(ValuedContainerWidget):
    """Pickers for K ordered references (2 to 8), each layer at most once.

    Parameters
    ----------
    **kwargs
        Passed to magicgui's container (``name``, ``label``, ``tooltip``).

    Attributes
    ----------
    candidates : callable
        ``candidates()`` returns the layers that may be references, in
        the order to offer them (set it, then :meth:`reset_choices`).
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(labels=False, **kwargs)
        self.margins = (0, 0, 0, 0)
        self.candidates: Callable[[], list] = list
        # a short dock squeezes the rows over each other otherwise
        from qtpy.QtWidgets import QSizePolicy

        self.native.setSizePolicy(
            QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum
        )
        self._quiet = False  # set while rows are being rearranged
        self._rows: list[_Row] = []
        self._add = PushButton(
            name='add_reference',
            text='+ add reference',
            tooltip='Fit one more reference image (up to '
            f'{MAX_REFERENCES}); the layers of the rows are each used once',
        )
        self._insert_widget(0, self._add)
        # a crowded dock squeezes a button in a nested list: not this one
        self._add.native.setMinimumHeight(self._add.native.sizeHint().height())
        self._add.changed.connect(lambda _v=None: self.add())
        for _ in range(MIN_REFERENCES):
            self._append_row()
        self._update_buttons()

    # -- rows -----------------------------------------------------------------

    @property
    def rows(self) -> list:
        """The pickers, in order."""
        return [row.combo_box for row in self._rows]

    def _append_row(self) -> _Row:
        row = _Row(len(self._rows), self)
        self._rows.append(row)
        self._insert_widget(len(self._rows) - 1, row)
        with self._quietly():
            row.combo_box.reset_choices()
        return row

    def _quietly(self):
        owner = self

        class _Quiet:
            def __enter__(self):
                self.was, owner._quiet = owner._quiet, True

            def __exit__(self, *_):
                owner._quiet = self.was

        return _Quiet()

    def _update_buttons(self) -> None:
        k = len(self._rows)
        more = k > MIN_REFERENCES
        for i, row in enumerate(self._rows):
            row.number(i)
            # two references look as they always did: two plain pickers
            row.up_button.visible = more and i > 0
            row.remove_button.visible = more
        self._add.enabled = k < MAX_REFERENCES

    def choices_for(self, row: _Row) -> list[tuple[str, object]]:
        """Return what a row may offer: no layer an earlier row holds."""
        i = self._rows.index(row) if row in self._rows else len(self._rows)
        taken = [r.combo_box.value for r in self._rows[:i]]
        return [
            (layer.name, layer)
            for layer in self.candidates()
            if not any(_same(layer, t) for t in taken)
        ]

    def _refresh(self, start: int = 0) -> None:
        """Offer each row from `start` on what the rows above leave."""
        with self._quietly():
            for row in self._rows[start:]:
                row.combo_box.reset_choices()

    def reset_choices(self, *_args) -> None:
        """Refresh every picker from the candidates, in order."""
        before = self.get_value()
        self._refresh()
        self._changed_if(before)

    def _changed_if(self, before: list) -> None:
        after = self.get_value()
        if len(after) != len(before) or not all(
            _same(a, b) for a, b in zip(after, before)
        ):
            self.changed.emit(after)

    # -- what the user does ---------------------------------------------

    def row_changed(self, row: _Row) -> None:
        """Offer the rows below a changed picker what it leaves."""
        if self._quiet or row not in self._rows:
            return
        self._refresh(self._rows.index(row) + 1)
        self.changed.emit(self.get_value())

    def add(self, layer=None) -> None:
        """Add a row (the first layer no row holds, or `layer`)."""
        if len(self._rows) >= MAX_REFERENCES:
            raise ValueError(
                f'at most {MAX_REFERENCES} references can be fitted'
            )
        row = self._append_row()
        if layer is not None:
            row.combo_box.value = layer
        self._update_buttons()
        self.changed.emit(self.get_value())

    def remove(self, row: _Row | int) -> None:
        """Remove a row (by index or row), keeping at least two."""
        if isinstance(row, int):
            row = self._rows[row]
        if len(self._rows) <= MIN_REFERENCES:
            raise ValueError(
                f'at least {MIN_REFERENCES} references are needed'
            )
        i = self._rows.index(row)
        self._pop_widget(i)
        self._rows.pop(i)
        self._update_buttons()
        self._refresh(i)
        self.changed.emit(self.get_value())

    def move_up(self, row: _Row | int) -> None:
        """Swap a row with the one above it."""
        if isinstance(row, int):
            row = self._rows[row]
        i = self._rows.index(row)
        if i == 0:
            return
        values = self.get_value()
        values[i - 1], values[i] = values[i], values[i - 1]
        self.set_value(values)

    # -- the value ------------------------------------------------------

    def get_value(self) -> list:
        """Return the picked layers in order (None where a row is empty)."""
        return [row.combo_box.value for row in self._rows]

    def set_value(self, value: Sequence) -> None:
        """Pick these layers, in order (2 to 8, each offered, distinct).

        Raises
        ------
        ValueError
            If there are too few or too many, or a layer is not offered
            (wrong shape, not an image, or picked twice).
        """
        value = list(value)
        k = len(value)
        if not MIN_REFERENCES <= k <= MAX_REFERENCES:
            raise ValueError(
                f'{k} references given; pick {MIN_REFERENCES} to '
                f'{MAX_REFERENCES}'
            )
        before = self.get_value()
        with self._quietly():
            while len(self._rows) > k:
                self._pop_widget(len(self._rows) - 1)
                self._rows.pop()
            while len(self._rows) < k:
                self._append_row()
            for i, (row, layer) in enumerate(zip(self._rows, value)):
                row.combo_box.reset_choices()
                if layer is None:
                    continue
                offered = [c for c in row.combo_box.choices if c is not None]
                if not any(_same(layer, c) for c in offered):
                    name = getattr(layer, 'name', layer)
                    raise ValueError(
                        f'"{name}" cannot be reference {i + 1}: it is not '
                        "an image of the slices' shape, or an earlier "
                        'reference already holds it'
                    )
                row.combo_box.value = layer
        self._update_buttons()
        self._changed_if(before)
