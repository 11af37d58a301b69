"""Errors of the inference engine: each message names the input and says what is wrong."""

from __future__ import annotations


class InferenceError(ValueError):
    """An input the engine cannot work on (a 2D volume, an empty query, a head the bundle lacks)."""


class QueryError(InferenceError):
    """A text query that is empty or longer than the text tower reads."""


class Cancelled(RuntimeError):
    """Raised inside a running request when its caller asked to cancel it."""
