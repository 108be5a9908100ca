"""Stop strings over a token stream: found even when split across tokens, never shown then retracted.

Text that might be the beginning of a stop string is held back until the next piece decides:
either the stop string completes (the held text is dropped and generation stops) or it cannot
any more (the held text is released). So a client never sees a partial stop string that is then
taken back.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StopStringFilter:
    stops: tuple[str, ...]
    _held: str = ""
    stopped: bool = False
    matched: str | None = None  # the stop string that ended the reply

    def feed(self, text: str) -> str:
        """Take the next piece; return the text that is safe to show now."""
        if self.stopped:
            return ""
        buffer = self._held + text
        found = [(i, s) for s in self.stops if s and (i := buffer.find(s)) >= 0]
        if found:
            cut, self.matched = min(found)
            self.stopped = True
            self._held = ""
            return buffer[:cut]
        keep = self._longest_partial_suffix(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """At the end of generation: a held partial stop string was just text after all."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_partial_suffix(self, buffer: str) -> int:
        """Length of the longest end of ``buffer`` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:length]):
                    best = length
                    break
        return best
