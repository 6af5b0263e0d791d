"""Stop sequences, matched on the decoded text as it grows, across token boundaries (TGI keeps the stop text
in the output and reports finish_reason "stop_sequence")."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class StopMatcher:
    """Keeps the last `longest - 1` characters, so a stop string split over several deltas is still found."""

    stops: tuple[str, ...]
    tail: str = ""

    def push(self, delta: str) -> str | None:
        """Adds a text delta; returns the stop string it completes, if any."""
        if not delta or not self.stops:
            return None
        window = self.tail + delta
        for stop in self.stops:
            # only a match that ends inside the new delta is new: earlier ones would have stopped us before
            if stop in window[max(0, len(self.tail) - len(stop) + 1) :]:
                return stop
        keep = max(len(s) for s in self.stops) - 1
        self.tail = window[-keep:] if keep > 0 else ""
        return None
