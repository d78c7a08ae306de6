import pytest
from torch import nn

from mobilenets.backbone.profile import (
    PAPER_IMAGENET_ROWS,
    PAPER_TABLE3,
    agrees_with_paper,
    count_mult_adds,
    format_paper_tables,
    profile_backbone,
)

CHECKED_ROWS = [row for row in PAPER_IMAGENET_ROWS if row.checked and row.width_mult is not None]


@pytest.mark.parametrize("row", CHECKED_ROWS, ids=lambda r: f"table{r.table}-{r.model}")
def test_mult_adds_within_one_percent_of_the_paper(row) -> None:
    ours = row.ours()
    assert abs(ours.million_mult_adds - row.mult_adds) <= 0.01 * row.mult_adds


@pytest.mark.parametrize("row", CHECKED_ROWS, ids=lambda r: f"table{r.table}-{r.model}")
def test_parameters_agree_with_the_paper(row) -> None:
    assert agrees_with_paper(row.ours().million_parameters, row.parameters)


def test_named_rows_of_the_issue() -> None:
    base = profile_backbone(1.0, 224)
    assert round(base.million_mult_adds) == 569 and round(base.million_parameters, 1) == 4.2
    conv = profile_backbone(1.0, 224, full_conv=True)
    assert abs(conv.million_mult_adds - 4866) / 4866 < 0.01 and round(conv.million_parameters, 1) == 29.3
    shallow = profile_backbone(1.0, 224, shallow=True)
    assert abs(shallow.million_mult_adds - 307) / 307 < 0.01 and round(shallow.million_parameters, 1) == 2.9


@pytest.mark.parametrize("row", PAPER_TABLE3, ids=lambda r: r.model)
def test_table3_single_layer_rows(row) -> None:
    ours = row.ours()
    assert abs(ours.million_mult_adds - row.mult_adds) <= 0.01 * row.mult_adds
    assert agrees_with_paper(ours.million_parameters, row.parameters)


def test_agreement_rule_is_not_a_blank_cheque() -> None:
    assert agrees_with_paper(0.47, 0.5)  # printed with one decimal
    assert not agrees_with_paper(0.44, 0.5)
    assert not agrees_with_paper(575, 569)


def test_counting_a_layer_on_many_crops_counts_each_crop() -> None:
    import torch

    layer = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    one = count_mult_adds(layer, torch.zeros(1, 4, 10, 10))
    assert one == 10 * 10 * 8 * 4 * 9
    assert count_mult_adds(layer, torch.zeros(5, 4, 10, 10)) == one


def test_paper_tables_print_paper_ours_and_difference() -> None:
    text = format_paper_tables()
    for table in range(3, 10):
        assert f"Table {table}" in text
    assert "DIFFERS" not in text.split("Table 5")[0]
    conv_line = next(line for line in text.splitlines() if line.startswith("Conv MobileNet"))
    assert "4866" in conv_line and "+0.0%" in conv_line and conv_line.rstrip().endswith("ok")
