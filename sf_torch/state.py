"""The optimizers' ``state`` mapping, which counts its own changes.

``TrackedState`` is a ``defaultdict`` of per-param ``ParamState`` dicts; every change to it or
(for the dicts it creates) inside them adds one to its ``version``. A ``FusedPlan`` built at one
version is current while the version stays, so that its per-step check need not look into the
state dicts at all. Both pickle and copy as plain dicts, as torch's optimizer state does.
"""

from __future__ import annotations

from collections import defaultdict


class ParamState(dict):
    """One param's state dict inside a ``TrackedState``: every change to it counts in the
    owner's ``version``. Pickles and copies as a plain dict."""

    __slots__ = ("_owner",)

    def __init__(self, owner: TrackedState | None = None, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._owner = owner

    def _changed(self) -> None:
        if self._owner is not None:
            self._owner.version += 1

    def __reduce__(self):
        return (dict, (dict(self),))


class TrackedState(defaultdict):
    """The optimizers' ``state``: a ``defaultdict`` of per-param dicts that counts every change,
    to its entries and (for the ``ParamState`` dicts it creates) inside them, in ``version``.
    A plan built at one version is current while the version stays."""

    def __init__(self, items=()):
        super().__init__(self._new_entry)
        self.version = 0
        for key, value in dict(items).items():
            # Plain dicts from a checkpoint or a copy are taken in as tracked dicts.
            if type(value) is dict:
                value = ParamState(self, value)
            super().__setitem__(key, value)

    def _new_entry(self) -> ParamState:
        return ParamState(self)

    def __reduce__(self):
        return (type(self), (dict(self),))

    def __copy__(self):
        return type(self)(self)

    def _changed(self) -> None:
        self.version += 1


def _counting(cls, name):
    base = getattr(dict, name)

    def method(self, *args, **kwargs):
        self._changed()
        return base(self, *args, **kwargs)

    method.__name__ = name
    method.__qualname__ = f"{cls.__name__}.{name}"
    setattr(cls, name, method)


for _cls in (ParamState, TrackedState):
    for _name in (
        "__setitem__",
        "__delitem__",
        "__ior__",
        "clear",
        "pop",
        "popitem",
        "setdefault",
        "update",
    ):
        _counting(_cls, _name)


def tracked(state) -> TrackedState:
    """``state`` as a ``TrackedState`` (the same entries, plain dicts taken in as tracked
    ones; ``state`` itself when it already is one)."""
    if isinstance(state, TrackedState):
        return state
    return TrackedState(state)


def is_tracked(entry, state_map: TrackedState) -> bool:
    """Whether changes inside ``entry`` (a param's state dict) count in ``state_map``."""
    return type(entry) is ParamState and entry._owner is state_map
