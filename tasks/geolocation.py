"""PlaNet on a MobileNet body (paper Table 11): photo geolocation as classification over adaptive S2 cells,
evaluated by the great-circle distance between the predicted and the true location."""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities import dim_zero_cat

from mobilenets.backbone.profile import count_mult_adds, count_parameters
from mobilenets.datasets.atomic import write_text_atomic
from mobilenets.datasets.s2cells import Partition, PartitionError, cell_token, token_to_cell_id
from mobilenets.tasks.base import BaseTask, Stage, TaskHead
from mobilenets.tasks.deploy.metadata import ExportMetadata
from mobilenets.tasks.deploy.onnx_network import ExportMismatchError
from mobilenets.tasks.distributed import gather_objects
from mobilenets.tasks.figures import pyplot, save_figure
from mobilenets.tasks.paper import TABLE11_SCALES, PaperRow, mobilenet_row, table_row
from mobilenets.tasks.prediction_files import merge_predict_shards, predict_output_path

log = logging.getLogger(__name__)

EARTH_RADIUS_KM = 6371.0
#: Table 11's rows (``tasks/paper.py``): the share of photos within each scale's distance.
IM2GPS_ROW: PaperRow = table_row(11, "Im2GPS")
PLANET_ROW: PaperRow = table_row(11, "PlaNet")
PLANET_MOBILENET_ROW: PaperRow = table_row(11, "PlaNet MobileNet")
#: A view of Table 11 by scale for the demo: (name, kilometres, Im2GPS %, PlaNet %, PlaNet MobileNet %).
PAPER_TABLE11: tuple[tuple[str, float, float, float, float], ...] = tuple(
    (scale, km, IM2GPS_ROW.value(scale), PLANET_ROW.value(scale), PLANET_MOBILENET_ROW.value(scale))
    for scale, km in TABLE11_SCALES
)
DISTANCE_THRESHOLDS_KM: tuple[float, ...] = tuple(sorted(km for _, km in TABLE11_SCALES))
IM2GPS_TEST_PHOTOS = 237


