"""A teacher network for distillation, loaded from any of three file formats, and its outputs over a
list of images computed once and cached on disk.

Shared tool of the distillation tasks (face attributes, face embeddings); not a task itself.

* ``TeacherInputs.of(teacher, size_option, task)``: what the teacher sees (the eval crop at the teacher's
  own size and normalisation, else the student's), the key that names it in the cache, and
  ``TeacherBatch``, which turns image paths into the teacher's input batch (in loader workers).

* ``Teacher.load(path)``: a TorchScript file (``.pt``, ``.ts``, ``.torchscript``), an ONNX file (``.onnx``,
  run by onnxruntime on the CPU) or a Lightning checkpoint of a mobilenets task (``.ckpt``, rebuilt with
  ``BaseTask.load_task`` and run through its ``export_module()``). Calling it maps an image batch
  (N, 3, H, W) to float outputs (N, D).
* ``cached_teacher_outputs(...)``: runs the teacher once over every image and keeps its outputs as a
  memory-mapped float32 ``.npy`` array beside a JSON list of the images. The file names hold the teacher's
  sha256 and a hash of the preprocessing key, the activation and the image list (paths, sizes, mtimes), so a
  changed teacher or preprocessing never reuses a stale cache. Both files are written under temporary
  names and renamed into place; the JSON is renamed last and is what marks a cache complete. Under DDP the
  processes share the work and process 0 writes the cache once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mobilenets.backbone.errors import MobilenetsError
from mobilenets.datasets.atomic import atomic_path
from mobilenets.datasets.images import load_rgb
from mobilenets.datasets.transforms import CROP_FRACTION, ClassificationTransform
from mobilenets.tasks.base import BaseTask, CheckpointError
from mobilenets.tasks.deploy.export import ExportError, parse_floats
from mobilenets.tasks.distributed import barrier, gather_objects, rank_and_world

log = logging.getLogger(__name__)

TORCHSCRIPT_SUFFIXES = frozenset({".pt", ".ts", ".torchscript", ".jit"})
ONNX_SUFFIXES = frozenset({".onnx"})
CHECKPOINT_SUFFIXES = frozenset({".ckpt"})
CACHE_FORMAT_VERSION = 1

Activation = Literal["none", "sigmoid"]


class TeacherError(MobilenetsError, ValueError):
    """A teacher file that cannot be loaded or gives unexpected outputs; the message names the file."""


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _parse_floats(text: str | None) -> tuple[float, ...] | None:
    """A foreign file's mean/std metadata, or None when it has none we can read."""
    if not text:
        return None
    try:
        return parse_floats(text, "mean/std")
    except ExportError:
        return None


