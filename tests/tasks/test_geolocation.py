import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from geographiclib.geodesic import Geodesic

from mobilenets.configs import CONFIG_DIR
from mobilenets.datasets.s2cells import Partition, PartitionError, build_partition
from mobilenets.datasets.synthetic.geotags import make_geotags
from mobilenets.tasks.cli import main as cli_main
from mobilenets.tasks.geolocation import (
    EARTH_RADIUS_KM,
    GeoClassifier,
    MedianDistance,
    WithinDistance,
    accuracy_at_distances,
    format_table11,
    haversine_km,
)

CONFIG = CONFIG_DIR / "planet_mobilenet.yaml"


def test_haversine_against_geographiclib_wgs84() -> None:
    rng = np.random.default_rng(0)
    n = 300
    lat1, lat2 = (np.degrees(np.arcsin(rng.uniform(-1, 1, n))) for _ in range(2))
    lon1, lon2 = rng.uniform(-180, 180, n), rng.uniform(-180, 180, n)
    # and short hops, across the antimeridian, and along meridians
    lat1 = np.concatenate([lat1, [10.0, 0.0, 45.0, -89.0]])
    lon1 = np.concatenate([lon1, [179.9, -179.95, 7.0, 0.0]])
    lat2 = np.concatenate([lat2, [10.01, 0.0, 46.0, 89.0]])
    lon2 = np.concatenate([lon2, [-179.9, 179.95, 7.0, 0.0]])
    ours = haversine_km(lat1, lon1, lat2, lon2)
    ellipsoid = np.array(
        [Geodesic.WGS84.Inverse(a, b, c, d)["s12"] / 1000 for a, b, c, d in zip(lat1, lon1, lat2, lon2)]
    )
    # a sphere of 6371 km against the WGS84 ellipsoid: within 0.6% (flattening is 0.34%)
    np.testing.assert_allclose(ours, ellipsoid, rtol=6e-3)
    assert ours[-3] == pytest.approx(EARTH_RADIUS_KM * np.radians(0.1), rel=1e-9)  # across ±180
    torch_result = haversine_km(*(torch.from_numpy(v) for v in (lat1, lon1, lat2, lon2)))
    np.testing.assert_allclose(torch_result.numpy(), ours, rtol=1e-12)
    assert haversine_km(0.0, 0.0, 0.0, 180.0) == pytest.approx(np.pi * EARTH_RADIUS_KM)


def test_distance_metrics_match_numpy() -> None:
    rng = np.random.default_rng(1)
    pred = torch.from_numpy(np.stack([rng.uniform(-60, 60, 50), rng.uniform(-180, 180, 50)], 1))
    true = pred + torch.from_numpy(rng.normal(0, 1, (50, 2)) * rng.choice([0.1, 2.0, 10.0], (50, 1)))
    true[:, 0] = true[:, 0].clamp(-90, 90)
    true[3] = float("nan")  # a photo without truth is skipped
    distances = haversine_km(pred[:, 0], pred[:, 1], true[:, 0], true[:, 1]).numpy()
    known = distances[~np.isnan(distances)]
    expected = accuracy_at_distances(known)
    for km in (25.0, 200.0, 750.0):
        metric = WithinDistance(km)
        metric.update(pred[:20], true[:20])
        metric.update(pred[20:], true[20:])
        assert metric.compute().item() == pytest.approx(expected[km])
        assert 0 < expected[km] < 1
    median = MedianDistance()
    median.update(pred, true)
    assert median.compute().item() == pytest.approx(np.median(known), rel=1e-6)
    table = format_table11(expected, 577.7, 13.2, 49)
    assert "Continent (2500 km)" in table and "79.3%" in table and "13.20" in table


def write_partition(tmp_path: Path) -> tuple[Path, Partition]:
    rng = np.random.default_rng(2)
    lat = np.concatenate([rng.normal(48.8, 0.2, 40), rng.normal(-33.9, 0.2, 30)])
    lon = np.concatenate([rng.normal(2.3, 0.2, 40), rng.normal(151.2, 0.2, 30)])
    partition = build_partition(lat, lon, max_photos=15, min_photos=3)
    path = tmp_path / "partition.csv"
    partition.write_csv(path)
    return path, partition


def test_classes_come_from_the_partition_file(tmp_path) -> None:
    path, partition = write_partition(tmp_path)
    model = GeoClassifier(partition=str(path), width_mult=0.25, input_size=32)
    assert model.num_cells == len(partition) == model.backbone.classifier.out_features
    assert model.hparams.num_cells == len(partition)
    np.testing.assert_allclose(model.cell_centers.numpy(), partition.centers, atol=1e-6)  # CSV: 6 decimals
    assert model.cell_tokens() == partition.tokens
    located = model.eval().locate(torch.zeros(2, 3, 32, 32), k=3)
    assert located["latlon"].shape == (2, 3, 2)
    assert torch.all(located["probabilities"][:, :-1] >= located["probabilities"][:, 1:])
    assert "cells" in model.export_metadata() and partition.tokens[0] in model.export_metadata()["cells"]
    # num_cells alone sizes a shell (profiling) that refuses to fit without cell locations
    shell = GeoClassifier(partition=str(tmp_path / "absent.csv"), num_cells=7, width_mult=0.25, input_size=32)
    assert shell.backbone.classifier.out_features == 7 and not shell.has_cell_table
    with pytest.raises(PartitionError, match="absent.csv: partition file not found"):
        shell.setup("fit")
    with pytest.raises(PartitionError, match="absent.csv: partition file not found"):
        GeoClassifier(partition=str(tmp_path / "absent.csv"))


