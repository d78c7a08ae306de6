"""int8 against float on real photos, for Google's official MobileNets, each compared by top-1 with our float
export of the same weights: ONNX Runtime's plain post-training int8 (max-based weight scales), then with the
weights re-quantised on the grid they came on, then with bias correction too, then the better of those two
(what ``export --int8`` writes by default: ``--bias-correction auto``), then after quantisation-aware
fine-tuning (``--qat-epochs``); and Google's own uint8 file in LiteRT (the peer). Below the floor
(``--floor``), ``export --int8``'s float fallback: the shortest run of first convolutions kept in float that
meets it on these held-out images (so its agreement there is met by construction: its KL and the
independent sets tell more), with its batch-1 speed against LiteRT's and the plain int8's, alternating.

Photos: ``cat.bmp`` and ``bird.bmp`` beside the official files and the photos of ``skimage.data``
(``pip install scikit-image``). Calibration and fine-tuning use crops of some photos; the agreement is
measured on crops, flips and rescalings of the other photos, never seen by either. Besides agreement on all
held-out crops, the table gives it on the crops the float model is confident about (top-1 probability ≥
``--confident``), since a crop no class fits flips on any rounding. The first rows of each width are our
float export itself and the noise floor: the float model fed the same crops with uniform noise of
±``--noise`` grey levels (less than two JPEG decoders or resizers differ by). Where every held-out photo's
name ends in ``_<ImageNet class index>`` (foolbox's do), the last column is top-1 accuracy against it.

    pip install scikit-image ai-edge-litert
    python benchmarks/int8_agreement.py [--widths 0.25,0.5,0.75] [--qat-epochs 10] [--weight-bits 8]
        [--heldout-photos DIR]  # other real photos held out instead: each centre-cropped, and flipped

For example the 20 ImageNet validation photos that foolbox ships (ImageNet's non-commercial terms):

    pip download --no-deps foolbox==3.3.4 && unzip -o foolbox-3.3.4-py3-none-any.whl 'foolbox/data/*.jpg'
    python benchmarks/int8_agreement.py --heldout-photos foolbox/data
"""

from __future__ import annotations

import argparse
import functools
import platform
import re
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mobilenets.backbone.mobilenet import MobileNetV1
from mobilenets.backbone.weights import load_pretrained
from mobilenets.tasks.deploy.export import (
    DEFAULT_QAT_LR,
    FallbackInputs,
    export_for_int8,
    export_onnx,
    fallback_to_float_on_close_calls,
    fastest_routed_fallback,
    int8_weight_bits,
    mean_kl_divergence,
    onnx_metadata,
    ort_session,
    quantize_onnx,
    run_onnx,
    search_float_prefix,
    session_runner,
)
from mobilenets.tasks.deploy.speed import (
    DEFAULT_TFLITE_DIR,
    OFFICIAL_TFLITE,
    LiteRTModel,
    _ExportAdapter,
    cpu_isa,
    official_tflite,
    photo_variants,
    real_photos,
)
from mobilenets.tasks.deploy.timing import cycling, measure_alternating

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
#: Positions in ``real_photos`` held out (cat.bmp, then two of skimage's photos when it is installed).
HELD_OUT = (0, 3, 6)


def top1_agreement(reference: np.ndarray, other: np.ndarray, rows: np.ndarray | None = None) -> float:
    same = reference.argmax(1) == other.argmax(1)
    return float(same[rows].mean() if rows is not None else same.mean())


def centre_crops(folder: Path, size: int, fraction: float = 0.875) -> np.ndarray:
    """Each photo of ``folder`` as a classifier sees it (the central ``fraction`` of its shorter side, resized
    to ``size``) and flipped: a (2N, 3, size, size) batch in [-1, 1]."""
    from PIL import Image

    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    if not paths:
        raise SystemExit(f"{folder}: no .jpg, .png or .bmp photos")
    batch = []
    for path in paths:
        photo = Image.open(path).convert("RGB")
        side = int(min(photo.size) * fraction)
        left, top = (photo.width - side) // 2, (photo.height - side) // 2
        pixels = np.asarray(
            photo.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
        )
        pixels = pixels.astype(np.float32).transpose(2, 0, 1) / 127.5 - 1.0
        batch += [pixels, pixels[:, :, ::-1]]
    return np.ascontiguousarray(np.stack(batch))


