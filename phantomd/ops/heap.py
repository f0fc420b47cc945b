"""What the garbage collector is told about phantomd's heap.

Startup leaves a large heap that lives as long as the process: Twisted,
cryptography, jwcrypto, prometheus_client, the configuration and the
token cache itself.  CPython's full collections walk all of it, and under a
stream of new tokens (every request introspects) they come often, because
each request's objects that outlive a young collection count towards the
next full one.  Measured on bench/run.py's scenario 3 (c64, one worker):
p99 26-28 ms with the walks, 8.0-8.6 ms without, and about 6 % less CPU
per request.

``settle`` is called once the listeners are up and after every reload
that applied: it collects what is garbage now (the previous configuration's
cycles, after a reload), then moves everything left to the collector's
permanent generation (``gc.freeze``), which full collections skip.  What
is frozen is still freed by reference counting when the last reference
goes; only a cycle among frozen objects waits for the next ``settle``.
"""

from __future__ import annotations

import gc


def settle() -> None:
    """Collect now, then leave everything alive out of later collections.

    A full collection, at startup and on reload only: 11-22 ms on a
    2-core test machine, with or without 100,000 cached tokens."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
