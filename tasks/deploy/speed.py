"""The deployment speed report behind ``mobilenets bench`` (``tasks/cli/bench.py``).

For 1.0 MobileNet-224 and 0.25 MobileNet-128, in one run and on the same threads: images/s at batch 1 and
32 and p50/p90 latency at batch 1 of PyTorch eager (NCHW and channels_last), our inference mode (batch
norm folded, channels_last, ``torch.inference_mode``), ``torch.compile`` of the inference mode (skipped if
it fails), ONNX Runtime fp32 and int8 (static QDQ, per-channel), beside timm's ``mobilenetv1_100`` as the
peer (when timm is installed): eager, and exported and quantised by the same code as ours, each timed in
alternating rounds with our row, whose "vs peer" column gives the batch-1 ratio. ``--readme README.md``
writes the table between the README's ``<!-- bench:start -->`` and ``<!-- bench:end -->`` markers with the
date and the machine.

No trained weights are available offline, so the models get signal-preserving random weights
(delta-orthogonal), batch-norm statistics measured on synthetic structured images (10 classes of tinted,
oriented gratings, ``datasets/synthetic/calibration.py``) and a softmax-regression head trained on the
frozen features of those classes. Without this, random networks push activations into denormal floats
(slow on every runtime) and int8/float agreement would be measured on near-ties of a random head.

``litert_report`` (``mobilenets bench --peer litert``, extra ``litert``) is the other peer: Google's official
MobileNet v1 files (α 0.25/0.5/0.75/1.0 at 128/160/192/224; 1.0 is released as the body only, so bodies are
compared) in LiteRT's XNNPACK interpreter, beside our ONNX Runtime fp32 and int8 exports of the SAME weights
(``load_pretrained`` of the file), at batch 1 on 1 and 2 threads, alternating in one run. With real weights,
int8/float agreement is measured on real photos (crops, flips and rescalings of the few available offline).
The table header names the CPU's ISA (AVX2, AVX-512, VNNI), on which int8 speed and precision depend.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mobilenets.backbone.errors import MobilenetsError
from mobilenets.backbone.inference import InferenceModel, inference_model, recalibrate_batchnorm
from mobilenets.backbone.mobilenet import MobileNetV1
from mobilenets.backbone.tflite import OFFICIAL_DIR
from mobilenets.backbone.weights import filter_timm_state_dict, load_pretrained
from mobilenets.datasets.atomic import write_text_atomic
from mobilenets.datasets.synthetic.calibration import make_calibration_patterns
from mobilenets.tasks.deploy.export import (
    agreement,
    cpu_flags,
    export_for_int8,
    export_onnx,
    int8_weight_bits,
    needs_high_precision_int8,
    onnx_metadata,
    ort_session,
    preprocess_images,
    quantize_onnx,
    run_onnx,
    session_runner,
)
from mobilenets.tasks.deploy.timing import (
    SpeedRow,
    measure,
    measure_against_peer,
    measure_alternating,
    ratio,
)

BENCH_START = "<!-- bench:start -->"
BENCH_END = "<!-- bench:end -->"
#: Synthetic classes the trained linear head tells apart (rows 0..N-1 of the 1000-way classifier).
HEAD_CLASSES = 10


class BenchError(MobilenetsError, RuntimeError):
    """A benchmark that cannot run or write its report; the message says why."""


# ---------------------------------------------------------------------------------------------- models
def pattern_batches(root: Path, input_size: int, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic grating images written as JPEGs, prepared with the eval transform: (images, labels)."""

    size = round(input_size / 0.875) + 8
    samples = make_calibration_patterns(root, per_class, HEAD_CLASSES, size, seed)
    metadata = {"input_size": str(input_size), "mean": "0.5,0.5,0.5", "std": "0.5,0.5,0.5"}
    images = preprocess_images([p for p, _ in samples], metadata)
    return images, np.array([label for _, label in samples])


