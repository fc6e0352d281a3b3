"""The registry of objects ops find by key: held weakly, with an error that says what went."""

import gc

import pytest
import torch

from qpass.ops.registry import Registry


class Held:
    pass


def test_objects_are_found_by_key_while_their_owner_keeps_them():
    registry = Registry("packed weight")
    value = Held()
    key = registry.register(value)
    assert registry[key] is value and key in registry
    assert registry.register(Held(), "mine") == "mine"
    assert registry.register(Held()) != key  # every key a new one


def test_a_deleted_object_is_gone_with_a_clear_error():
    registry = Registry("delayed-scaling state")
    key = registry.register(torch.nn.Linear(2, 2))  # nothing else holds it
    gc.collect()
    assert key not in registry
    message = r"delayed-scaling state .* no longer exists \(was its model deleted\?\)"
    with pytest.raises(RuntimeError, match=message):
        registry[key]
