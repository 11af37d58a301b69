"""A tiny Qt-free signal, so the library can report progress without depending on Qt.

The widget connects its slots to these; tests connect plain functions. Callbacks run in the thread
that emits, which is why the runner only emits from ``poll()`` (called on the GUI thread).
"""

from __future__ import annotations

from typing import Any, Callable


class Signal:
    """A list of callbacks called in connection order.

    >>> finished = Signal(); finished.connect(print); finished.emit("done")
    done
    """

    def __init__(self) -> None:
        self._slots: list[Callable[..., Any]] = []

    def connect(self, slot: Callable[..., Any]) -> None:
        if slot not in self._slots:
            self._slots.append(slot)

    def disconnect(self, slot: Callable[..., Any]) -> None:
        if slot in self._slots:
            self._slots.remove(slot)

    def emit(self, *args: Any) -> None:
        for slot in list(self._slots):
            slot(*args)
