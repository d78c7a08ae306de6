"""The attribute, geolocation and faces demo steps: their configs and the chance / no-skill baselines they print."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from mobilenets.configs import config_path
from mobilenets.datasets.s2cells import Partition
from mobilenets.tasks.cli.demo.attributes import attribute_configs, chance_mean_ap
from mobilenets.tasks.cli.demo.geolocation import no_skill_median_km
from mobilenets.tasks.cli.demo.recipe import OFFICIAL_WEIGHTS, shipped_config


def test_demo_configs_are_the_shipped_recipes_with_the_official_weights(tmp_path: Path) -> None:
    teacher, student = attribute_configs(tmp_path, tmp_path / "celeba", tmp_path / "unlabeled", quick=False)
    shipped = yaml.safe_load(config_path("attributes_distill_0.25_128").read_text())
    assert student["model"]["class_path"] == shipped["model"]["class_path"]
    # recipe values the demo does not override come from the YAML
    assert student["model"]["init_args"]["label_weight"] == shipped["model"]["init_args"]["label_weight"]
    assert student["model"]["init_args"]["optimizer"] == shipped["model"]["init_args"]["optimizer"]
    for config in (teacher, student):
        assert {k: config["model"]["init_args"][k] for k in OFFICIAL_WEIGHTS} == OFFICIAL_WEIGHTS
        assert config["data"]["init_args"]["root"] == str(tmp_path / "celeba")
    assert teacher["model"]["init_args"]["input_size"] > student["model"]["init_args"]["input_size"]


def test_an_unknown_recipe_names_the_shipped_ones() -> None:
    with pytest.raises(FileNotFoundError, match="no shipped config of that name.*attributes_teacher"):
        shipped_config("attributes_teacherr", {})


def test_chance_mean_ap_is_the_mean_share_of_positives() -> None:
    labels = np.array([[1, -1, -1], [-1, -1, -1], [1, 1, -1], [1, -1, -1]])
    # the third attribute has no positive: it has no AP and is left out, as AttributeMeanAP does
    assert chance_mean_ap(labels) == pytest.approx((0.75 + 0.25) / 2)


def test_no_skill_baseline_answers_the_most_frequent_cell(tmp_path: Path) -> None:
    partition = Partition(
        cell_ids=np.array([1, 2], dtype=np.uint64),
        levels=np.array([5, 5]),
        photos=np.array([3, 10]),
        lat=np.array([0.0, 10.0]),
        lon=np.array([0.0, 0.0]),
    )
    test_csv = tmp_path / "test.csv"
    test_csv.write_text("IMG_ID,LAT,LON\na.jpg,10.0,0.0\nb.jpg,11.0,0.0\nc.jpg,0.0,0.0\n")
    # distances from (10, 0): 0, 1 and 10 degrees of latitude; the median is one degree, ~111 km
    assert no_skill_median_km(partition, test_csv) == pytest.approx(111.2, abs=0.2)