def haversine_km(lat1: Any, lon1: Any, lat2: Any, lon2: Any) -> Any:
    """Great-circle distance in km on a sphere of radius 6371 km; numpy arrays or torch tensors (degrees)."""
    if isinstance(lat1, torch.Tensor):
        rad, sin, cos, asin, sqrt = torch.deg2rad, torch.sin, torch.cos, torch.asin, torch.sqrt

        def clip(x: torch.Tensor) -> torch.Tensor:
            return x.clamp(0.0, 1.0)
    else:
        rad, sin, cos, asin, sqrt = np.deg2rad, np.sin, np.cos, np.arcsin, np.sqrt

        def clip(x: np.ndarray) -> np.ndarray:
            return np.clip(x, 0.0, 1.0)

    phi1, phi2 = rad(lat1), rad(lat2)
    a = sin((phi2 - phi1) / 2) ** 2 + cos(phi1) * cos(phi2) * sin(rad(lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * asin(sqrt(clip(a)))


def latlon_distance_km(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Distances between rows of (N, 2) latitude/longitude tensors, in float64."""
    pred, target = pred.double(), target.double()
    return haversine_km(pred[:, 0], pred[:, 1], target[:, 0], target[:, 1])


class WithinDistance(Metric):
    """Share of photos whose predicted location is within ``km`` of the true one (rows without truth skipped)."""

    full_state_update = False

    def __init__(self, km: float) -> None:
        super().__init__()
        self.km = km
        self.add_state("within", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        distance = latlon_distance_km(pred, target)
        known = ~torch.isnan(distance)
        self.within += (distance[known] <= self.km).sum()
        self.total += known.sum()

    def compute(self) -> torch.Tensor:
        return self.within.float() / self.total.clamp(min=1)


class MedianDistance(Metric):
    """Median great-circle error in km."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("distances", [], dist_reduce_fx="cat")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        distance = latlon_distance_km(pred, target)
        self.distances.append(distance[~torch.isnan(distance)])

    def compute(self) -> torch.Tensor:
        # a list of batches, or after the DDP sync one tensor of every process's distances
        distances = dim_zero_cat(self.distances) if len(self.distances) else torch.zeros(0)
        return distances.median() if distances.numel() else torch.tensor(float("nan"))


def km_label(km: float) -> str:
    return f"{km:g}km"


def accuracy_at_distances(
    distances_km: np.ndarray, thresholds: Sequence[float] = DISTANCE_THRESHOLDS_KM
) -> dict:
    """Share within each threshold (keyed by km) plus ``median`` (km) of an array of errors."""
    distances_km = np.asarray(distances_km, dtype=np.float64)
    result: dict[Any, float] = {
        km: float(np.mean(distances_km <= km)) if distances_km.size else math.nan for km in thresholds
    }
    result["median"] = float(np.median(distances_km)) if distances_km.size else math.nan
    return result


def format_table11(
    ours: dict, million_mult_adds: float, million_parameters: float, num_photos: int, name: str = "ours"
) -> str:
    """Table 11's layout: Im2GPS, PlaNet and PlaNet MobileNet as printed in the paper, ours beside them."""
    lines = [
        "Table 11: PlaNet on Im2GPS, share of test photos within each distance",
        f"{'Scale':<22}{'Im2GPS':>9}{'PlaNet':>9}{'PlaNet MobileNet':>18}{name:>12}",
    ]
    for scale, km in TABLE11_SCALES:
        value = ours.get(km, math.nan)
        im2gps, planet, planet_mobilenet = (
            row.value(scale) for row in (IM2GPS_ROW, PLANET_ROW, PLANET_MOBILENET_ROW)
        )
        lines.append(
            f"{f'{scale} ({km:g} km)':<22}{im2gps:>8.1f}%{planet:>8.1f}%{planet_mobilenet:>17.1f}%{100 * value:>11.1f}%"
        )
    lines += [
        f"{'Median error (km)':<22}{'-':>9}{'-':>9}{'-':>18}{ours.get('median', math.nan):>12.0f}",
        f"{'Million mult-adds':<22}{'-':>9}{PLANET_ROW.million_mult_adds:>9.0f}"
        f"{PLANET_MOBILENET_ROW.million_mult_adds:>18.0f}{million_mult_adds:>12.1f}",
        f"{'Million parameters':<22}{'-':>9}{PLANET_ROW.million_parameters:>9.0f}"
        f"{PLANET_MOBILENET_ROW.million_parameters:>18.0f}{million_parameters:>12.2f}",
        f"{'Test photos':<22}{IM2GPS_TEST_PHOTOS:>9}{IM2GPS_TEST_PHOTOS:>9}{IM2GPS_TEST_PHOTOS:>18}{num_photos:>12}",
    ]
    return "\n".join(lines)


def plot_accuracy_vs_distance(distances_km: np.ndarray, path: Path, title: str = "") -> None:
    """Share of photos within d km against d (log scale), with Table 11's paper points for reference."""
    plt = pyplot()
    distances_km = np.sort(np.asarray(distances_km, dtype=np.float64))
    grid = np.logspace(-1, math.log10(20_038), 300)  # up to half the Earth's circumference
    share = np.searchsorted(distances_km, grid, side="right") / max(distances_km.size, 1)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(grid, 100 * share, label=f"ours ({distances_km.size} photos)", color="tab:blue")
    kms = [km for _, km in TABLE11_SCALES]
    for row, style, colour in (
        (PLANET_MOBILENET_ROW, "o--", "tab:orange"),
        (PLANET_ROW, "s:", "tab:green"),
        (IM2GPS_ROW, "^:", "tab:gray"),
    ):
        ax.plot(kms, [share for _, share in row.metrics], style, color=colour, label=f"{row.model} (paper)")
    for scale, km in TABLE11_SCALES:
        ax.axvline(km, color="0.85", lw=0.8, zorder=0)
        ax.text(km, 101, scale.lower(), ha="center", va="bottom", fontsize=7, color="0.4")
    ax.set_xscale("log")
    ax.set_xlim(grid[0], grid[-1])
    ax.set_ylim(0, 100)
    ax.set_xlabel("distance from the true location (km)")
    ax.set_ylabel("photos located within that distance (%)")
    ax.legend(loc="upper left", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9, pad=14)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def plot_world_map(
    pred_latlon: np.ndarray,
    path: Path,
    true_latlon: np.ndarray | None = None,
    probabilities: np.ndarray | None = None,
    cell_centers: np.ndarray | None = None,
    title: str = "",
) -> None:
    """Predictions on a plain longitude/latitude plot with a graticule (no map data needed).

    Cell centres (the classes) are drawn as grey dots, predictions coloured by probability, and where the
    truth is known a line joins each true location to its prediction.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 5.2))
    if cell_centers is not None and len(cell_centers):
        ax.scatter(cell_centers[:, 1], cell_centers[:, 0], s=3, color="0.75", label="cells (class locations)")
    if true_latlon is not None:
        known = ~np.isnan(true_latlon).any(axis=1)
        for (tlat, tlon), (plat, plon) in zip(true_latlon[known], pred_latlon[known]):
            if abs(tlon - plon) <= 180:  # a line across the antimeridian would cross the whole map
                ax.plot([tlon, plon], [tlat, plat], color="tab:red", lw=0.5, alpha=0.5)
        ax.scatter(
            true_latlon[known, 1], true_latlon[known, 0], s=10, marker="x", color="tab:red", label="true"
        )
    colours = probabilities if probabilities is not None else "tab:blue"
    points = ax.scatter(
        pred_latlon[:, 1],
        pred_latlon[:, 0],
        s=14,
        c=colours,
        cmap="viridis",
        vmin=0,
        vmax=1,
        label="predicted",
    )
    if probabilities is not None:
        fig.colorbar(points, ax=ax, fraction=0.025, pad=0.01, label="top-cell probability")
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_xticks(range(-180, 181, 30))
    ax.set_yticks(range(-90, 91, 30))
    ax.grid(True, color="0.85", lw=0.6)
    ax.set_aspect("equal")
    ax.set_xlabel("longitude (°)")
    ax.set_ylabel("latitude (°)")
    ax.legend(loc="lower left", fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


class GeoClassifier(BaseTask):
    """PlaNet: a MobileNet whose classes are the cells of an S2 partition; a photo's predicted location is
    the mean location of the training photos in its most probable cell.

    The number of classes comes from the partition file. The cell table (ids and locations) is also kept
    in buffers, so a checkpoint predicts without the partition file.

    Args:
        partition: the cell CSV written by ``mobilenets geo partition`` (its rows are the classes).
        num_cells: number of classes to build when no partition file exists: for ``mobilenets profile``
            (9,750 cells give the paper's 13 M parameters) or as an empty shell to load a checkpoint into.
            Ignored when the partition file exists. Fitting or testing without a cell table is an error.
        label_smoothing: cross-entropy label smoothing.
        top_k: cells (with probabilities and locations) written per image by ``predict``.
        world_map: also draw the predictions on a world map PNG.
        predictions_dir: folder of the prediction CSV/PNG (default: the run's log folder).
        **kwargs: the backbone and optimisation options of ``BaseTask``.
    """

    output_options = ("predictions_dir",)

    def __init__(
        self,
        partition: str | None = None,
        num_cells: int | None = None,
        label_smoothing: float = 0.0,
        top_k: int = 5,
        world_map: bool = True,
        predictions_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        table: Partition | None = None
        if partition is not None and Path(partition).is_file():
            table = Partition.read_csv(partition)
            if num_cells is not None and num_cells != len(table):
                log.info("num_cells=%d ignored: %s has %d cells", num_cells, partition, len(table))
            count = len(table)
        elif num_cells is not None:
            if num_cells < 1:
                raise ValueError(f"num_cells must be >= 1, got {num_cells}")
            count = num_cells
        elif partition is not None:
            raise PartitionError(
                f"{partition}: partition file not found (build it with 'mobilenets geo partition')"
            )
        else:
            raise PartitionError("GeoClassifier needs a partition file (or num_cells to profile a config)")
        self._partition_table = table
        self._num_cells = count
        super().__init__(**kwargs)
        # a rebuilt checkpoint (BaseTask.load_task) then knows its size even without the partition file
        self.hparams["num_cells"] = count
        self._test_distances: list[torch.Tensor] = []
        self._predictions: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ model
    def configure_models(self) -> None:
        self.backbone = self.build_backbone(num_classes=self._num_cells)
        table = self._partition_table
        centers = torch.full((self._num_cells, 2), float("nan"), dtype=torch.float64)
        ids = torch.zeros(self._num_cells, dtype=torch.int64)
        if table is not None:
            centers = torch.from_numpy(table.centers.astype(np.float64))
            ids = torch.from_numpy(table.cell_ids.view(np.int64).copy())  # uint64 bits kept in int64
        self.register_buffer("cell_centers", centers)
        self.register_buffer("cell_ids", ids)

    def configure_metrics(self) -> MetricCollection:
        """Accuracy within each Table 11 distance and the median error (BaseTask clones it per stage)."""
        metrics: dict[str, Metric] = {
            f"acc_{km_label(km)}": WithinDistance(km) for km in DISTANCE_THRESHOLDS_KM
        }
        metrics["median_km"] = MedianDistance()
        # compute groups would merge two thresholds whose states happen to match after the first batch
        return MetricCollection(metrics, compute_groups=False)

    @property
    def num_cells(self) -> int:
        return self._num_cells

    @property
    def has_cell_table(self) -> bool:
        return not bool(torch.isnan(self.cell_centers).any())

    def cell_tokens(self) -> list[str]:
        return [cell_token(c) for c in self.cell_ids.cpu().numpy().view(np.uint64).tolist()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def locate(self, images: torch.Tensor, k: int = 1) -> dict[str, torch.Tensor]:
        """Top-``k`` cells per image: ``cells`` (indices), ``probabilities``, ``latlon`` (B, k, 2)."""
        return self.top_cells(self.predict_network(images), k)

    def top_cells(self, logits: torch.Tensor, k: int = 1) -> dict[str, torch.Tensor]:
        """``locate`` from the network's cell logits."""
        probabilities = logits.softmax(dim=1)
        top = probabilities.topk(min(k, self._num_cells), dim=1)
        return {"cells": top.indices, "probabilities": top.values, "latlon": self.cell_centers[top.indices]}

    # ------------------------------------------------------------------ checks
    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate", "test", "predict") and not self.has_cell_table:
            raise PartitionError(
                f"{self.hparams.partition}: partition file not found; num_cells={self._num_cells} only sizes "
                "the model (profiling, loading a checkpoint) and gives the cells no locations"
            )
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_partition = getattr(datamodule, "partition", None)
        if isinstance(data_partition, Partition):
            ours = self.cell_ids.cpu().numpy().view(np.uint64)
            if data_partition.cell_ids.shape != ours.shape or not np.array_equal(
                data_partition.cell_ids, ours
            ):
                raise PartitionError(
                    f"the data's partition {data_partition.source} ({len(data_partition)} cells) is not the "
                    f"model's ({self._num_cells} cells from {self.hparams.partition}); use the same file for both"
                )

    # ------------------------------------------------------------------ steps
    def _shared_step(self, batch: Any, stage: Stage) -> torch.Tensor:
        return self.head_step(batch, self(batch["image"]), stage)

    def task_head(self) -> TaskHead:
        return self.classifier_head("cell_logits")

    def head_step(self, batch: Any, logits: torch.Tensor, stage: Stage) -> torch.Tensor:
        labels = batch["label"]
        known = labels >= 0
        batch_size = labels.shape[0]
        if known.any():
            loss = F.cross_entropy(
                logits, labels, ignore_index=-1, label_smoothing=self.hparams.label_smoothing
            )
        else:  # every photo outside the partition: no class to learn from, km metrics still count
            loss = logits.sum() * 0.0
        self.log(
            f"{stage}/loss",
            loss,
            on_step=stage == "train",
            on_epoch=True,
            prog_bar=True,
            batch_size=batch_size,
            sync_dist=stage != "train",  # DDP: averaged over the processes' shares of the photos
        )
        top_cell = logits.argmax(dim=1)
        if known.any():
            cell_accuracy = (top_cell[known] == labels[known]).float().mean()
            self.log(
                f"{stage}/cell_acc", cell_accuracy, on_epoch=True, on_step=False, batch_size=int(known.sum())
            )
        pred_latlon = self.cell_centers[top_cell]
        true_latlon = batch["latlon"].double()
        self.log_metrics(stage, pred_latlon, true_latlon, batch_size)
        if stage == "test":
            self._test_distances.append(latlon_distance_km(pred_latlon, true_latlon).detach().cpu())
        return loss

    def on_test_epoch_start(self) -> None:
        self._test_distances = []

    def on_test_epoch_end(self) -> None:
        distances = torch.cat(self._test_distances).numpy() if self._test_distances else np.zeros(0)
        # under DDP each process tested its share of the photos: the table is over all of them
        distances = np.concatenate(gather_objects(distances))
        distances = distances[~np.isnan(distances)]
        ours = accuracy_at_distances(distances)
        self.last_test_accuracy = ours
        out_dir = self._output_dir()  # on every process: the log dir is agreed on by a broadcast
        if not self.trainer.is_global_zero:
            return
        size = self.hparams.input_size
        # BaseTask.profile() feeds a CPU tensor; count on the model's own device
        mult_adds = count_mult_adds(self, torch.zeros(1, 3, size, size, device=self.device)) / 1e6
        parameters = count_parameters(self) / 1e6
        print(
            "\n" + format_table11(ours, mult_adds, parameters, int(distances.size)) + "\n",
            flush=True,
        )
        plot_accuracy_vs_distance(
            distances,
            out_dir / "accuracy_vs_distance.png",
            title=f"{self.hparams.width_mult:g} MobileNet-{self.hparams.input_size}, {self._num_cells} cells",
        )

    def _output_dir(self) -> Path:
        if self.hparams.predictions_dir:
            return Path(self.hparams.predictions_dir)
        trainer = self._trainer
        if trainer is None:
            return Path(".")
        return Path(trainer.log_dir or trainer.default_root_dir)

    # ------------------------------------------------------------------ prediction
    def adopt_export(self, path: Path, metadata: ExportMetadata, network: torch.nn.Module) -> None:
        """The export's cell table (metadata ``cells``) must be this task's; a task built from ``num_cells``
        alone, without a partition file, takes its cells from the export."""

        if "cells" not in metadata.properties:
            raise ExportMismatchError(f"{path}: metadata key 'cells' is missing (the export's cell table)")
        rows = list(csv.DictReader(io.StringIO(metadata.properties["cells"])))
        if len(rows) != self._num_cells:
            raise ExportMismatchError(
                f"{path}: metadata key 'cells': this config has {self._num_cells} cells "
                f"({self.hparams.partition or 'num_cells'}), the export has {len(rows)}"
            )
        try:
            tokens = [row["token"] for row in rows]
            cell_ids = [token_to_cell_id(token) for token in tokens]
            centers = [(float(row["lat"]), float(row["lon"])) for row in rows]
        except (KeyError, TypeError, ValueError) as error:
            raise ExportMismatchError(
                f"{path}: metadata key 'cells': expected the CSV 'class,token,lat,lon' of the export's cells "
                f"({type(error).__name__}: {error})"
            ) from error
        if self.has_cell_table:
            if tokens != self.cell_tokens():
                raise ExportMismatchError(
                    f"{path}: metadata key 'cells': the export's cells are not those of "
                    f"{self.hparams.partition}; use the partition file the model was trained with"
                )
            return  # the partition file's locations, not their 6-decimal copy in the metadata
        ids = np.array(cell_ids, dtype=np.uint64).view(np.int64)
        self.cell_ids.copy_(torch.from_numpy(ids))
        self.cell_centers.copy_(torch.tensor(centers, dtype=torch.float64))

    def on_predict_epoch_start(self) -> None:
        self._predictions = []

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self.head_predict(batch, self.predict_network(batch["image"]))

    def head_predict(self, batch: Any, logits: torch.Tensor) -> dict[str, Any]:
        located = self.top_cells(logits, self.hparams.top_k)
        # a plain image folder (a multi-task predict) has no coordinates: unknown truth, as in a geotag file
        truth = batch["latlon"] if "latlon" in batch else torch.full((len(logits), 2), float("nan"))
        result = {
            "path": list(batch["path"]),
            "cells": located["cells"].cpu(),
            "probabilities": located["probabilities"].float().cpu(),
            "latlon": located["latlon"].cpu(),
            "true_latlon": truth.double().cpu(),
        }
        self._predictions.append(result)
        return result

    def on_predict_epoch_end(self) -> None:
        if not self._predictions and self.trainer.world_size <= 1:
            return
        k = min(self.hparams.top_k, self._num_cells)
        paths = [p for batch in self._predictions for p in batch["path"]]
        cells = torch.cat([b["cells"] for b in self._predictions]).numpy() if paths else np.zeros((0, k), int)
        probabilities = (
            torch.cat([b["probabilities"] for b in self._predictions]).numpy() if paths else np.zeros((0, k))
        )
        latlon = torch.cat([b["latlon"] for b in self._predictions]).numpy() if paths else np.zeros((0, k, 2))
        truth = (
            torch.cat([b["true_latlon"] for b in self._predictions]).numpy() if paths else np.zeros((0, 2))
        )
        out_dir = self._output_dir()
        csv_path = predict_output_path(self.trainer, out_dir / "predictions.csv", "predictions.csv")
        # one header for every shard: the truth columns when any process's photos have coordinates
        has_truth = any(gather_objects(bool(not np.isnan(truth).all())))
        write_predictions_csv(
            csv_path, paths, cells, probabilities, latlon, truth, self.cell_tokens(), has_truth=has_truth
        )
        csv_path = merge_predict_shards(self.trainer, csv_path)  # DDP: the processes' shards become one file
        print(f"wrote {len(paths)} predictions to {csv_path}", flush=True)
        if self.trainer.world_size > 1 and self.hparams.world_map:  # the map shows every process's photos
            shares = gather_objects((latlon[:, :1], truth, probabilities[:, :1]))
            latlon, truth, probabilities = (np.concatenate([share[i] for share in shares]) for i in range(3))
        if self.hparams.world_map and self.trainer.is_global_zero and len(latlon):
            plot_world_map(
                latlon[:, 0],
                out_dir / "predictions_map.png",
                true_latlon=truth if not np.isnan(truth).all() else None,
                probabilities=probabilities[:, 0],
                cell_centers=self.cell_centers.cpu().numpy(),
                title=f"{len(latlon)} photos; top cell of {self._num_cells}",
            )

    # ------------------------------------------------------------------ reporting
    def paper_row(self) -> PaperRow | None:
        """PlaNet MobileNet's row of Table 11: a 1.0 MobileNet-224 body with a ~10 M final layer (about
        9,750 cells)."""
        return mobilenet_row(11, self.hparams.width_mult, self.hparams.input_size)

    def export_record(self) -> ExportMetadata:
        rows = io.StringIO()
        writer = csv.writer(rows, lineterminator="\n")
        writer.writerow(["class", "token", "lat", "lon"])
        for k, (token, (lat, lon)) in enumerate(zip(self.cell_tokens(), self.cell_centers.tolist())):
            writer.writerow([k, token, f"{lat:.6f}", f"{lon:.6f}"])
        return (
            super()
            .export_record()
            .with_properties(num_cells=str(self._num_cells), cells=rows.getvalue(), output="cell logits")
        )


def write_predictions_csv(
    path: Path,
    images: Sequence[str],
    cells: np.ndarray,
    probabilities: np.ndarray,
    latlon: np.ndarray,
    true_latlon: np.ndarray,
    tokens: Sequence[str],
    has_truth: bool | None = None,
) -> None:
    """``image,lat,lon,cell,probability`` (the top cell), then the other top-k cells, then the truth and the
    error in km where the input had coordinates (``has_truth``; default: where any row has them). Written
    atomically."""
    k = cells.shape[1]
    header = ["image", "lat", "lon", "cell", "probability"]
    for rank in range(2, k + 1):
        header += [f"cell_{rank}", f"probability_{rank}", f"lat_{rank}", f"lon_{rank}"]
    if has_truth is None:
        has_truth = not np.isnan(true_latlon).all()
    if has_truth:
        header += ["true_lat", "true_lon", "error_km"]
        errors = haversine_km(latlon[:, 0, 0], latlon[:, 0, 1], true_latlon[:, 0], true_latlon[:, 1])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for n, image in enumerate(images):
        row: list[Any] = [
            image,
            f"{latlon[n, 0, 0]:.6f}",
            f"{latlon[n, 0, 1]:.6f}",
            tokens[cells[n, 0]],
            f"{probabilities[n, 0]:.6f}",
        ]
        for rank in range(1, k):
            row += [
                tokens[cells[n, rank]],
                f"{probabilities[n, rank]:.6f}",
                f"{latlon[n, rank, 0]:.6f}",
                f"{latlon[n, rank, 1]:.6f}",
            ]
        if has_truth:
            row += [f"{true_latlon[n, 0]:.6f}", f"{true_latlon[n, 1]:.6f}", f"{errors[n]:.3f}"]
        writer.writerow(row)
    write_text_atomic(path, out.getvalue())
