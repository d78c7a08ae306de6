"""The demo's summary rows."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DemoRow:
    """One line of the demo's summary: a task, what was measured, our value, the paper's (if any), and the
    baseline the value is to be read against (chance, or a no-skill predictor's value) where there is one."""

    task: str
    metric: str
    value: str
    paper: str = ""
    baseline: str = ""
