"""The fair queue: waiting requests by owner (a browser session, an API key), taken in turns.

One rule, ``fair_order``, decides both which request runs next and the positions shown to those
waiting: owners take turns round-robin, and when the model batches an owner with nothing running
goes first (the requests taken before it count as running, since they join the batch while the
others go on). So a shown position is the order requests are really taken in.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Mapping

from loadstar.engine.generation.handle import GenerationHandle


def fair_order(
    waiting: Mapping[str, Iterable[GenerationHandle]], running: Iterable[str], *, batching: bool,
) -> Iterator[GenerationHandle]:
    """Waiting handles in the order they are taken, given the owners with a request running now.

    Owners take turns (an owner who had one taken goes to the back of the line); an owner with
    nothing running goes before one who has. With ``batching``, each taken request stays running
    while the next is taken; otherwise it has ended by then.
    """
    lines = OrderedDict((owner, deque(jobs)) for owner, jobs in waiting.items() if jobs)
    busy = set(running)
    while lines:
        owner = next((o for o in lines if o not in busy), next(iter(lines)))
        jobs = lines.pop(owner)
        yield jobs.popleft()
        if jobs:
            lines[owner] = jobs
        if batching:
            busy.add(owner)
        else:
            busy.clear()


class FairQueue:
    """Waiting and running requests under one condition (``cond``, shared with the service).

    Each request has a lane (``handle.lane``: the model it goes to); owners take turns within a
    lane, and each lane is served on its own, so positions are counted per lane."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self._waiting: OrderedDict[str, deque[GenerationHandle]] = OrderedDict()
        self._running: dict[int, GenerationHandle] = {}
        self.batching: dict[str, bool] = {}  # lane -> whether its model batches (positions follow its rule)

    # Callers hold ``cond`` for all of these.

    def put(self, handle: GenerationHandle) -> None:
        self._waiting.setdefault(handle.owner, deque()).append(handle)

    def remove(self, handle: GenerationHandle) -> bool:
        """Drop a waiting handle; False when it is not waiting (it runs, or has ended)."""
        jobs = self._waiting.get(handle.owner)
        if jobs is None or handle not in jobs:
            return False
        jobs.remove(handle)
        if not jobs:
            del self._waiting[handle.owner]
        return True

    def take(self, lane: str) -> GenerationHandle | None:
        """The next handle of ``lane`` by ``fair_order``, now running; None when none waits there."""
        running = {h.owner for h in self._running.values() if h.lane == lane}
        handle = next(fair_order(self._in_lane(lane), running, batching=True), None)
        if handle is None:
            return None
        jobs = self._waiting.pop(handle.owner)
        jobs.remove(handle)
        if jobs:  # this owner goes to the back of the line
            self._waiting[handle.owner] = jobs
        self._running[handle.id] = handle
        return handle

    def done(self, handle: GenerationHandle) -> None:
        self._running.pop(handle.id, None)

    def order(self) -> list[list[GenerationHandle]]:
        """Each lane's waiting handles in the order they will run (for their positions)."""
        lines = []
        for lane in dict.fromkeys(h.lane for jobs in self._waiting.values() for h in jobs):
            batching = self.batching.get(lane, False)
            running = {h.owner for h in self._running.values() if h.lane == lane} if batching else set()
            lines.append(list(fair_order(self._in_lane(lane), running, batching=batching)))
        return lines

    def waiting(self, owner: str | None = None, lane: str | None = None) -> list[GenerationHandle]:
        handles = list(self._waiting.get(owner, ())) if owner is not None else [h for jobs in self._waiting.values() for h in jobs]
        return [h for h in handles if lane is None or h.lane == lane]

    def running(self) -> list[GenerationHandle]:
        return list(self._running.values())

    def _in_lane(self, lane: str) -> dict[str, list[GenerationHandle]]:
        return {owner: [h for h in jobs if h.lane == lane] for owner, jobs in self._waiting.items()}
