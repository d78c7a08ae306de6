"""Generated "faces" in LFW's layout for tests and the demo: one folder per identity, each identity a distinct
drawn configuration (face shape, skin, eyes, brows, nose, mouth, hair, glasses, background), each image of
it that configuration with per-image jitter (pose shift and tilt, lighting, expression, noise), plus an
LFW-style ``pairs.txt``. With ``clutter`` the background is a per-photo textured scene (no identity cue)
and pose, scale and lighting vary more, as in LFW's photos."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mobilenets.datasets.faces import lfw_image_path, write_pairs
from mobilenets.datasets.synthetic.drawing import add_noise, ellipse_box, random_colour, textured_background


@dataclass(frozen=True)
class FaceIdentity:
    """The drawn configuration that makes one synthetic person recognisable."""

    name: str
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    background: tuple[int, int, int]
    eye_colour: tuple[int, int, int]
    face_width: float
    face_height: float
    eye_spacing: float
    eye_height: float
    eye_size: float
    brow_tilt: float
    nose_length: float
    mouth_width: float
    mouth_curve: float
    hair_style: int
    glasses: bool


def random_identity(name: str, rng: np.random.Generator) -> FaceIdentity:
    """A new person: every trait of the drawing drawn at random."""
    return FaceIdentity(
        name=name,
        skin=random_colour(rng, 90, 250),
        hair=random_colour(rng, 0, 200),
        background=random_colour(rng, 0, 256),
        eye_colour=random_colour(rng, 0, 160),
        face_width=float(rng.uniform(0.28, 0.40)),
        face_height=float(rng.uniform(0.36, 0.46)),
        eye_spacing=float(rng.uniform(0.09, 0.17)),
        eye_height=float(rng.uniform(-0.12, -0.02)),
        eye_size=float(rng.uniform(0.03, 0.065)),
        brow_tilt=float(rng.uniform(-0.05, 0.05)),
        nose_length=float(rng.uniform(0.05, 0.14)),
        mouth_width=float(rng.uniform(0.08, 0.2)),
        mouth_curve=float(rng.uniform(-0.06, 0.06)),
        hair_style=int(rng.integers(0, 4)),
        glasses=bool(rng.random() < 0.3),
    )


def draw_face(
    identity: FaceIdentity, size: int, rng: np.random.Generator, clutter: bool = False
) -> Image.Image:
    """One photo of ``identity``: its configuration under a random pose, lighting and expression; with
    ``clutter`` on a random textured background, at a random scale and a larger shift and tilt."""
    scale = 4  # draw large, then downsample: smooth edges
    canvas = size * scale
    fill = identity.background  # also what rotation uncovers
    if clutter:
        scene = textured_background(rng, size, size)
        image = Image.fromarray(scene).resize((canvas, canvas), Image.NEAREST)
        fill = tuple(int(c) for c in scene.reshape(-1, 3).mean(axis=0))
    else:
        image = Image.new("RGB", (canvas, canvas), fill)
    draw = ImageDraw.Draw(image)
    shift, zoom, tilt_range = (0.08, rng.uniform(0.85, 1.1), 12) if clutter else (0.04, 1.0, 8)
    cx = canvas * (0.5 + rng.uniform(-shift, shift))
    cy = canvas * (0.5 + rng.uniform(-shift, shift))
    unit = canvas * zoom  # the face's own scale
    fw, fh = identity.face_width * unit, identity.face_height * unit

    # hair behind the face
    if identity.hair_style == 1:
        draw.ellipse(ellipse_box(cx, cy - 0.1 * fh, 1.15 * fw, 1.05 * fh), fill=identity.hair)
    elif identity.hair_style == 2:
        draw.rectangle((cx - 1.1 * fw, cy - 1.1 * fh, cx + 1.1 * fw, cy + 0.6 * fh), fill=identity.hair)
    draw.ellipse(ellipse_box(cx, cy, fw, fh), fill=identity.skin)
    if identity.hair_style in (0, 2):
        draw.chord(ellipse_box(cx, cy - 0.15 * fh, fw, 0.95 * fh), 180, 360, fill=identity.hair)
    elif identity.hair_style == 3:
        draw.pieslice(ellipse_box(cx, cy - 0.5 * fh, 0.7 * fw, 0.6 * fh), 180, 360, fill=identity.hair)
    ey = cy + identity.eye_height * unit
    es = identity.eye_size * unit
    for side in (-1, 1):
        ex = cx + side * identity.eye_spacing * unit
        draw.ellipse(ellipse_box(ex, ey, 1.4 * es, es), fill=(245, 245, 245))
        draw.ellipse(ellipse_box(ex, ey, 0.7 * es, 0.7 * es), fill=identity.eye_colour)
        tilt = side * identity.brow_tilt * unit
        draw.line(
            (ex - 1.6 * es, ey - 1.8 * es + tilt, ex + 1.6 * es, ey - 1.8 * es - tilt),
            fill=identity.hair,
            width=max(2, scale * 2),
        )
        if identity.glasses:
            draw.ellipse(ellipse_box(ex, ey, 2.2 * es, 1.8 * es), outline=(20, 20, 20), width=scale)
    nose_top, nose_bottom = ey + 0.5 * es, ey + identity.nose_length * unit
    shade = tuple(int(c * 0.75) for c in identity.skin)
    draw.polygon(
        [(cx, nose_top), (cx - 0.3 * es - 2, nose_bottom), (cx + 0.3 * es + 2, nose_bottom)], fill=shade
    )
    my = nose_bottom + 0.08 * unit
    mw = identity.mouth_width * unit
    curve = (identity.mouth_curve + rng.uniform(-0.02, 0.02)) * unit
    points = [(cx + mw * t, my + curve * (1 - t * t)) for t in np.linspace(-1, 1, 9)]
    draw.line(points, fill=(150, 40, 50), width=max(2, scale * 2))

    image = image.rotate(rng.uniform(-tilt_range, tilt_range), resample=Image.BILINEAR, fillcolor=fill)
    image = image.resize((size, size), Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32)
    lit = pixels * rng.uniform(0.8, 1.2) + rng.uniform(-15, 15)  # lighting: gain and offset
    return Image.fromarray(add_noise(lit.astype(np.float64), rng, 4))


def make_identity_folders(
    root: str | Path,
    num_identities: int,
    images_per_identity: int | tuple[int, int],
    size: int = 64,
    seed: int = 0,
    prefix: str = "Person",
    clutter: bool = False,
) -> list[FaceIdentity]:
    """Write ``root/<Name>/<Name>_0001.jpg`` … for ``num_identities`` generated people.

    ``images_per_identity`` is a count or a (min, max) range drawn per identity (LFW's counts vary);
    ``clutter``: see ``draw_face``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    identities = []
    for i in range(num_identities):
        identity = random_identity(f"{prefix}_{i:04d}", rng)
        identities.append(identity)
        if isinstance(images_per_identity, int):
            count = images_per_identity
        else:
            count = int(rng.integers(images_per_identity[0], images_per_identity[1] + 1))
        for number in range(1, count + 1):
            path = lfw_image_path(root, identity.name, number)
            path.parent.mkdir(parents=True, exist_ok=True)
            draw_face(identity, size, rng, clutter).save(path, quality=92)
    return identities


def make_lfw_pairs(
    pairs_path: str | Path, images_root: str | Path, folds: int = 10, pairs_per_fold: int = 10, seed: int = 0
) -> None:
    """An LFW-style ``pairs.txt`` over the identity folders in ``images_root``.

    As in LFW, identities are split into disjoint groups, one per fold; matched pairs need identities with
    two or more images.
    """
    images_root = Path(images_root)
    rng = np.random.default_rng(seed)
    counts = {
        folder.name: len(list(folder.glob("*.jpg")))
        for folder in sorted(images_root.iterdir())
        if folder.is_dir()
    }
    names = [n for n, c in counts.items() if c > 0]
    if len(names) < 2 * folds:
        raise ValueError(
            f"{images_root}: need at least {2 * folds} identities for {folds} folds, found {len(names)}"
        )
    order = rng.permutation(names)
    groups = [list(order[i::folds]) for i in range(folds)]
    fold_rows = []
    for group in groups:
        multi = [n for n in group if counts[n] >= 2]
        if not multi:
            raise ValueError(f"{images_root}: a fold has no identity with two images for matched pairs")
        matched, mismatched = [], []
        for _ in range(pairs_per_fold):
            name = multi[int(rng.integers(len(multi)))]
            a, b = rng.choice(np.arange(1, counts[name] + 1), size=2, replace=False)
            matched.append((name, int(a), int(b)))
            first, second = rng.choice(len(group), size=2, replace=False)
            name_a, name_b = group[first], group[second]
            mismatched.append(
                (
                    name_a,
                    int(rng.integers(1, counts[name_a] + 1)),
                    name_b,
                    int(rng.integers(1, counts[name_b] + 1)),
                )
            )
        fold_rows.append((matched, mismatched))
    write_pairs(pairs_path, fold_rows)
