"""The paper's task tables in one row shape, and the lookups the tasks and the demo read."""

from __future__ import annotations

import pytest

from mobilenets.tasks.paper import PAPER_TABLES, mobilenet_row, paper_table, table_row


def test_rows_are_found_by_model_and_by_mobilenet_configuration() -> None:
    dogs = mobilenet_row(10, 0.75, 192)
    assert dogs is not None and dogs.model == "0.75 MobileNet-192" and dogs.metric == 80.5
    assert dogs.figures == (239.0, 1.9) and mobilenet_row(10, 0.5, 224) is None
    assert table_row(12, "Baseline (teacher)").figures == (1600.0, 7.5)
    planet = table_row(11, "PlaNet MobileNet")
    assert planet.value("Street") == 11.4 and planet.metrics[0][0] == "Continent"
    assert table_row(11, "Im2GPS").figures is None
    # Table 13 prints billions of mult-adds; rows keep millions like every other table
    assert table_row(13, "Faster-RCNN 300 MobileNet").figures == (25200.0, 6.1)
    # the 166M row printed as "0.75 MobileNet-128" is the 160 px model
    assert mobilenet_row(14, 0.75, 160).million_mult_adds == 166.0
    with pytest.raises(KeyError, match="2 rows at α 1, 300 px"):
        mobilenet_row(13, 1.0, 300)
    with pytest.raises(KeyError, match="no task table 9"):
        paper_table(9)
    with pytest.raises(KeyError, match="Table 12 has no row 'Teacher'"):
        table_row(12, "Teacher")
    with pytest.raises(KeyError, match="no column 'Moon'"):
        planet.value("Moon")


def test_every_table_is_one_shape_and_the_old_views_read_it() -> None:
    from mobilenets.tasks.attributes import PAPER_BASELINE, PAPER_TABLE12
    from mobilenets.tasks.detection.coco_eval import PAPER_TABLE13
    from mobilenets.tasks.geolocation import PAPER_TABLE11

    assert sorted(PAPER_TABLES) == [10, 11, 12, 13, 14]
    assert all(row.table == number for number, rows in PAPER_TABLES.items() for row in rows)
    assert PAPER_TABLE12[(0.25, 128)] == (86.4, 15.0, 0.2) and PAPER_BASELINE == (86.9, 1600.0, 7.5)
    assert PAPER_TABLE11[1] == ("Country", 750.0, 35.4, 64.0, 60.3)
    assert PAPER_TABLE13 == {
        "SSD 300": (19.3, 1.2, 6.8),
        "Faster-RCNN 300": (16.4, 25.2, 6.1),
        "Faster-RCNN 600": (19.8, 30.5, 6.1),
    }