def delta_orthogonal_(model: nn.Module, noise: float = 0.1, generator: torch.Generator | None = None) -> None:
    """Signal-preserving random weights (delta-orthogonal initialisation, Xiao et al. 2018): depthwise
    kernels are a centre tap plus noise, full and pointwise kernels an orthogonal matrix at the centre.

    Kaiming-random MobileNets lose the input's information with depth (pooled features of different images
    become nearly identical by block 6), so their outputs say nothing about agreement; these keep it.
    """
    with torch.no_grad():
        for conv in model.modules():
            if not isinstance(conv, nn.Conv2d):
                continue
            weight = conv.weight
            centre = (weight.shape[2] // 2, weight.shape[3] // 2)
            if conv.groups > 1:
                weight.normal_(0, noise, generator=generator)
                weight[:, :, centre[0], centre[1]] += 1.0
            else:
                matrix = torch.empty(weight.shape[0], weight.shape[1])
                nn.init.orthogonal_(matrix, generator=generator)
                weight.normal_(0, noise / 2, generator=generator) if weight.shape[2] > 1 else weight.zero_()
                weight[:, :, centre[0], centre[1]] += matrix


def realistic_(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, forward_features: Callable, steps: int = 300
) -> None:
    """Batch-norm statistics of ``images`` and a linear head trained on their frozen features.

    The transfer-learning setting of the suite in miniature: the classifier's first K rows (K = number of
    label classes) become a softmax regression fitted to the pooled features of the frozen random backbone,
    so that outputs have trained-like margins rather than the near-ties of a random head.
    """
    recalibrate_batchnorm(model, list(images.split(16)))
    model.eval()
    classifier = model.get_classifier()
    classes = int(labels.max()) + 1
    with torch.no_grad():
        features = torch.cat([forward_features(chunk) for chunk in images.split(16)])
    mean, std = features.mean(0), features.std(0) + 1e-6
    standardized = (features - mean) / std
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(classes, features.shape[1], generator=generator) * 0.01).requires_grad_()
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.01, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.cross_entropy(standardized @ weight.T + bias, labels).backward()
            optimizer.step()
    with torch.no_grad():
        classifier.weight.normal_(0, 1e-4)
        classifier.bias.fill_(-1e3)  # rows beyond the K classes never win
        classifier.weight[:classes] = weight / std
        classifier.bias[:classes] = bias - (weight / std) @ mean


def our_model(width_mult: float) -> MobileNetV1:
    """Our MobileNet as timm's ``mobilenetv1_100`` builds it (ReLU6, like the released weights)."""
    return MobileNetV1(num_classes=1000, width_mult=width_mult, activation="relu6").eval()


def timm_peer() -> nn.Module | None:
    """timm's ``mobilenetv1_100`` with random weights (no download), or None when timm is missing."""
    try:
        import timm
    except ImportError:
        return None
    return timm.create_model("mobilenetv1_100", pretrained=False).eval()


def copy_timm_into_ours(peer: nn.Module, ours: MobileNetV1) -> None:
    """Give our model the peer's exact weights, so both compute the same function."""

    ours.load_state_dict(filter_timm_state_dict(peer.state_dict(), ours))


