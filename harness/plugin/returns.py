"""What plugins hand back, checked where it crosses into the spine, so a plugin's mistake fails its cell with a
message naming the plugin, the Protocol and the value, instead of a stored wrong number or an ``AttributeError``
three calls later."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


class ContractError(TypeError):
    """A plugin returned something its kind's Protocol does not allow."""


def _shown(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def returned(value: object, expected: type[T], plugin: str, protocol: str, method: str) -> T:
    """``value`` when it is an ``expected``, else a ``ContractError`` naming who returned what."""
    if not isinstance(value, expected):
        raise ContractError(
            f"plugin {plugin!r}: {protocol}.{method} must return a saex {expected.__name__}, "
            f"got {type(value).__name__} {_shown(value)}"
        )
    return value


def metric_values(metric: str, found: object) -> dict[str, float]:
    """A metric's returned dict as key -> float (``metric``: how messages name it). Every value must be a real
    number (a Python or numpy float or int, not a bool, tensor or string); NaN and infinities pass through, and
    the results store keeps them as null with the reason (``details["absent_metrics"]``)."""
    if not isinstance(found, Mapping):
        raise ContractError(f"metric {metric} must return a dict of key -> float, got {type(found).__name__}")
    values = {}
    for key, value in found.items():
        if not isinstance(key, str):
            raise ContractError(f"metric {metric} returned the key {_shown(key)}; keys must be strings")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ContractError(
                f"metric {metric} returned {key!r} = {_shown(value)} ({type(value).__name__}); "
                "a metric value must be a float (call .item() on a one-element tensor)"
            )
        values[key] = float(value)
    return values
