"""The compiled request path reads fields of __slots__ classes (RouteMatch, RetryPolicy and its
compiled form, Endpoint) at their slot's offset once it has seen the type (``call_c.SlotRef``).
Whatever the object, the value (or exception) is getattr's: subclasses, unset slots, types
changed after they were learned, classes without slots or with their own attribute lookup,
types alternating."""

from __future__ import annotations

from importlib import import_module

import pytest


class Slotted:
    __slots__ = ("value", "other")

    def __init__(self, value=None):
        if value is not None:
            self.value = value


class Sub(Slotted):
    __slots__ = ("extra",)

    def __init__(self, value):
        super().__init__(value)
        self.extra = "x"


class Plain:
    def __init__(self, value):
        self.value = value


class Looked(Slotted):
    __slots__ = ()

    def __getattribute__(self, name):
        return "looked-" + name if name == "value" else object.__getattribute__(self, name)


def test_reads_equal_getattr(impl):
    probe = import_module(f"meshcore._fast.call_{impl}")._probe_slot
    objs = [Slotted(1), Sub(2), Plain(3), Looked(4), Slotted(5), Sub(6), Slotted(7)]
    for _ in range(3):  # learned, then read at the offset, types alternating
        assert [probe(o) for o in objs] == [1, 2, 3, "looked-value", 5, 6, 7]
    with pytest.raises(AttributeError):
        probe(Slotted())  # an unset slot
    with pytest.raises(AttributeError):
        probe(object())


def test_a_type_changed_after_it_was_learned(impl):
    probe = import_module(f"meshcore._fast.call_{impl}")._probe_slot

    class Changing:
        __slots__ = ("value",)

    o = Changing()
    o.value = "slot"
    assert probe(o) == probe(o) == "slot"
    descr = Changing.value
    Changing.value = property(lambda self: "property")  # the slot's descriptor replaced
    assert probe(o) == "property"
    Changing.value = descr
    assert probe(o) == "slot"
    del o.value
    with pytest.raises(AttributeError):
        probe(o)


class _Foreign:
    __slots__ = ("value",)


class _Borrower:
    """Another class's member descriptor put on this one: its ``__get__`` refuses this class's
    instances (TypeError), and its offset is not this class's slot."""

    __slots__ = ("other",)
    value = _Foreign.__dict__["value"]


def test_a_descriptor_of_another_class(impl):
    probe = import_module(f"meshcore._fast.call_{impl}")._probe_slot
    o = _Borrower()
    o.other = "not the value"
    for _ in range(3):  # (learned, then read again: never at the foreign descriptor's offset)
        with pytest.raises(TypeError):
            probe(o)