class Teacher:
    """A frozen network that maps an image batch (N, 3, H, W) to float outputs (N, D).

    Attributes:
        path: the file it was loaded from.
        checksum: sha256 of that file (keys the output cache).
        input_size: the square input resolution it expects, when the file says so (else None).
        mean, std: the input normalisation it expects, when the file says so (else None).
        expected_outputs: D, checked on every call when given.
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor], Any],
        path: Path,
        checksum: str,
        input_size: int | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        expected_outputs: int | None = None,
        module: nn.Module | None = None,
    ) -> None:
        self._forward = forward
        self.path = Path(path)
        self.checksum = checksum
        self.input_size = input_size
        self.mean = mean
        self.std = std
        self.expected_outputs = expected_outputs
        self.module = module
        self.kind = "callable"

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: Path | str, expected_outputs: int | None = None) -> Teacher:
        """Load a TorchScript, ONNX or mobilenets-checkpoint teacher (chosen by the file suffix)."""
        path = Path(path)
        if not path.is_file():
            raise TeacherError(f"{path}: teacher file not found")
        suffix = path.suffix.lower()
        checksum = file_sha256(path)
        if suffix in TORCHSCRIPT_SUFFIXES:
            teacher = cls._load_torchscript(path, checksum)
        elif suffix in ONNX_SUFFIXES:
            teacher = cls._load_onnx(path, checksum)
        elif suffix in CHECKPOINT_SUFFIXES:
            teacher = cls._load_checkpoint(path, checksum)
        else:
            known = sorted(TORCHSCRIPT_SUFFIXES | ONNX_SUFFIXES | CHECKPOINT_SUFFIXES)
            raise TeacherError(f"{path}: unknown teacher format {suffix!r}; expected one of {known}")
        teacher.expected_outputs = expected_outputs
        return teacher

    @classmethod
    def _load_torchscript(cls, path: Path, checksum: str) -> Teacher:
        try:
            with warnings.catch_warnings():  # "torch.jit is deprecated": still the format users export
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(str(path), map_location="cpu")
        except Exception as error:
            raise TeacherError(
                f"{path}: cannot load as TorchScript ({type(error).__name__}: {error})"
            ) from error
        module.eval()
        teacher = cls(module, path, checksum, module=module)
        teacher.kind = "torchscript"
        return teacher

    @classmethod
    def _load_onnx(cls, path: Path, checksum: str) -> Teacher:
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as error:
            raise TeacherError(f"{path}: cannot load as ONNX ({type(error).__name__}: {error})") from error
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise TeacherError(f"{path}: an ONNX teacher must take one image input, it takes {len(inputs)}")
        input_name = inputs[0].name
        shape = inputs[0].shape
        metadata = session.get_modelmeta().custom_metadata_map or {}
        input_size: int | None = None
        if len(shape) == 4 and isinstance(shape[2], int) and shape[2] == shape[3]:
            input_size = shape[2]
        elif metadata.get("input_size", "").isdigit():
            input_size = int(metadata["input_size"])

        def forward(batch: torch.Tensor) -> np.ndarray:
            array = batch.detach().to("cpu", torch.float32).numpy()
            return session.run(None, {input_name: array})[0]

        teacher = cls(
            forward,
            path,
            checksum,
            input_size=input_size,
            mean=_parse_floats(metadata.get("mean")),
            std=_parse_floats(metadata.get("std")),
        )
        teacher.kind = "onnx"
        return teacher

    @classmethod
    def _load_checkpoint(cls, path: Path, checksum: str) -> Teacher:

        try:
            task = BaseTask.load_task(path)
        except CheckpointError as error:
            raise TeacherError(str(error)) from error
        module = task.export_module().eval()
        mean, std = task.normalization
        teacher = cls(
            module,
            path,
            checksum,
            input_size=int(task.hparams.input_size),
            mean=tuple(mean),
            std=tuple(std),
            module=module,
        )
        teacher.kind = "checkpoint"
        return teacher

    # ----------------------------------------------------------------- running
    def to(self, device: torch.device | str) -> Teacher:
        """Move a torch teacher to ``device`` (ONNX teachers always run on the CPU)."""
        if self.module is not None:
            self.module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        if self.module is not None:
            for tensor in (*self.module.parameters(), *self.module.buffers()):
                return tensor.device
        return torch.device("cpu")

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Float outputs (N, D) on the batch's device."""
        outputs = self._forward(batch.to(self.device))
        if isinstance(outputs, tuple | list):
            if len(outputs) != 1:
                raise TeacherError(
                    f"{self.path}: teacher returned {len(outputs)} outputs, expected one tensor"
                )
            outputs = outputs[0]
        if isinstance(outputs, np.ndarray):
            outputs = torch.from_numpy(outputs)
        if not isinstance(outputs, torch.Tensor):
            raise TeacherError(f"{self.path}: teacher returned {type(outputs).__name__}, expected a tensor")
        if outputs.ndim == 4 and outputs.shape[2:] == (1, 1):
            outputs = outputs.flatten(1)
        if outputs.ndim != 2 or outputs.shape[0] != batch.shape[0]:
            raise TeacherError(
                f"{self.path}: teacher output has shape {tuple(outputs.shape)}, "
                f"expected ({batch.shape[0]}, D) for a batch of {batch.shape[0]}"
            )
        if self.expected_outputs is not None and outputs.shape[1] != self.expected_outputs:
            raise TeacherError(
                f"{self.path}: teacher gives {outputs.shape[1]} outputs per image, "
                f"expected {self.expected_outputs}"
            )
        return outputs.float().to(batch.device)

    def __repr__(self) -> str:
        return f"Teacher({self.kind}, {self.path}, sha256={self.checksum[:12]}, input_size={self.input_size})"