def labels_in_names(folder: Path) -> np.ndarray | None:
    """ImageNet class indices from names ending in ``_<index>`` (foolbox's ``imagenet_03_990.jpg``), one per
    image of ``centre_crops`` (each photo and its flip); None unless every photo is named so."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    found = [re.search(r"_(\d+)$", p.stem) for p in paths]
    if not paths or not all(found):
        return None
    return np.repeat([int(match.group(1)) for match in found if match], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="0.25,0.5,0.75", help="α of the official classifier files")
    parser.add_argument("--qat-epochs", type=int, default=10)
    parser.add_argument("--qat-lr", type=float, default=DEFAULT_QAT_LR)
    parser.add_argument("--weight-bits", type=int, choices=(7, 8), default=None, help="default: this CPU's")
    parser.add_argument("--confident", type=float, default=0.3)
    parser.add_argument("--tflite-dir", type=Path, default=DEFAULT_TFLITE_DIR)
    parser.add_argument(
        "--threads", type=int, default=1, help="threads of LiteRT and ONNX Runtime in the speed rows"
    )
    parser.add_argument("--noise", type=float, default=0.5, help="grey levels of the noise-floor row")
    parser.add_argument("--floor", type=float, default=0.99, help="agreement floor of the float fallback row")
    parser.add_argument(
        "--test-photos",
        type=Path,
        help="a folder of real photos never used to choose a fallback (centre-cropped, and flipped): "
        "each row's agreement there too",
    )
    parser.add_argument(
        "--heldout-photos",
        type=Path,
        help="a folder of other real photos to hold out instead (each centre-cropped, and flipped)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bits = args.weight_bits or int8_weight_bits()
    photos = real_photos(args.tflite_dir)
    if len(photos) <= max(HELD_OUT):
        raise SystemExit(f"needs {max(HELD_OUT) + 1} photos, found {len(photos)}: pip install scikit-image")
    calibration_photos = [p for i, p in enumerate(photos) if i not in HELD_OUT]
    heldout_photos = [photos[i] for i in HELD_OUT]
    labels = None if args.heldout_photos is None else labels_in_names(args.heldout_photos)
    rows = []
    speeds: list = []
    for alpha in (float(a) for a in args.widths.split(",")):
        _, size, classifier = OFFICIAL_TFLITE[alpha]
        path = official_tflite(alpha, args.tflite_dir)
        if path is None or not classifier:
            print(f"{alpha}: skipped (no official classifier file in {args.tflite_dir})")
            continue
        model = MobileNetV1(1000, alpha, activation="relu6", padding="tf").eval()
        load_pretrained(model, path)
        adapter = _ExportAdapter(model, size, "logits")
        calibration = photo_variants(calibration_photos, size, 256, seed=1)
        if args.heldout_photos is None:
            heldout = photo_variants(heldout_photos, size, 300, seed=2)
        else:
            heldout = centre_crops(args.heldout_photos, size)
        test = None if args.test_photos is None else centre_crops(args.test_photos, size)
        with tempfile.TemporaryDirectory(prefix="mobilenets-agreement-") as work_dir:
            work = Path(work_dir)
            float_path = work / "float.onnx"
            export_onnx(adapter, float_path)
            reference = run_onnx(ort_session(float_path), heldout)[0]
            test_reference = None if test is None else run_onnx(ort_session(float_path), test)[0]
            on_test: dict[str, float] = {}
            probabilities = torch.from_numpy(reference).softmax(1).numpy()
            confident = np.flatnonzero(probabilities.max(1) >= args.confident)
            noise = np.random.default_rng(3).uniform(-1, 1, heldout.shape).astype(np.float32)
            noisy = run_onnx(ort_session(float_path), heldout + noise * (args.noise / 127.5))[0]
            results = {
                "our float export (the reference)": reference,
                f"float, input ±{args.noise:g} grey levels (noise floor)": noisy,
                "LiteRT, Google's uint8 file (peer)": LiteRTModel(path, args.threads).outputs(heldout),
            }
            variants = {
                "ours int8, post-training, max-based weight scales": (0, False, False),
                "ours int8, post-training, grid weights": (0, False, True),
                "ours int8, post-training, grid weights + bias correction": (0, True, True),
            }
            if args.qat_epochs:
                variants[f"ours int8, QAT {args.qat_epochs} epochs + bias correction"] = (
                    args.qat_epochs,
                    True,
                    True,
                )
            written: dict[str, Path] = {}
            for label, (epochs, corrected, grid) in variants.items():
                start = time.perf_counter()
                source = float_path
                if epochs or corrected:
                    source = work / "prepared.onnx"
                    export_for_int8(
                        adapter, float_path, source, calibration, bits, epochs, args.qat_lr, corrected
                    )
                out = work / f"int8-{len(written)}.onnx"
                written[label] = out
                quantize_onnx(
                    source, out, calibration, heldout, 0.0, bits, reference_path=float_path, grid_weights=grid
                )
                results[label] = run_onnx(ort_session(out), heldout)[0]
                print(f"{alpha} MobileNet-{size}: {label} in {time.perf_counter() - start:.0f} s", flush=True)
            # ``export --int8``'s default: of the two above, the one that agrees more (bias correction on a tie)
            pair = [results["ours int8, post-training, grid weights + bias correction"]]
            pair.append(results["ours int8, post-training, grid weights"])
            auto = max(pair, key=lambda outputs: top1_agreement(reference, outputs))
            results["ours int8, --bias-correction auto (default)"] = auto
            corrected = auto is pair[0]
            default = f"ours int8, post-training, grid weights{' + bias correction' if corrected else ''}"
            fallbacks: dict[str, Path] = {}
            if top1_agreement(reference, auto) < args.floor:
                close_calls = work / "int8-close-calls.onnx"
                report, _ = fallback_to_float_on_close_calls(
                    float_path, written[default], close_calls, heldout, reference, args.floor
                )
                fallbacks[f"ours int8, float fallback to {args.floor:g}: close calls ({report.detail})"] = (
                    close_calls
                )
                inputs = FallbackInputs(adapter, float_path, work, calibration, heldout, bits, corrected)
                (work / "auto").mkdir()  # its models apart from the first-layers search's of the same count
                _, auto_path = fastest_routed_fallback(
                    replace(inputs, work=work / "auto"),
                    written[default],
                    args.floor,
                    functools.partial(print, f"{alpha}:", flush=True),
                )
                auto_label = onnx_metadata(auto_path)["int8_float_fallback"].replace(
                    f"; floor {args.floor:g}", ""
                )
                fallbacks[f"ours int8, float fallback to {args.floor:g}: auto, {auto_label}"] = auto_path
                found = search_float_prefix(inputs, args.floor)
                if found.path is None:
                    print(f"{alpha}: float fallback: not even all but the last convolution in float meets it")
                else:
                    fallbacks[
                        f"ours int8, float fallback to {args.floor:g}: first {found.count} of {found.total} float"
                    ] = found.path
            for label, fallback_path in fallbacks.items():
                results[label] = run_onnx(ort_session(fallback_path), heldout)[0]
            if test is not None:
                for label, model_path in {
                    "our float export (the reference)": float_path,
                    **written,
                    **fallbacks,
                }.items():
                    on_test[label] = top1_agreement(
                        test_reference, run_onnx(ort_session(model_path), test)[0]
                    )
                on_test["ours int8, --bias-correction auto (default)"] = on_test[default]
                on_test["LiteRT, Google's uint8 file (peer)"] = top1_agreement(
                    test_reference, LiteRTModel(path, args.threads).outputs(test)
                )
            if fallbacks:
                # a routed model's speed depends on the images: every runner goes round all held-out images
                lite = LiteRTModel(path, args.threads)
                runs = [("LiteRT", cycling([lite.runner(image) for image in heldout]))]
                models = {
                    "int8 default": written[default],
                    **{k.split(": ", 1)[1]: v for k, v in fallbacks.items()},
                }
                for name, model_path in models.items():
                    session = ort_session(model_path, args.threads)
                    runs.append(
                        (
                            name,
                            cycling(
                                [session_runner(session, heldout[i : i + 1]) for i in range(len(heldout))]
                            ),
                        )
                    )
                speeds += measure_alternating(f"{alpha} MobileNet-{size}", runs, per_pass=len(heldout))
        for label, outputs in results.items():
            rows.append(
                (
                    f"{alpha} MobileNet-{size}",
                    label,
                    top1_agreement(reference, outputs),
                    top1_agreement(reference, outputs, confident),
                    len(confident),
                    None if "LiteRT" in label else mean_kl_divergence(reference, outputs),
                    None if labels is None else float((outputs.argmax(1) == labels).mean()),
                    on_test.get(label),
                )
            )
    held = (
        f"300 held-out crops of {len(heldout_photos)} photos"
        if args.heldout_photos is None
        else f"{len(heldout)} held-out images (centre crops and their flips of the photos in {args.heldout_photos})"
    )
    print(
        f"\nint8 vs our float export, top-1 agreement on {held} ({len(calibration_photos)} other photos "
        f"calibrate); {bits}-bit weights, QAT lr {args.qat_lr:g}; {platform.machine()} ({cpu_isa()})"
    )
    print(
        f"| model | int8 | all crops | crops with float p ≥ {args.confident:g} | confident crops | mean KL "
        "| top-1 accuracy (labels in the file names) | agreement on --test-photos |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for model_name, label, whole, sure, count, kl, accuracy, tested in rows:
        divergence = "– (8-bit probabilities)" if kl is None else f"{kl:.4f}"
        correct = "–" if accuracy is None else f"{accuracy:.3f}"
        test_cell = "–" if tested is None else f"{tested:.3f}"
        print(
            f"| {model_name} | {label} | {whole:.3f} | {sure:.3f} | {count} | {divergence} | {correct} | {test_cell} |"
        )
    if speeds:
        print(f"\nbatch 1, {args.threads} thread(s), alternating; {platform.machine()} ({cpu_isa()})")
        print("| model | runtime | img/s | vs LiteRT |")
        print("|---|---|---:|---:|")
        for row in speeds:
            ratio = "" if row.vs_peer is None else f"{row.vs_peer:.2f}x"
            print(f"| {row.model} | {row.runtime} | {row.images_per_s_b1:,.0f} | {ratio} |")


if __name__ == "__main__":
    main()
