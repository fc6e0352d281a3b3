"""Small frozen configs that travel inside graphs as the JSON of their fields' values.

Custom ops take strings, not objects: a :class:`~qpass.quantizer.Quantizer` or
:class:`~qpass.rotation.Rotation` is passed as ``to_json()`` and rebuilt (once per distinct
string) with ``from_json``, which keeps exported graphs self-describing.
"""

from __future__ import annotations

import functools
import json
from dataclasses import astuple


class JsonTuple:
    """A mixin for frozen dataclasses whose fields are JSON values (tuples come back as lists:
    ``__post_init__`` turns them back)."""

    def to_json(self) -> str:
        return self._json

    @functools.cached_property
    def _json(self) -> str:  # graphs and ops ask for it at every site and call
        return json.dumps(astuple(self))

    @classmethod
    @functools.lru_cache(maxsize=None)
    def from_json(cls, text: str):
        return cls(*json.loads(text))