class _ExportAdapter(nn.Module):
    """Presents a bare network through the task export contract."""

    def __init__(self, network: nn.Module, input_size: int, output_kind: str = "logits") -> None:
        super().__init__()
        self.network = network
        self.input_size = input_size
        self.output_kind = output_kind

    def export_module(self) -> nn.Module:
        return self.network

    def export_metadata(self) -> dict[str, str]:
        return {
            "task": "benchmark",
            "input_size": str(self.input_size),
            "mean": "0.5,0.5,0.5",
            "std": "0.5,0.5,0.5",
            "output_kind": self.output_kind,
        }


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------------------------------- report
def bench_one(
    name: str,
    model: MobileNetV1,
    input_size: int,
    work: Path,
    threads: int,
    compile_model: bool,
    calibration: np.ndarray,
    heldout: np.ndarray,
    peer: nn.Module | None = None,
    quick: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[list[SpeedRow], str]:
    """Every runtime on one model; returns the rows and the int8 agreement line."""

    repeats_b1, repeats_b32 = (10, 2) if quick else (50, 5)
    x1 = torch.randn(1, 3, input_size, input_size)
    x32 = torch.randn(32, 3, input_size, input_size)
    rows: list[SpeedRow] = []

    def torch_runner(module: nn.Module, x: torch.Tensor, channels_last: bool) -> Callable[[], object]:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        def run() -> object:
            with torch.inference_mode():
                return module(x)

        return run

    def add(runtime: str, b1: Callable | None, b32: Callable | None, note: str = "") -> None:
        log(f"  {name}: {runtime} ...")
        rows.append(measure(name, runtime, b1, b32, repeats_b1, repeats_b32, note))

    def add_with_peer(
        runtime: str, b1: Callable, b32: Callable, peer_runtime: str, peer_b1: Callable, peer_b32: Callable
    ) -> None:
        log(f"  {name}: {runtime} and {peer_runtime}, alternating ...")
        ours_row, peer_row = measure_against_peer(
            name, (runtime, b1, b32), (peer_runtime, peer_b1, peer_b32), repeats_b1, repeats_b32
        )
        rows.extend([peer_row, ours_row])

    peer_eager = (torch_runner(peer, x1, False), torch_runner(peer, x32, False)) if peer is not None else None
    if peer_eager is not None:
        add_with_peer(
            "PyTorch eager NCHW",
            torch_runner(model, x1, False),
            torch_runner(model, x32, False),
            "timm mobilenetv1_100 eager NCHW (peer)",
            *peer_eager,
        )
    else:
        add("PyTorch eager NCHW", torch_runner(model, x1, False), torch_runner(model, x32, False))
    channels_last = model.to(memory_format=torch.channels_last)
    add(
        "PyTorch eager channels_last",
        torch_runner(channels_last, x1, True),
        torch_runner(channels_last, x32, True),
    )
    model = model.to(memory_format=torch.contiguous_format)
    fast: InferenceModel = inference_model(model)
    add("inference mode (BN folded, channels_last)", lambda: fast(x1), lambda: fast(x32))
    if compile_model:
        try:
            started = time.perf_counter()
            compiled = torch.compile(fast.model, dynamic=False)
            with _quiet():
                torch_runner(compiled, x1, True)()
                torch_runner(compiled, x32, True)()
            note = f"compile {time.perf_counter() - started:.0f} s"
            add(
                "torch.compile(inference mode)",
                torch_runner(compiled, x1, True),
                torch_runner(compiled, x32, True),
                note,
            )
        except Exception as error:  # no compiler toolchain, unsupported platform, ...
            log(f"  {name}: torch.compile skipped ({type(error).__name__}: {str(error)[:120]})")
            rows.append(
                SpeedRow(name, "torch.compile(inference mode)", None, None, None, None, "skipped: failed")
            )
    if peer_eager is not None:  # the other torch runtimes against timm's eager model
        peer_b1 = rows[0].images_per_s_b1
        rows[2:] = [replace(row, vs_peer=ratio(row.images_per_s_b1, peer_b1)) for row in rows[2:]]

    n1, n32 = x1.numpy(), x32.numpy()
    float_path, int8_path = work / f"{name}.onnx", work / f"{name}.int8.onnx"
    with _quiet():
        export_onnx(_ExportAdapter(model, input_size), float_path)
    session = ort_session(float_path, threads)
    log(f"  {name}: int8 calibration on {len(calibration)} images ...")
    report = quantize_onnx(float_path, int8_path, calibration, heldout, min_agreement=0.0)
    int8_label = f"ONNX Runtime int8 (QDQ, per-channel {onnx_metadata(int8_path)['int8_weight_bits']}-bit)"
    session8 = ort_session(int8_path, threads)
    if peer is not None:
        # timm's model through the same exporter and quantiser: the runtime's own ceiling for this network
        peer_float, peer_int8 = work / f"{name}.timm.onnx", work / f"{name}.timm.int8.onnx"
        with _quiet():
            export_onnx(_ExportAdapter(peer, input_size), peer_float)
        quantize_onnx(peer_float, peer_int8, calibration, heldout, min_agreement=0.0)
        peer_session, peer_session8 = ort_session(peer_float, threads), ort_session(peer_int8, threads)
        add_with_peer(
            "ONNX Runtime fp32",
            lambda: run_onnx(session, n1),
            lambda: run_onnx(session, n32),
            "timm mobilenetv1_100 → ONNX Runtime fp32 (peer)",
            lambda: run_onnx(peer_session, n1),
            lambda: run_onnx(peer_session, n32),
        )
        add_with_peer(
            int8_label,
            lambda: run_onnx(session8, n1),
            lambda: run_onnx(session8, n32),
            "timm mobilenetv1_100 → ONNX Runtime int8 (peer)",
            lambda: run_onnx(peer_session8, n1),
            lambda: run_onnx(peer_session8, n32),
        )
    else:
        add("ONNX Runtime fp32", lambda: run_onnx(session, n1), lambda: run_onnx(session, n32))
        add(
            int8_label,
            lambda: run_onnx(session8, n1),
            lambda: run_onnx(session8, n32),
        )
    float_out = run_onnx(session, heldout)
    int8_out = run_onnx(session8, heldout)
    cosine = agreement("embedding", [float_out[0][:, :HEAD_CLASSES]], [int8_out[0][:, :HEAD_CLASSES]])
    line = f"{name}: {report.summary()}; mean cosine of the 10 class logits {cosine.value:.4f}"
    return rows, line


def _fmt(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def format_table(rows: list[SpeedRow]) -> str:
    """A markdown table of the rows."""
    lines = [
        "| model | runtime | img/s b1 | p50 ms b1 | p90 ms b1 | img/s b32 | vs peer b1 | note |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.runtime} | {_fmt(r.images_per_s_b1)} | {_fmt(r.p50_ms, 1)} | "
            f"{_fmt(r.p90_ms, 1)} | {_fmt(r.images_per_s_b32)} | "
            f"{'' if r.vs_peer is None else f'{r.vs_peer:.2f}x'} | {r.note} |"
        )
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_description(threads: int) -> str:
    import onnxruntime

    return (
        f"{cpu_model()} ({cpu_isa()}), {os.cpu_count()} cores, {threads} threads; torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, Python {platform.python_version()}"
    )


def update_readme(readme: Path, body: str) -> None:
    """Replace the text between the bench markers of ``readme`` (atomically); everything else is kept."""
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(BENCH_START), text.find(BENCH_END)
    if start < 0 or end < 0 or end < start:
        raise BenchError(f"{readme}: expected the markers {BENCH_START} ... {BENCH_END} (in that order)")
    updated = text[: start + len(BENCH_START)] + "\n" + body.strip() + "\n" + text[end:]
    write_text_atomic(readme, updated)


def speed_report(
    threads: int = 2, compile_model: bool = True, quick: bool = False, log: Callable[[str], None] = print
) -> tuple[list[SpeedRow], list[str]]:
    """Run every runtime on 1.0 MobileNet-224 and 0.25 MobileNet-128; (rows, agreement lines)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    configs = [("1.0 MobileNet-224", 1.0, 224), ("0.25 MobileNet-128", 0.25, 128)]
    if quick:
        configs = [("0.25 MobileNet-64", 0.25, 64)]
    rows: list[SpeedRow] = []
    lines: list[str] = []
    per_class = (2, 4) if quick else (8, 12)  # calibration, held-out images per class
    with tempfile.TemporaryDirectory(prefix="mobilenets-bench-") as work_dir:
        work = Path(work_dir)
        for name, width, size in configs:
            log(f"{name}: preparing synthetic images and the model ...")
            images, labels = pattern_batches(work / f"images{size}", size, sum(per_class), seed=size)
            is_cal = np.arange(len(labels)) % sum(per_class) < per_class[0]
            calibration, heldout = images[is_cal], images[~is_cal]
            model = our_model(width)
            peer = timm_peer() if width == 1.0 and not quick else None
            tensors, targets = torch.from_numpy(calibration), torch.from_numpy(labels[is_cal])
            if peer is not None:
                delta_orthogonal_(peer)
                realistic_(
                    peer,
                    tensors,
                    targets,
                    lambda x, p=peer: p.forward_head(p.forward_features(x), pre_logits=True),
                )
                copy_timm_into_ours(peer, model)
            else:
                delta_orthogonal_(model)
                realistic_(
                    model,
                    tensors,
                    targets,
                    lambda x, m=model: m.forward_head(m.forward_features(x), pre_logits=True),
                )
            with torch.inference_mode():
                logits = model(torch.from_numpy(heldout))
            accuracy = float((logits.argmax(1).numpy() == labels[~is_cal]).mean())
            new_rows, line = bench_one(
                name,
                model,
                size,
                work,
                threads,
                compile_model and not quick,
                calibration,
                heldout,
                peer,
                quick,
                log,
            )
            rows += new_rows
            lines.append(f"{line}; float accuracy of the synthetic 10-class head {accuracy:.3f}")
    return rows, lines


def report_markdown(rows: list[SpeedRow], lines: list[str], threads: int) -> str:
    when = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    notes = "\n".join(f"- {line}" for line in lines)
    return (
        f"Measured {when} on {machine_description(threads)} by `mobilenets bench` "
        f"(`benchmarks/deploy.py`); medians.\n\n{format_table(rows)}\n\n{notes}\n"
    )


# ---------------------------------------------------------------------------------------------- ISA
def cpu_isa(flags: set[str] | None = None) -> str:
    """The vector and int8 instruction sets the numbers depend on, e.g. ``AVX2, no AVX-512, no VNNI``."""
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return f"ISA unknown ({platform.machine()})"
    vnni = [
        name for flag, name in (("avx512_vnni", "AVX512-VNNI"), ("avx_vnni", "AVX-VNNI")) if flag in flags
    ]
    parts = [
        "AVX2" if "avx2" in flags else "no AVX2",
        "AVX-512" if "avx512f" in flags else "no AVX-512",
        ", ".join(vnni) if vnni else "no VNNI",
    ]
    if "amx_int8" in flags:
        parts.append("AMX-INT8")
    return ", ".join(parts) + f"; int8 weights {int8_weight_bits(flags)}-bit"


# ---------------------------------------------------------------------------------------------- LiteRT peer
#: Google's official MobileNet v1 TFLite files (uint8, ReLU6, TF padding): α → (file, input size, classifier?).
#: 1.0 is released here as the body only (1024-d pooled features), so it is compared body to body.
OFFICIAL_TFLITE: dict[float, tuple[str, int, bool]] = {
    0.25: ("mobilenet_v1_0.25_128_quant.tflite", 128, True),
    0.5: ("mobilenet_v1_0.5_160_quant.tflite", 160, True),
    0.75: ("mobilenet_v1_0.75_192_quant.tflite", 192, True),
    1.0: ("mobilenet_v1_1.0_224_quant_embedding_extractor.tflite", 224, False),
}
#: Where the official files are read from: ``../shared/weights/tflite`` beside the checkout (7.3 MB that the
#: repository does not carry; only 0.25-128 is shipped, as the built-in weights ``official:0.25_128``).
DEFAULT_TFLITE_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "weights" / "tflite"
#: Real photos beside the official files and in the test data (crops, flips and scales of them make the
#: held-out set on which int8 and float are compared).
PHOTO_FILES: tuple[str, ...] = ("cat.bmp", "bird.bmp")
TEST_PHOTOS = Path(__file__).resolve().parents[2] / "tests" / "data"


def official_tflite(alpha: float, folder: Path) -> Path | None:
    """The official file for ``alpha`` in ``folder``, else the built-in copy (0.25-128 only), else None."""
    name = OFFICIAL_TFLITE[alpha][0]
    for candidate in (folder / name, OFFICIAL_DIR / name):
        if candidate.is_file():
            return candidate
    return None


def real_photos(folder: Path) -> list[np.ndarray]:
    """Every real RGB photo available offline (uint8 H x W x 3): ``cat.bmp``/``bird.bmp`` of ``folder`` (else
    their 160-px copies in the test data) and, when scikit-image is installed, the colour and grey photos of
    ``skimage.data``."""
    from PIL import Image

    paths = [folder / name for name in PHOTO_FILES]
    if not all(p.is_file() for p in paths):
        paths = sorted(TEST_PHOTOS.glob("*.png"))
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in paths if p.is_file()]
    try:
        import skimage.data as samples
    except ImportError:
        return photos
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera", "coins"):
        with contextlib.suppress(Exception):  # a sample that needs a download is left out
            image = np.asarray(getattr(samples, name)())
            photos.append(np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3])
    return photos


def photo_variants(photos: Sequence[np.ndarray], size: int, count: int, seed: int) -> np.ndarray:
    """``count`` random crops (35-100 % of each side), horizontal flips and rescalings to ``size`` of the
    photos, scaled to [-1, 1] as the official models expect: an (N, 3, size, size) float32 batch."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    batch = np.empty((count, 3, size, size), np.float32)
    for i in range(count):
        photo = photos[i % len(photos)]
        height, width = photo.shape[:2]
        crop_h, crop_w = (max(int(side * rng.uniform(0.35, 1.0)), 8) for side in (height, width))
        top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
        crop = Image.fromarray(np.ascontiguousarray(photo[top : top + crop_h, left : left + crop_w]))
        pixels = np.asarray(crop.resize((size, size), Image.BILINEAR), np.float32)
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        batch[i] = pixels.transpose(2, 0, 1) / 127.5 - 1.0
    return batch


class LiteRTModel:
    """A TFLite file in LiteRT's interpreter (XNNPACK), fed [-1, 1] float images like our exports."""

    def __init__(self, path: Path, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    def to_input(self, image: np.ndarray) -> np.ndarray:
        """One (3, S, S) image in [-1, 1] as the file's (1, S, S, 3) input (uint8: x / scale + zero point)."""
        scale, zero = self.input["quantization"]
        pixels = image.transpose(1, 2, 0)[None]
        if self.input["dtype"] == np.uint8:
            return np.clip(np.round(pixels / scale + zero), 0, 255).astype(np.uint8)
        return pixels.astype(self.input["dtype"])

    def runner(self, image: np.ndarray) -> Callable[[], np.ndarray]:
        """One call: input copied in, inference, output copied out (what ``session.run`` does for ours)."""
        x, interpreter, input_index = self.to_input(image), self.interpreter, self.input["index"]
        output_index = self.output["index"]

        def run() -> np.ndarray:
            interpreter.set_tensor(input_index, x)
            interpreter.invoke()
            return interpreter.get_tensor(output_index)

        return run

    def outputs(self, images: np.ndarray) -> np.ndarray:
        """Dequantized outputs, one row per image (a 1001-way classifier loses its background class 0)."""
        scale, zero = self.output["quantization"]
        rows = [self.runner(image)().reshape(-1).astype(np.float32) for image in images]
        out = np.stack(rows)
        out = (out - zero) * scale if scale else out
        return out[:, 1:] if out.shape[1] == 1001 else out


def litert_report(
    threads: Sequence[int] = (1, 2),
    tflite_dir: Path = DEFAULT_TFLITE_DIR,
    widths: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    quick: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[list[SpeedRow], list[str]]:
    """Google's official files in LiteRT (the peer) against our ONNX Runtime fp32 and int8 exports of the
    same weights, at batch 1, alternating in one run; (rows, notes: int8 agreement on real photos).

    Our model is ``MobileNetV1(width_mult=α, activation="relu6", padding="tf")`` loaded from the file; int8
    is calibrated on 128 crops of the real photos and compared with float on 100 other crops.
    """
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        return [], ["LiteRT peer skipped: ai-edge-litert is not installed (pip install 'mobilenets[litert]')"]
    photos = real_photos(tflite_dir)
    if not photos:
        return [], [f"LiteRT peer skipped: no real photos found in {tflite_dir} or {TEST_PHOTOS}"]
    repeats = 20 if quick else 200
    rows: list[SpeedRow] = []
    lines = [
        f"int8 agreement on {len(photos)} real photos, as 100 held-out crops/flips/rescalings (128 others "
        "calibrate); ours = ONNX Runtime int8 vs our float, LiteRT = Google's uint8 file vs our float"
    ]
    with tempfile.TemporaryDirectory(prefix="mobilenets-litert-") as work_dir:
        work = Path(work_dir)
        for alpha in widths:
            file_name, size, classifier = OFFICIAL_TFLITE[alpha]
            name = f"{alpha} MobileNet-{size}" + ("" if classifier else " body")
            path = official_tflite(alpha, tflite_dir)
            if path is None:
                lines.append(f"{name}: skipped, {tflite_dir / file_name} not found (Google's official file)")
                log(lines[-1])
                continue
            log(f"{name}: exporting {path.name}'s weights, calibrating int8 ...")
            model = MobileNetV1(1000 if classifier else 0, alpha, activation="relu6", padding="tf").eval()
            load_pretrained(model, path)
            calibration = photo_variants(photos, size, 32 if quick else 128, seed=1)
            heldout = photo_variants(photos, size, 20 if quick else 100, seed=2)
            float_path = work / f"{alpha}.onnx"
            adapter = _ExportAdapter(model, size, "logits" if classifier else "embedding")
            with _quiet():
                export_onnx(adapter, float_path)
            int8_paths: dict[Path, str] = {}
            reports = []
            # as ``export --int8 --bias-correction on`` writes it; with the exact but slower 8-bit
            # weights beside where the CPU has no VNNI
            for bits in sorted({int8_weight_bits(), 8}):
                prepared, int8_path = work / f"{alpha}.{bits}.onnx", work / f"{alpha}.int8-{bits}bit.onnx"
                with _quiet():
                    export_for_int8(adapter, float_path, prepared, calibration, bits, log=lambda _: None)
                    reports.append(
                        quantize_onnx(prepared, int8_path, calibration, heldout, 0.0, bits, float_path)
                    )
                exact = bits == 8 and needs_high_precision_int8()
                int8_paths[int8_path] = f"{bits}-bit weights" + (", x64quantprecision" if exact else "")
            report = reports[0]
            reference = run_onnx(ort_session(float_path), heldout)
            peer_report = agreement(report.kind, reference, [LiteRTModel(path, 1).outputs(heldout)])
            ours = ", ".join(f"{label} {r.value:.3f}" for label, r in zip(int8_paths.values(), reports))
            lines.append(
                f"{name}: {report.measure}: ours int8 ({ours}), LiteRT {peer_report.value:.3f} "
                f"({report.images} images)"
            )
            image = heldout[:1]
            for count in threads:
                log(f"  {name}: LiteRT and ONNX Runtime fp32/int8, {count} thread(s), alternating ...")
                peer = LiteRTModel(path, count)
                runs = [
                    (f"LiteRT XNNPACK, Google's uint8 file (peer), {count}T", peer.runner(image[0])),
                    (f"ONNX Runtime fp32, {count}T", session_runner(ort_session(float_path, count), image)),
                ]
                runs += [
                    (f"ONNX Runtime int8 ({label}), {count}T", session_runner(ort_session(p, count), image))
                    for p, label in int8_paths.items()
                ]
                rows += measure_alternating(name, runs, repeats)
    return rows, lines
