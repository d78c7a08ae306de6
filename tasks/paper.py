"""The paper's task tables (10–14) as printed, one row shape for all of them, and the lookups the tasks,
their reports and the demo read.

Each ``PaperRow`` is one model of one table: its metric column(s) in the table's order (percentages as
printed), its million mult-adds and million parameters, and, for a MobileNet this suite rebuilds, its width
multiplier α and input size. The ImageNet tables (4–9) live beside the backbone (``backbone/profile.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PaperRow:
    """One model's row of one of the paper's task tables.

    Args:
        table: the table's number (10–14).
        model: the model as the table prints it (Table 13: framework, resolution and backbone).
        metrics: (column, value) pairs in the table's order; values are percentages as printed.
        million_mult_adds: the mult-adds column in millions (Table 13's billions are converted), None
            where the paper gives none.
        million_parameters: the parameters column in millions, None where the paper gives none.
        width_mult, input_size: the MobileNet configuration of the row (None: not a MobileNet of this
            suite, e.g. Inception V3, FaceNet, the attribute teacher).
    """

    table: int
    model: str
    metrics: tuple[tuple[str, float], ...]
    million_mult_adds: float | None
    million_parameters: float | None
    width_mult: float | None = None
    input_size: int | None = None

    @property
    def metric(self) -> float:
        """The table's headline metric (its first metric column)."""
        return self.metrics[0][1]

    def value(self, column: str) -> float:
        """The value of the metric column ``column``."""
        for name, value in self.metrics:
            if name == column:
                return value
        raise KeyError(f"Table {self.table}, {self.model}: no column {column!r}")

    @property
    def figures(self) -> tuple[float, float] | None:
        """(million mult-adds, million parameters), when the paper gives both."""
        if self.million_mult_adds is None or self.million_parameters is None:
            return None
        return self.million_mult_adds, self.million_parameters


def _single(table: int, column: str, rows: Sequence[tuple]) -> tuple[PaperRow, ...]:
    """Rows of a table with one metric column: (model, value, M mult-adds, M params[, α, size])."""
    return tuple(
        PaperRow(table, model, ((column, value),), madds, params, *config)
        for model, value, madds, params, *config in rows
    )


#: Table 10: Stanford Dogs, top-1 %.
TABLE10 = _single(
    10,
    "top1",
    (
        ("Inception V3", 84.0, 5000.0, 23.2),
        ("1.0 MobileNet-224", 83.3, 569.0, 3.3, 1.0, 224),
        ("0.75 MobileNet-224", 81.9, 325.0, 1.9, 0.75, 224),
        ("1.0 MobileNet-192", 81.9, 418.0, 3.3, 1.0, 192),
        ("0.75 MobileNet-192", 80.5, 239.0, 1.9, 0.75, 192),
    ),
)

#: Table 11's scales: (name, kilometres), coarsest first; they are the columns of its rows.
TABLE11_SCALES: tuple[tuple[str, float], ...] = (
    ("Continent", 2500.0),
    ("Country", 750.0),
    ("Region", 200.0),
    ("City", 25.0),
    ("Street", 1.0),
)


def _table11(model: str, shares: Sequence[float], *rest: object) -> PaperRow:
    metrics = tuple((scale, share) for (scale, _), share in zip(TABLE11_SCALES, shares, strict=True))
    return PaperRow(11, model, metrics, *rest)  # type: ignore[arg-type]


#: Table 11: PlaNet on Im2GPS, share of test photos (%) within each scale's distance. PlaNet MobileNet:
#: a 1.0 MobileNet-224 body with a ~10 M final layer (about 9,750 cells); Im2GPS has no figures.
TABLE11 = (
    _table11("Im2GPS", (51.9, 35.4, 32.1, 21.9, 2.5), None, None),
    _table11("PlaNet", (77.6, 64.0, 51.1, 31.7, 11.0), 5740.0, 52.0),
    _table11("PlaNet MobileNet", (79.3, 60.3, 45.2, 31.7, 11.4), 580.0, 13.0, 1.0, 224),
)

#: Table 12: face attributes, mean AP %; the baseline is the teacher the students emulate.
TABLE12 = _single(
    12,
    "mean_ap",
    (
        ("1.0 MobileNet-224", 88.7, 568.0, 3.2, 1.0, 224),
        ("0.5 MobileNet-224", 88.1, 149.0, 0.8, 0.5, 224),
        ("0.25 MobileNet-224", 87.2, 45.0, 0.2, 0.25, 224),
        ("1.0 MobileNet-128", 88.1, 185.0, 3.2, 1.0, 128),
        ("0.5 MobileNet-128", 87.7, 48.0, 0.8, 0.5, 128),
        ("0.25 MobileNet-128", 86.4, 15.0, 0.2, 0.25, 128),
        ("Baseline (teacher)", 86.9, 1600.0, 7.5),
    ),
)

#: Table 13: COCO detection, mAP % (IoU 0.50:0.05:0.95); the paper prints billions of mult-adds.
TABLE13 = _single(
    13,
    "map",
    (
        ("SSD 300 deeplab-VGG", 21.1, 34_900.0, 33.1),
        ("SSD 300 Inception V2", 22.0, 3_800.0, 13.7),
        ("SSD 300 MobileNet", 19.3, 1_200.0, 6.8, 1.0, 300),
        ("Faster-RCNN 300 VGG", 22.9, 64_300.0, 138.5),
        ("Faster-RCNN 300 Inception V2", 15.4, 118_200.0, 13.3),
        ("Faster-RCNN 300 MobileNet", 16.4, 25_200.0, 6.1, 1.0, 300),
        ("Faster-RCNN 600 VGG", 25.7, 149_600.0, 138.5),
        ("Faster-RCNN 600 Inception V2", 21.9, 129_600.0, 13.3),
        ("Faster-RCNN 600 MobileNet", 19.8, 30_500.0, 6.1, 1.0, 600),
    ),
)

#: Table 14: face embeddings distilled from FaceNet, "1e-4 accuracy" % (VAL at FAR 1e-4). The paper prints
#: "0.75 MobileNet-128" twice; by its mult-adds the 166M row is α 0.75 at 160 px (Table 7-style counts give
#: 162M there, 104M at 128 px), so it is keyed to (0.75, 160) here.
TABLE14 = _single(
    14,
    "val_far_1e4",
    (
        ("FaceNet", 83.0, 1600.0, 7.5),
        ("1.0 MobileNet-160", 79.4, 286.0, 4.9, 1.0, 160),
        ("1.0 MobileNet-128", 78.3, 185.0, 5.5, 1.0, 128),
        ("0.75 MobileNet-128 (166M row)", 75.2, 166.0, 3.4, 0.75, 160),
        ("0.75 MobileNet-128", 72.5, 108.0, 3.8, 0.75, 128),
    ),
)

#: Every row of the task tables, by table number.
PAPER_TABLES: dict[int, tuple[PaperRow, ...]] = {
    10: TABLE10,
    11: TABLE11,
    12: TABLE12,
    13: TABLE13,
    14: TABLE14,
}


def paper_table(table: int) -> tuple[PaperRow, ...]:
    """The rows of Table ``table`` (10–14), in the paper's order."""
    try:
        return PAPER_TABLES[table]
    except KeyError:
        raise KeyError(f"no task table {table}; the task tables are {sorted(PAPER_TABLES)}") from None


def table_row(table: int, model: str) -> PaperRow:
    """The row of Table ``table`` whose model is ``model`` as printed."""
    for row in paper_table(table):
        if row.model == model:
            return row
    raise KeyError(f"Table {table} has no row {model!r}")


def mobilenet_row(table: int, width_mult: float, input_size: int) -> PaperRow | None:
    """The MobileNet row of Table ``table`` at this α and input size, if the paper prints one (Table 13
    has two rows at 300 px: look those up by ``table_row``)."""
    matches = [
        row
        for row in paper_table(table)
        if row.width_mult == float(width_mult) and row.input_size == int(input_size)
    ]
    if len(matches) > 1:
        raise KeyError(f"Table {table} has {len(matches)} rows at α {width_mult:g}, {input_size} px")
    return matches[0] if matches else None
