"""A small CelebA-layout dataset of drawn faces whose attributes are visible in the images.

Every one of the 40 attributes is drawn (hair colour and texture, hat, glasses, smile, open mouth, beard,
lipstick, cheeks, tie, necklace, earrings, eyebrows, eye bags, nose, eyes, lips, wrinkles, blur, face shape,
skin tone, ...) or follows from drawn ones as in real faces (No_Beard, Heavy_Makeup, Attractive, Male's
correlates). ``label_noise`` flips labels as CelebA's annotators disagree, so no model reaches 100% AP;
``clutter`` puts the faces on textured backgrounds at a random scale, offset and lighting.
Writes ``img_align_celeba/*.jpg``, ``list_attr_celeba.txt`` and ``list_eval_partition.txt`` exactly as
released (the demo and the tests use it), and folders of unlabeled faces for distillation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mobilenets.datasets.atomic import write_text_atomic
from mobilenets.datasets.celeba import ATTRIBUTE_FILE, CELEBA_ATTRIBUTES, IMAGE_DIR, PARTITION_FILE
from mobilenets.datasets.synthetic.drawing import add_noise, random_colour, textured_background

#: Base rates of the attributes sampled independently (each is drawn, so each can be learned).
_RANDOM_RATES = {
    "Arched_Eyebrows": 0.3, "Bags_Under_Eyes": 0.25, "Big_Lips": 0.3, "High_Cheekbones": 0.45,
    "Oval_Face": 0.3, "Pointy_Nose": 0.3, "Receding_Hairline": 0.2, "Young": 0.7,
}  # fmt: skip
SKIN = {False: (224, 172, 140), True: (250, 228, 215)}
HAIR = {
    "Black_Hair": (25, 20, 20),
    "Blond_Hair": (235, 205, 95),
    "Brown_Hair": (120, 70, 35),
    "Gray_Hair": (170, 170, 170),
}


def sample_attributes(rng: np.random.Generator, label_noise: float = 0.0) -> dict[str, bool]:
    """One face's 40 attributes, with the correlations of real faces (beards and ties on men, grey hair
    on the old, make-up with lipstick); ``label_noise`` of the labels flipped, as annotators disagree."""
    a = {name: False for name in CELEBA_ATTRIBUTES}
    for name, rate in _RANDOM_RATES.items():
        a[name] = bool(rng.random() < rate)
    male = bool(rng.random() < 0.5)
    a["Male"] = male
    old = not a["Young"]
    hair = rng.choice(
        ["Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair", "Bald"],
        p=[0.25, 0.2, 0.2, 0.25, 0.1] if old else [0.32, 0.25, 0.3, 0.05, 0.08],
    )
    a[str(hair)] = True
    a["Wearing_Hat"] = bool(rng.random() < 0.2)
    has_hair = hair != "Bald"
    a["Bangs"] = has_hair and not a["Wearing_Hat"] and rng.random() < 0.35
    texture = rng.choice(["straight", "wavy", "plain"], p=[0.3, 0.35, 0.35])
    a["Straight_Hair"] = has_hair and texture == "straight"
    a["Wavy_Hair"] = has_hair and texture == "wavy"
    a["Receding_Hairline"] = has_hair and not a["Bangs"] and a["Receding_Hairline"]
    a["Eyeglasses"] = bool(rng.random() < 0.25)
    a["Smiling"] = bool(rng.random() < 0.45)
    a["Mouth_Slightly_Open"] = bool(rng.random() < 0.4)
    a["Mustache"] = bool(rng.random() < (0.4 if male else 0.02))
    a["Goatee"] = bool(rng.random() < (0.35 if male else 0.01))
    a["No_Beard"] = not (a["Mustache"] or a["Goatee"])
    a["Sideburns"] = male and has_hair and rng.random() < 0.35
    a["5_o_Clock_Shadow"] = male and a["No_Beard"] and rng.random() < 0.35
    a["Wearing_Lipstick"] = bool(rng.random() < (0.04 if male else 0.6))
    a["Heavy_Makeup"] = a["Wearing_Lipstick"] and rng.random() < 0.7
    a["Rosy_Cheeks"] = bool(rng.random() < 0.3)
    a["Pale_Skin"] = bool(rng.random() < 0.3)
    a["Wearing_Necktie"] = male and rng.random() < 0.35
    a["Wearing_Necklace"] = not male and rng.random() < 0.4
    a["Wearing_Earrings"] = bool(rng.random() < (0.08 if male else 0.5))
    a["Bushy_Eyebrows"] = bool(rng.random() < 0.35)
    a["Narrow_Eyes"] = bool(rng.random() < 0.3)
    a["Big_Nose"] = bool(rng.random() < 0.35)
    a["Pointy_Nose"] = a["Pointy_Nose"] and not a["Big_Nose"]
    a["Blurry"] = bool(rng.random() < 0.1)
    a["Chubby"] = bool(rng.random() < 0.25)
    a["Oval_Face"] = a["Oval_Face"] and not a["Chubby"]
    a["Double_Chin"] = a["Chubby"] and rng.random() < 0.6
    # "attractive" as annotators use it: young, smiling or made up, no eye bags (a function of drawn parts)
    a["Attractive"] = a["Young"] and not a["Bags_Under_Eyes"] and (a["Smiling"] or a["Heavy_Makeup"])
    for name in CELEBA_ATTRIBUTES:
        if rng.random() < label_noise:
            a[name] = not a[name]
    return a


def _jitter(colour: tuple[int, int, int], rng: np.random.Generator, amount: int = 18) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)  # type: ignore[return-value]


def draw_face(
    attributes: dict[str, bool], size: tuple[int, int], rng: np.random.Generator, clutter: bool = False
) -> Image.Image:
    """Draw a face of ``size`` (width, height) showing ``attributes``, with jittered colours and sensor
    noise; with ``clutter`` on a textured background, at a random scale, offset and lighting."""
    a = attributes
    width, height = size
    if clutter:
        image = Image.fromarray(textured_background(rng, height, width))
    else:
        image = Image.new("RGB", size, random_colour(rng, 60, 200))
    draw = ImageDraw.Draw(image)
    scale = rng.uniform(1.0, 1.25) if clutter else 1.0
    shift = (0.07, 0.05) if clutter else (0.03, 0.02)
    cx = width * (0.5 + rng.uniform(-shift[0], shift[0]))
    cy = height * (0.5 + rng.uniform(-shift[1], shift[1]))
    sw, sh = width * scale, height * scale
    rx = sw * (0.36 if a["Chubby"] else 0.28)
    ry = sh * (0.36 if a["Oval_Face"] else 0.3)
    line = max(2, round(sw / 22))

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        return (cx + x0 * sw, cy + y0 * sh, cx + x1 * sw, cy + y1 * sh)

    def point(x: float, y: float) -> tuple[float, float]:
        return (cx + x * sw, cy + y * sh)

    # shoulders and neckwear
    draw.rectangle((0, cy + 0.28 * sh, width, height), fill=random_colour(rng, 20, 140))
    if a["Wearing_Necktie"]:
        draw.polygon([point(-0.05, 0.3), point(0.05, 0.3), point(0, 0.46)], fill=_jitter((200, 20, 30), rng))
    if a["Wearing_Necklace"]:
        draw.arc(box(-0.22, 0.18, 0.22, 0.4), 20, 160, fill=(255, 215, 0), width=line)
    # hair behind the face: its colour, and strands that show its texture
    hair_colour = next((_jitter(HAIR[h], rng, 12) for h in HAIR if a[h]), None)
    if hair_colour:
        draw.ellipse(box(-0.36, -0.38, 0.36, 0.12), fill=hair_colour)
        strand = tuple(int(c * 0.55) for c in hair_colour)
        for k in range(7):
            x = -0.3 + 0.1 * k
            if a["Wavy_Hair"]:
                wave = [point(x + 0.025 * (-1) ** j, -0.3 + 0.07 * j) for j in range(6)]
                draw.line(wave, fill=strand, width=line)
            elif a["Straight_Hair"]:
                draw.line([point(x, -0.32), point(x, 0.08)], fill=strand, width=line)
    skin = _jitter(SKIN[a["Pale_Skin"]], rng, 10)
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=skin)
    shade = tuple(int(c * 0.72) for c in skin)
    if a["Double_Chin"]:
        draw.arc(box(-0.12, 0.18, 0.12, 0.31), 0, 180, fill=(150, 100, 80), width=line)
    if a["High_Cheekbones"]:
        for side in (-1, 1):
            draw.line([point(side * 0.2, -0.02), point(side * 0.13, 0.06)], fill=shade, width=line)
    if hair_colour and a["Sideburns"]:
        draw.rectangle(box(-0.29, -0.12, -0.24, 0.05), fill=hair_colour)
        draw.rectangle(box(0.24, -0.12, 0.29, 0.05), fill=hair_colour)
    if hair_colour and a["Bangs"]:
        draw.rectangle(box(-0.24, -0.3, 0.24, -0.17), fill=hair_colour)
    if hair_colour and not a["Bangs"] and not a["Receding_Hairline"]:
        draw.chord(box(-0.27, -0.34, 0.27, -0.12), 180, 360, fill=hair_colour)
    if not a["Young"]:  # forehead wrinkles
        for y in (-0.2, -0.17):
            draw.line([point(-0.1, y), point(0.1, y)], fill=shade, width=line)
    if a["Wearing_Hat"]:
        hat = random_colour(rng, 0, 200)
        draw.rectangle(box(-0.38, -0.29, 0.38, -0.23), fill=hat)
        draw.rectangle(box(-0.25, -0.48, 0.25, -0.28), fill=hat)
    # eyes, brows, glasses
    eye_h = 0.012 if a["Narrow_Eyes"] else 0.035
    brow_colour = hair_colour or (50, 35, 25)
    for side in (-1, 1):
        ex = side * 0.11
        draw.ellipse(box(ex - 0.05, -0.08 - eye_h, ex + 0.05, -0.08 + eye_h), fill=(255, 255, 255))
        pupil = min(eye_h, 0.018)
        draw.ellipse(box(ex - 0.018, -0.08 - pupil, ex + 0.018, -0.08 + pupil), fill=(40, 30, 30))
        brow = 0.035 if a["Bushy_Eyebrows"] else 0.01
        if a["Arched_Eyebrows"]:
            draw.arc(
                box(ex - 0.06, -0.17, ex + 0.06, -0.1),
                200,
                340,
                fill=brow_colour,
                width=max(2, round(brow * sh)),
            )
        else:
            draw.rectangle(box(ex - 0.06, -0.14 - brow, ex + 0.06, -0.14), fill=brow_colour)
        if a["Bags_Under_Eyes"]:
            draw.arc(box(ex - 0.045, -0.07, ex + 0.045, -0.03), 20, 160, fill=(120, 80, 90), width=line)
        if a["Eyeglasses"]:
            draw.rectangle(box(ex - 0.075, -0.12, ex + 0.075, -0.04), outline=(10, 10, 10), width=line)
        if a["Rosy_Cheeks"]:
            draw.ellipse(box(side * 0.17 - 0.045, 0.0, side * 0.17 + 0.045, 0.07), fill=(235, 110, 120))
        if a["Wearing_Earrings"]:
            ear = side * rx / sw
            draw.ellipse(box(ear - 0.02, 0.02, ear + 0.02, 0.07), fill=(255, 215, 0))
    if a["Eyeglasses"]:
        draw.line([point(-0.035, -0.08), point(0.035, -0.08)], fill=(10, 10, 10), width=line)
    # nose
    nose = 0.05 if a["Big_Nose"] else 0.025
    tip = 0.11 if a["Pointy_Nose"] else 0.05
    draw.polygon([point(0, -0.04), point(-nose, tip), point(nose, tip)], fill=shade)
    # facial hair
    if a["5_o_Clock_Shadow"]:
        draw.chord(box(-0.17, 0.04, 0.17, 0.27), 0, 180, fill=(175, 140, 120))
    if a["Goatee"]:
        draw.rectangle(box(-0.05, 0.19, 0.05, 0.27), fill=(60, 40, 25))
    if a["Mustache"]:
        draw.rectangle(box(-0.09, 0.085, 0.09, 0.105), fill=(60, 40, 25))
    # mouth
    lips = (200, 20, 60) if a["Wearing_Lipstick"] else (150, 70, 70)
    lip = line * 3 if a["Big_Lips"] else line
    if a["Mouth_Slightly_Open"]:
        draw.ellipse(box(-0.07, 0.11, 0.07, 0.17), fill=(60, 10, 20), outline=lips, width=lip)
    elif not a["Smiling"]:
        draw.line([point(-0.08, 0.14), point(0.08, 0.14)], fill=lips, width=lip)
    if a["Smiling"]:
        draw.arc(box(-0.11, 0.04, 0.11, 0.19), 20, 160, fill=lips, width=lip)
    if a["Heavy_Makeup"]:
        for side in (-1, 1):
            draw.rectangle(box(side * 0.11 - 0.05, -0.125, side * 0.11 + 0.05, -0.11), fill=(90, 40, 140))
    light = rng.uniform(0.8, 1.15) if clutter else 1.0
    image = Image.fromarray(add_noise(np.asarray(image, dtype=np.float64) * light, rng, 6))
    if a["Blurry"]:
        image = image.filter(ImageFilter.GaussianBlur(radius=width / 40))
    return image


def make_celeba(
    root: Path,
    num_images: int = 200,
    size: tuple[int, int] = (178, 218),
    seed: int = 0,
    fractions: tuple[float, float] = (0.7, 0.15),
    clutter: bool = False,
    label_noise: float = 0.0,
) -> np.ndarray:
    """Write a CelebA-layout dataset of ``num_images`` drawn faces under ``root``.

    The first ``fractions[0]`` of the images are train (0), the next ``fractions[1]`` val (1), the rest
    test (2), consecutive as in CelebA. ``clutter`` and ``label_noise``: see the module. Returns the
    labels (N, 40) in {-1, 1}.
    """
    root = Path(root)
    (root / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = np.empty((num_images, len(CELEBA_ATTRIBUTES)), dtype=np.int8)
    names = []
    for index in range(num_images):
        attributes = sample_attributes(rng, label_noise)
        name = f"{index + 1:06d}.jpg"
        draw_face(attributes, size, rng, clutter).save(root / IMAGE_DIR / name, quality=95)
        labels[index] = [1 if attributes[a] else -1 for a in CELEBA_ATTRIBUTES]
        names.append(name)
    rows = [f"{num_images}", " ".join(CELEBA_ATTRIBUTES) + " "]
    rows += [f"{name} " + " ".join(f"{v:2d}" for v in row) for name, row in zip(names, labels)]
    write_text_atomic(root / ATTRIBUTE_FILE, "\n".join(rows) + "\n")
    train_end = round(num_images * fractions[0])
    val_end = train_end + round(num_images * fractions[1])
    partition = [f"{name} {0 if i < train_end else 1 if i < val_end else 2}" for i, name in enumerate(names)]
    write_text_atomic(root / PARTITION_FILE, "\n".join(partition) + "\n")
    return labels


def make_unlabeled_faces(
    folder: Path, num_images: int, size: tuple[int, int] = (178, 218), seed: int = 1, clutter: bool = False
) -> list[Path]:
    """Drawn faces without labels in nested folders (``a/``, ``b/sub/``), as extra distillation data."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(num_images):
        sub = folder / ("a" if index % 2 == 0 else "b/sub")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"face_{index:05d}.jpg"
        draw_face(sample_attributes(rng), size, rng, clutter).save(path, quality=95)
        paths.append(path)
    return paths
