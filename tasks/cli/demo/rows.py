"""The demo's summary rows."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DemoRow:
    """One line of the demo's summary: a task, what was measured, our value and the paper's (if any)."""

    task: str
    metric: str
    value: str
    paper: str = ""
