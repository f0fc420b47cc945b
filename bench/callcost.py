"""What Python calls cost a cache hit: the most any restructuring could save.

    python bench/callcost.py [rounds=7] [n=20000]

Issue 14's cache-hit budget (3x nginx) leaves phantomd about 18.5 us of its
own Python per hit, where it spends about 29 (``bench/floor.py``).  If
that excess were calls between small parts, merging the parts would pay
for it.  This measures the bound on ``bench/missloop.py``'s hit loop:

1. the Python functions one hit enters (``sys.setprofile``), split into
   phantomd's, Twisted's and the rest;
2. what one more call costs inside that loop: the hit loop again with
   ``extra`` no-op calls added to each of the front's state changes
   (``FrontProtocol._to``, entered a fixed number of times per hit), the
   slope of CPU per request over calls added, best of ``rounds`` rounds;
3. their product: what the hit would save if every one of those calls
   were inlined, which no restructuring can beat.

It changes nothing in phantomd on disk: the extra calls are patched into
the imported class of this process only.
"""

from __future__ import annotations

import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from missloop import Loop  # noqa: E402
from phantomd.http import front  # noqa: E402

TOKEN = b"hit-token"
EXTRA = 20
"""No-op calls added per state change in the slope's second measurement."""


def _noop(a: object, b: object) -> object:
    return a


def _with_extra_calls(extra: int):
    """``FrontProtocol._to`` with ``extra`` no-op calls in front of it."""
    plain = front.FrontProtocol._to
    source = ("def _to(self, state):\n"
              + "    noop(self, state)\n" * extra
              + "    plain(self, state)\n")
    scope = {"noop": _noop, "plain": plain}
    exec(source, scope)
    return scope["_to"]


def _count_calls(loop: Loop) -> tuple[dict, int]:
    """The Python functions one hit enters, by where they live, and how
    often ``_to`` is among them."""
    where: dict = {"phantomd": 0, "twisted": 0, "other": 0}
    to_calls = [0]

    def profile(frame, event, arg):
        if event != "call":
            return
        path = frame.f_code.co_filename
        if "/phantomd/" in path:
            where["phantomd"] += 1
            if frame.f_code is front.FrontProtocol._to.__code__:
                to_calls[0] += 1
        elif "/twisted/" in path:
            where["twisted"] += 1
        elif not path.endswith("missloop.py"):
            where["other"] += 1

    sys.setprofile(profile)
    try:
        loop.one(TOKEN)
    finally:
        sys.setprofile(None)
    return where, to_calls[0]


def _hit_cost(rounds: int, n: int) -> float:
    """CPU us per hit on a fresh loop, best of ``rounds``."""
    loop = Loop()
    for i in range(2000):
        loop.one(b"warm-%d" % i)
    best = None
    for _ in range(rounds):
        gc.collect()
        t0 = time.process_time()
        for _ in range(n):
            loop.one(TOKEN)
        spent = time.process_time() - t0
        best = spent if best is None else min(best, spent)
    return best / n * 1e6


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
    loop = Loop()
    loop.one(TOKEN)
    loop.one(TOKEN)
    where, to_calls = _count_calls(loop)
    ours = where["phantomd"] + where["twisted"]
    plain = front.FrontProtocol._to
    costs = {}
    try:
        for extra in (0, EXTRA, 0, EXTRA):
            front.FrontProtocol._to = (_with_extra_calls(extra) if extra
                                       else plain)
            cost = _hit_cost(rounds, n)
            costs[extra] = min(costs.get(extra, cost), cost)
    finally:
        front.FrontProtocol._to = plain
    added = EXTRA * to_calls
    per_call_ns = (costs[EXTRA] - costs[0]) / added * 1000
    print("one hit enters %d Python functions: %d in phantomd, %d in "
          "Twisted, %d elsewhere" % (sum(where.values()), where["phantomd"],
                                     where["twisted"], where["other"]))
    print("hit: %.2f us; with %d more calls: %.2f us; %.0f ns per call"
          % (costs[0], added, costs[EXTRA], per_call_ns))
    print("inlining all %d calls of phantomd and Twisted would save at "
          "most %.1f us of the %.2f" % (ours, ours * per_call_ns / 1000,
                                         costs[0]))


if __name__ == "__main__":
    main()
