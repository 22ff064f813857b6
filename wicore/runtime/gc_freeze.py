"""Keep the Python garbage collector's full collections off a run's clock.

A process that imports torch, pandas and Hydra holds a few hundred thousand container objects (module
functions, their tuples, dicts and closure cells) that live as long as the process. Every full
(generation-2) collection walks all of them: 150-190 ms each on this project's CPU VM, and
125-190 ms on an H100 machine, where a Gemma-3-1B run with 32 concurrent 1,024-token requests had three
decode steps of that length (steps 77, 173 and 249 on two machines; `benchmarks/gc_pauses.py` shows the
collections on the CPU). Serving processes freeze those objects once set-up is done: ``gc.freeze()`` moves
every tracked object into a permanent generation that collections skip, so a collection walks only what
the run itself allocated.

``frozen_gc()`` collects once, freezes, and unfreezes on exit (a process that runs several experiments,
such as the validation runner, then frees what the run left in reference cycles).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def frozen_gc(enabled: bool = True) -> Iterator[int]:
    """Within the block, collections skip every object that existed on entry; yields how many were frozen."""
    if not enabled:
        yield 0
        return
    gc.collect()
    gc.freeze()
    try:
        yield gc.get_freeze_count()
    finally:
        gc.unfreeze()
