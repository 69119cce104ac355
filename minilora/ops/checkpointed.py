"""Whether the code running is inside a gradient-checkpointed block.

There, what an autograd Function saves for backward is dropped after the forward and recomputed just before
the block's backward, so saving a large intermediate (a dequantized weight) keeps it only while that one
block's backward runs, and spares recomputing it a second time in backward. Outside such a block a save would
keep it alive from forward to backward, so Functions save it only where `saves_are_recomputed()`.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_state = threading.local()


@contextmanager
def checkpointed_block() -> Iterator[None]:
    """Mark the code run inside as a checkpointed block's forward (the first run and the recompute)."""
    outer = saves_are_recomputed()
    _state.active = True
    try:
        yield
    finally:
        _state.active = outer


def saves_are_recomputed() -> bool:
    return getattr(_state, "active", False)
