"""A component checked against its kind's Protocol when a plugin registers it, so a plugin that lacks an
attribute or method fails at load with its name, not cells later (an SAE class without ``name`` would train,
cache and only then fail to load). Members are read from the Protocol itself, so a member added to a Protocol
is checked without an edit here."""

from __future__ import annotations

import sys
import types
from collections.abc import Mapping
from typing import ClassVar, Literal, Protocol, Union, get_args, get_origin

from saex.plugin.protocols import SCOPE_METHODS, Metric

# Methods a Protocol declares of which a component needs only the one its attribute selects:
# Protocol -> (attribute, attribute value -> the method then required).
SELECTED_METHODS: dict[type, tuple[str, Mapping[str, str]]] = {Metric: ("scope", SCOPE_METHODS)}


def nonconformities(component: object, protocol: type) -> list[str]:
    """What ``component`` lacks or gets wrong against ``protocol``, one phrase per member; empty when it conforms."""
    attributes, methods = protocol_members(protocol)
    found = []
    for name, annotation in attributes.items():
        if not hasattr(component, name):
            found.append(f"attribute {name!r} is missing")
        elif annotation is not None and not _matches(getattr(component, name), annotation):
            found.append(f"attribute {name!r} must be {_describe(annotation)}, got {getattr(component, name)!r}")
    unselected = _unselected(component, protocol)
    for name in methods:
        if name not in unselected and not callable(getattr(component, name, None)):
            found.append(f"method {name!r} is missing")
    return found


def _unselected(component: object, protocol: type) -> set[str]:
    """The methods of ``SELECTED_METHODS`` that ``component``'s selecting attribute does not select."""
    attribute, selects = SELECTED_METHODS.get(protocol, ("", {}))
    value = getattr(component, attribute, None) if attribute else None
    return {method for choice, method in selects.items() if choice != value}


def protocol_members(protocol: type) -> tuple[dict[str, object | None], list[str]]:
    """(attribute -> its annotation evaluated, or None where it names something imported only for type
    checking, so that attribute is checked for presence only; method names) that ``protocol`` and its Protocol
    bases declare."""
    attributes: dict[str, object | None] = {}
    methods: list[str] = []
    for cls in reversed(protocol.__mro__):
        if cls is Protocol or not getattr(cls, "_is_protocol", False):
            continue
        namespace = vars(sys.modules[cls.__module__])
        for name, raw in vars(cls).get("__annotations__", {}).items():
            attributes[name] = _evaluated(raw, namespace)
        methods += [name for name, value in vars(cls).items() if callable(value) and not name.startswith("_")]
    return attributes, list(dict.fromkeys(methods))


def _evaluated(raw: object, namespace: dict[str, object]) -> object | None:
    """A (possibly string) annotation as a type, evaluated as ``typing.get_type_hints`` does but one at a time."""
    if not isinstance(raw, str):
        return raw
    try:
        return eval(raw, namespace)
    except NameError:
        return None


def _matches(value: object, annotation: object) -> bool:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return value in args
    if origin is type:
        return isinstance(value, type) and issubclass(value, args[0])
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is ClassVar:
        return _matches(value, args[0])
    try:
        return isinstance(value, origin or annotation)
    except TypeError:  # not checkable at runtime (Any, a non-runtime Protocol): presence is all we can check
        return True


def _describe(annotation: object) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is type:
        return f"a subclass of {args[0].__name__}"
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if isinstance(annotation, type):
        return f"a {annotation.__name__}"
    return str(annotation)
