"""Demo step: the backbone's mult-adds and parameters beside the paper's Table 6."""

from __future__ import annotations

from pathlib import Path

from mobilenets.backbone.profile import PAPER_IMAGENET_ROWS
from mobilenets.tasks.cli.demo.rows import DemoRow


def run_demo(root: Path, quick: bool) -> list[DemoRow]:
    """The profile step: the backbone's mult-adds and parameters beside Table 6/7's figures."""
    rows = []
    for row in PAPER_IMAGENET_ROWS:
        if row.table != 6:
            continue
        ours = row.ours()
        assert ours is not None  # Table 6 rows are all MobileNets
        rows.append(
            DemoRow(
                "profile",
                f"{row.model} MAdds / params",
                f"{ours.million_mult_adds:.0f}M / {ours.million_parameters:.2f}M",
                f"{row.mult_adds:.0f}M / {row.parameters:.1f}M",
            )
        )
    return rows