# --------------------------------------------------------------------------- the teacher's inputs
class TeacherBatch:
    """Image paths → the teacher's input batch: each image decoded (at a reduced JPEG scale where the
    transform allows) and run through ``transform``. A picklable callable, so loader workers can run it."""

    def __init__(self, transform: Callable[[np.ndarray], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, paths: Sequence[Path]) -> torch.Tensor:
        size = getattr(self.transform, "decode_size", None)
        return torch.stack([self.transform(load_rgb(path, min_size=size)) for path in paths])


@dataclass(frozen=True)
class TeacherInputs:
    """How the teacher sees an image: the eval crop (shorter side to ``size`` / CROP_FRACTION, centre
    ``size`` crop), normalised with ``mean`` and ``std``."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, teacher: Teacher, size_option: int | None, task: BaseTask) -> TeacherInputs:
        """The task's ``teacher_input_size`` option, else what the teacher file says, else the student's
        input size; the teacher file's normalisation, else the student's."""
        size = size_option or teacher.input_size or int(task.hparams.input_size)
        mean, std = task.normalization
        return cls(int(size), tuple(teacher.mean or mean), tuple(teacher.std or std))

    @property
    def key(self) -> str:
        """Names this preprocessing in the output cache (another crop or normalisation never reuses it)."""
        return f"eval-crop{CROP_FRACTION} size={self.size} mean={self.mean} std={self.std}"

    def transform(self) -> ClassificationTransform:
        """The eval transform of one decoded image."""
        return ClassificationTransform(self.size, train=False, mean=self.mean, std=self.std)

    def batch(self) -> TeacherBatch:
        """Paths → the teacher's input batch."""
        return TeacherBatch(self.transform())


def teacher_cache_dir(option: str | None, trainer: Any) -> Path:
    """The task's ``teacher_cache_dir`` option, else ``<trainer.default_root_dir>/teacher_cache``."""
    return Path(option) if option else Path(trainer.default_root_dir) / "teacher_cache"


# --------------------------------------------------------------------------- the output cache
@dataclass
class TeacherCache:
    """The teacher's outputs for a fixed list of images: ``outputs[i]`` belongs to ``paths[i]``.

    ``built`` says whether this call computed the outputs (False: an existing cache was reused).
    """

    outputs: np.ndarray  # memory-mapped float32 (N, D)
    paths: list[Path]
    array_file: Path
    index_file: Path
    built: bool = False
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def index_of(self, path: Path | str) -> int:
        if not self._index:
            self._index = {str(p): i for i, p in enumerate(self.paths)}
        try:
            return self._index[str(Path(path))]
        except KeyError:
            raise KeyError(f"{path}: not among the {len(self.paths)} images of {self.index_file}") from None

    def __len__(self) -> int:
        return len(self.paths)


def image_list_digest(image_paths: Sequence[Path]) -> str:
    """Hash of the image list: paths, sizes and modification times (an edited image changes it)."""
    digest = hashlib.sha256()
    for path in image_paths:
        stat = Path(path).stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_key(teacher_checksum: str, transform_key: str, activation: str, images_digest: str) -> str:
    preprocessing = hashlib.sha256(
        f"v{CACHE_FORMAT_VERSION}\0{transform_key}\0{activation}\0{images_digest}".encode()
    ).hexdigest()
    return f"teacher-{teacher_checksum[:16]}-{preprocessing[:16]}"


class _PathBatches(torch.utils.data.Dataset):
    """Chunks of the image list, each turned into a batch by ``make_batch`` (in loader workers)."""

    def __init__(self, paths: Sequence[Path], batch_size: int, make_batch: Callable) -> None:
        self.paths = list(paths)
        self.batch_size = batch_size
        self.make_batch = make_batch

    def __len__(self) -> int:
        return (len(self.paths) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, index: int) -> torch.Tensor:
        chunk = self.paths[index * self.batch_size : (index + 1) * self.batch_size]
        return self.make_batch(chunk)


def _read_cache(array_file: Path, index_file: Path, expected: dict[str, Any]) -> TeacherCache | None:
    if not (array_file.is_file() and index_file.is_file()):
        return None
    try:
        metadata = json.loads(index_file.read_text())
        if any(metadata.get(key) != value for key, value in expected.items()):
            return None
        outputs = np.load(array_file, mmap_mode="r")
    except (OSError, ValueError) as error:
        log.warning("ignoring unreadable teacher cache %s (%s)", index_file, error)
        return None
    if outputs.dtype != np.float32 or outputs.ndim != 2 or outputs.shape[0] != len(metadata["paths"]):
        return None
    return TeacherCache(outputs, [Path(p) for p in metadata["paths"]], array_file, index_file, built=False)


def _teacher_rows(
    teacher: Teacher,
    paths: Sequence[Path],
    make_batch: Callable[[Sequence[Path]], torch.Tensor],
    batch_size: int,
    activation: Activation,
    num_workers: int,
    show_progress: bool = True,
) -> Iterator[np.ndarray]:
    """The teacher's float32 outputs for ``paths``, batch after batch, in order."""
    loader = torch.utils.data.DataLoader(
        _PathBatches(paths, batch_size, make_batch), batch_size=None, num_workers=num_workers, shuffle=False
    )
    with tqdm(
        total=len(paths), desc=f"teacher outputs ({teacher.path.name})", unit="img", disable=not show_progress
    ) as bar:
        for batch in loader:
            result = teacher(batch)
            if activation == "sigmoid":
                result = result.sigmoid()
            values = result.detach().to("cpu", torch.float32).numpy()
            bar.update(len(values))
            yield values


def _write_index(
    index_file: Path, expected: dict[str, Any], teacher: Teacher, array_file: Path, paths: list[Path]
) -> None:
    """The JSON that names the images of ``array_file``'s rows; renamed into place last, it marks the cache
    complete."""
    with atomic_path(index_file, ".json") as temp:
        temp.write_text(
            json.dumps(
                {
                    **expected,
                    "teacher_path": str(teacher.path),
                    "shape": list(np.load(array_file, mmap_mode="r").shape),
                    "paths": [str(p) for p in paths],
                }
            )
        )


def _write_cache(
    outputs: np.ndarray,
    array_file: Path,
    index_file: Path,
    expected: dict[str, Any],
    teacher: Teacher,
    paths: list[Path],
) -> None:
    with atomic_path(array_file, ".npy") as temp, temp.open("wb") as stream:
        np.save(stream, outputs)
    _write_index(index_file, expected, teacher, array_file, paths)


def cached_teacher_outputs(
    teacher: Teacher,
    image_paths: Sequence[Path],
    transform_key: str,
    make_batch: Callable[[Sequence[Path]], torch.Tensor],
    cache_dir: Path,
    batch_size: int = 64,
    activation: Activation = "none",
    num_workers: int = 0,
    device: torch.device | str | None = None,
) -> TeacherCache:
    """The teacher's outputs for ``image_paths``, from the cache in ``cache_dir`` or computed once now.

    Under DDP (a process group of several processes; call it on every one of them) the processes agree on
    whether the cache exists; if not, each runs the teacher on its share of the images (positions ``rank``,
    ``rank + world size``, ...), the shares are gathered, process 0 writes the cache and the others wait
    for it, then every process reads it. A process that still does not see the cache (``cache_dir`` on a
    disk that is not shared between the nodes) writes its own copy from the gathered outputs.

    Args:
        teacher: the network; its checksum keys the cache.
        image_paths: the images, in the order of the rows of ``outputs``.
        transform_key: a string that names the preprocessing ``make_batch`` applies (input size,
            normalisation, ...): a different key never reuses the cache.
        make_batch: paths → the teacher's input batch (runs in ``num_workers`` loader workers when > 0).
        cache_dir: where the ``.npy`` array and ``.json`` image list live.
        batch_size: images per teacher call.
        activation: ``sigmoid`` stores probabilities instead of raw outputs.
        num_workers: DataLoader workers decoding the images.
        device: where the teacher runs (default: where it is).
    """
    if activation not in ("none", "sigmoid"):
        raise ValueError(f"activation must be 'none' or 'sigmoid', got {activation!r}")
    if not image_paths:
        raise ValueError("cached_teacher_outputs: the image list is empty")
    paths = [Path(p) for p in image_paths]
    cache_dir = Path(cache_dir)
    images_digest = image_list_digest(paths)
    key = cache_key(teacher.checksum, transform_key, activation, images_digest)
    array_file = cache_dir / f"{key}.npy"
    index_file = cache_dir / f"{key}.json"
    expected = {
        "format": CACHE_FORMAT_VERSION,
        "teacher_sha256": teacher.checksum,
        "transform_key": transform_key,
        "activation": activation,
        "images_digest": images_digest,
    }
    cached = _read_cache(array_file, index_file, expected)
    rank, world = rank_and_world()
    # every process takes the same branch, or the collectives below would wait for each other forever
    everywhere = all(gather_objects(cached is not None))
    if cached is not None and everywhere:
        log.info("reusing teacher outputs %s (%d images)", array_file, len(cached))
        return cached

    cache_dir.mkdir(parents=True, exist_ok=True)
    if device is not None:
        teacher.to(device)
    rows = partial(
        _teacher_rows, teacher, make_batch=make_batch, batch_size=batch_size, activation=activation,
        num_workers=num_workers, show_progress=rank == 0,
    )  # fmt: skip
    if world > 1:
        share = list(rows(paths[rank::world]))
        parts = gather_objects(np.concatenate(share) if share else np.zeros((0, 0), np.float32))
        width = max(part.shape[1] for part in parts)
        outputs = np.empty((len(paths), width), dtype=np.float32)
        for part_rank, part in enumerate(parts):
            if len(part) != len(paths[part_rank::world]):
                raise RuntimeError(
                    f"teacher cache: make_batch returned {len(part)} rows for the "
                    f"{len(paths[part_rank::world])} images of process {part_rank}"
                )
            outputs[part_rank::world] = part
        if rank == 0:
            _write_cache(outputs, array_file, index_file, expected, teacher, paths)
        barrier()
        if _read_cache(array_file, index_file, expected) is None:
            log.info("%s: not on a disk shared with process 0; writing this process's copy", index_file)
            _write_cache(outputs, array_file, index_file, expected, teacher, paths)
    else:
        _build_cache(rows(paths), array_file, index_file, expected, teacher, paths)
    log.info("cached teacher outputs for %d images in %s", len(paths), array_file)
    result_cache = _read_cache(array_file, index_file, expected)
    if result_cache is None:  # pragma: no cover - only if another process removed the files meanwhile
        raise RuntimeError(f"teacher cache {index_file} vanished right after it was written")
    result_cache.built = True
    return result_cache


def _build_cache(
    batches: Iterator[np.ndarray],
    array_file: Path,
    index_file: Path,
    expected: dict[str, Any],
    teacher: Teacher,
    paths: list[Path],
) -> None:
    """Stream the teacher's outputs into a memory-mapped ``.npy`` (bounded memory), then the index JSON."""
    with atomic_path(array_file, ".npy") as array_tmp:
        outputs: np.memmap | None = None
        row = 0
        for values in batches:
            if outputs is None:
                outputs = np.lib.format.open_memmap(
                    array_tmp, mode="w+", dtype=np.float32, shape=(len(paths), values.shape[1])
                )
            outputs[row : row + len(values)] = values
            row += len(values)
        if outputs is None or row != len(paths):
            raise RuntimeError(f"teacher cache: make_batch returned {row} rows for {len(paths)} images")
        outputs.flush()
        del outputs
    _write_index(index_file, expected, teacher, array_file, paths)