def test_profile_of_the_paper_config_gives_13m_parameters() -> None:
    from mobilenets.tasks.cli.profile import instantiate_model_from_config

    model = instantiate_model_from_config(CONFIG, {"weights": None})
    profile = model.profile()
    assert model.num_cells == 9750
    assert profile.million_parameters == pytest.approx(13.0, abs=0.5)
    assert profile.million_mult_adds == pytest.approx(580, rel=0.01)
    assert model.paper_figures() == (580.0, 13.0)


def test_geo_partition_command(tmp_path, capsys) -> None:
    tags = tmp_path / "train.csv"
    rng = np.random.default_rng(3)
    rows = [
        f"{k}.jpg,{a:.5f},{b:.5f}"
        for k, (a, b) in enumerate(zip(rng.normal(40, 1, 200), rng.normal(-3, 1, 200)))
    ]
    tags.write_text("IMG_ID,LAT,LON\n" + "\n".join(rows) + "\nbad.jpg,95,0\n")
    out = tmp_path / "cells.csv"
    assert (
        cli_main(
            ["geo", "partition", str(tags), "--out", str(out), "--max-photos", "50", "--min-photos", "5"]
        )
        == 2
    )
    assert "line 202: latitude 95.0 outside" in capsys.readouterr().err
    args = ["geo", "partition", str(tags), "--out", str(out), "--max-photos", "50", "--min-photos", "5"]
    assert cli_main([*args, "--skip-invalid-rows"]) == 0
    partition = Partition.read_csv(out)
    assert partition.photos.max() <= 50 and partition.photos.min() >= 5
    assert out.with_suffix(".geojson").is_file()
    assert "1 invalid rows skipped" in capsys.readouterr().out


@pytest.mark.slow
def test_fit_test_predict_through_the_cli(tmp_path, capsys) -> None:
    data = make_geotags(
        tmp_path / "data",
        num_regions=3,
        train_per_region=8,
        val_per_region=2,
        test_per_region=3,
        image_size=32,
    )
    partition_csv = tmp_path / "partition.csv"
    assert (
        cli_main(
            [
                "geo",
                "partition",
                str(data.train_csv),
                "--out",
                str(partition_csv),
                "--max-photos",
                "8",
                "--min-photos",
                "2",
            ]
        )
        == 0
    )
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 1,
            "accelerator": "cpu",
            "default_root_dir": str(tmp_path / "runs"),
            "enable_model_summary": False,
            "enable_progress_bar": False,
            "logger": {
                "class_path": "pytorch_lightning.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path / "runs")},
            },
        },
        "model": {
            "class_path": "mobilenets.tasks.geolocation.GeoClassifier",
            "init_args": {
                "partition": str(partition_csv),
                "width_mult": 0.25,
                "input_size": 32,
                "top_k": 2,
                "optimizer": "adamw",
                "lr": 0.003,
            },
        },
        "data": {
            "class_path": "mobilenets.datasets.geotags.GeotagDataModule",
            "init_args": {
                "partition": str(partition_csv),
                "train_csv": str(data.train_csv),
                "val_csv": str(data.val_csv),
                "test_csv": str(data.test_csv),
                "predict_csv": str(data.test_csv),
                "image_root": str(data.image_root),
                "batch_size": 8,
            },
        },
    }
    config_path = tmp_path / "geo.yaml"
    config_path.write_text(yaml.safe_dump(config))
    assert cli_main(["fit", "--config", str(config_path)]) == 0
    checkpoints = sorted((tmp_path / "runs").rglob("*.ckpt"))
    assert checkpoints
    capsys.readouterr()
    assert cli_main(["test", "--config", str(config_path), "--ckpt_path", str(checkpoints[-1])]) == 0
    printed = capsys.readouterr().out
    assert "Table 11" in printed and "Street (1 km)" in printed and "Million parameters" in printed
    assert list((tmp_path / "runs").rglob("accuracy_vs_distance.png"))

    assert cli_main(["predict", "--config", str(config_path), "--ckpt_path", str(checkpoints[-1])]) == 0
    predictions = sorted((tmp_path / "runs").rglob("predictions.csv"))
    assert predictions and list((tmp_path / "runs").rglob("predictions_map.png"))
    with predictions[-1].open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 9
    assert {"image", "lat", "lon", "cell", "probability", "cell_2", "error_km"} <= set(rows[0])
    cells = Partition.read_csv(partition_csv)
    assert {row["cell"] for row in rows} <= set(cells.tokens)
    assert all(0 < float(row["probability"]) <= 1 for row in rows)

    # a checkpoint predicts without the partition file: the cell table travels in its buffers
    partition_csv.rename(tmp_path / "moved.csv")
    model = GeoClassifier.load_task(checkpoints[-1])
    assert model.has_cell_table and model.num_cells == len(cells)
