"""The front's own Prometheus metrics (TGI's tgi_request_* names, label source="http"), merged into Triton's.

tgi_llm exports families of the same names from inside the engine; one exposition may not repeat a family,
so the front's samples join Triton's block of that family (told apart by `source="http"`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tgi_backend.frontend.generation import Timing

DURATION_BUCKETS = tuple(1.5e-4 * 1.5**i for i in range(35))  # TGI's
COUNT_BUCKETS = tuple(float(2**i) for i in range(16))
LABEL = 'source="http"'
FAILURES = ("validation", "overloaded", "generation", "incomplete", "cancelled", "healthcheck", "template")


@dataclass(slots=True)
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def samples(self) -> list[str]:
        lines = [f'{self.name}_bucket{{{LABEL},le="{b:.6g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        lines.append(f'{self.name}_bucket{{{LABEL},le="+Inf"}} {self.count}')
        lines.append(f"{self.name}_sum{{{LABEL}}} {self.total:.9g}")
        lines.append(f"{self.name}_count{{{LABEL}}} {self.count}")
        return lines


class FrontMetrics:
    """Updated from the event loop only (no locks)."""

    def __init__(self) -> None:
        self.counters: dict[str, tuple[str, dict[str, int]]] = {
            "tgi_request_count": ("Requests received", {"": 0}),
            "tgi_request_success": ("Requests that ended with a finish reason", {"": 0}),
            "tgi_request_failure": ("Failed requests by err", {kind: 0 for kind in FAILURES}),
        }
        self.histograms = {
            h.name: h
            for h in (
                Histogram("tgi_request_duration", "End-to-end request duration, seconds", DURATION_BUCKETS),
                Histogram("tgi_request_inference_duration", "Time to the last token, seconds", DURATION_BUCKETS),
                Histogram("tgi_request_mean_time_per_token_duration", "Duration per generated token, seconds",
                          DURATION_BUCKETS),
                Histogram("tgi_request_input_length", "Prompt tokens per request", COUNT_BUCKETS),
                Histogram("tgi_request_generated_tokens", "Generated tokens per request", COUNT_BUCKETS),
                Histogram("tgi_request_max_new_tokens", "max_new_tokens per request", COUNT_BUCKETS),
            )
        }

    def request_started(self, max_new_tokens: int | None) -> None:
        self.counters["tgi_request_count"][1][""] += 1
        if isinstance(max_new_tokens, int):
            self.histograms["tgi_request_max_new_tokens"].observe(max_new_tokens)

    def request_ended(self, outcome: str, timing: "Timing", prompt_tokens: int, generated: int) -> None:
        if outcome != "success":
            kind = {"incomplete_generation": "incomplete", "template_error": "template"}.get(outcome, outcome)
            failures = self.counters["tgi_request_failure"][1]
            failures[kind] = failures.get(kind, 0) + 1
            return
        self.counters["tgi_request_success"][1][""] += 1
        total = (timing.end or timing.start) - timing.start
        self.histograms["tgi_request_duration"].observe(total)
        self.histograms["tgi_request_inference_duration"].observe(total)
        self.histograms["tgi_request_mean_time_per_token_duration"].observe(total / max(generated, 1))
        self.histograms["tgi_request_input_length"].observe(prompt_tokens)
        self.histograms["tgi_request_generated_tokens"].observe(generated)

    def families(self) -> dict[str, tuple[str, str, list[str]]]:
        """name -> (help, type, sample lines)."""
        out: dict[str, tuple[str, str, list[str]]] = {}
        for name, (text, values) in self.counters.items():
            lines = []
            for kind, value in values.items():
                labels = f'{LABEL},err="{kind}"' if kind else LABEL
                lines.append(f"{name}{{{labels}}} {value}")
            out[name] = (text, "counter", lines)
        for name, hist in self.histograms.items():
            out[name] = (hist.help, "histogram", hist.samples())
        return out

    def render(self, triton_text: str = "") -> str:
        """Triton's exposition with the front's samples merged in (same family: inside Triton's block)."""
        own = self.families()
        blocks = _split_families(triton_text)
        lines: list[str] = []
        for name, block in blocks:
            lines.extend(block)
            if name in own:
                lines.extend(own.pop(name)[2])
        for name, (text, kind, samples) in own.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *samples]
        return "\n".join(lines) + "\n"


_FAMILY = re.compile(r"^# (?:HELP|TYPE) (\S+)")


def _split_families(text: str) -> list[tuple[str, list[str]]]:
    """Exposition text -> [(family name, its lines)], in order; lines before any # HELP/TYPE keep name ""."""
    blocks: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _FAMILY.match(line)
        if match and (not blocks or blocks[-1][0] != match.group(1)):
            blocks.append((match.group(1), [line]))
        elif blocks:
            blocks[-1][1].append(line)
        else:
            blocks.append(("", [line]))
    return blocks
