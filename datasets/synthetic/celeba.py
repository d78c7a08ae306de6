"""A small CelebA-layout dataset of drawn faces whose attributes are visible in the images.

Every one of the 40 attributes is drawn (hair colour, length and texture, hat, glasses, smile, open mouth,
beard, stubble, lipstick, make-up, cheeks, tie, necklace, earrings, eyebrows, eye bags, nose, eyes, lips,
wrinkles, blur, face shape, skin tone, ...) or follows from drawn ones as in real faces (No_Beard, Bald,
Attractive), each large enough to see inside the centre crop of a 48-64 px input.
``label_noise`` flips labels as CelebA's annotators disagree, so no model reaches 100% AP;
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


def _shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * factor, 0, 255)) for c in colour)  # type: ignore[return-value]


def _contrast(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """A strand colour that shows on the hair: darker on light hair, lighter on dark hair."""
    return _shade(colour, 0.5) if sum(colour) > 240 else tuple(min(255, c + 80) for c in colour)  # type: ignore[return-value]


def draw_face(
    attributes: dict[str, bool], size: tuple[int, int], rng: np.random.Generator, clutter: bool = False
) -> Image.Image:
    """Draw a face of ``size`` (width, height) showing ``attributes``, with jittered colours and sensor
    noise; with ``clutter`` on a textured background, at a random scale, offset and lighting.

    Every attribute changes a region of the face that stays inside the centre crop models evaluate on
    (the face from hat brim to tie knot) and is several pixels across at 48-64 px inputs: thin strokes
    and skin-on-skin shading vanish at that resolution, so details are drawn bold and in contrasting
    colours (stubble as dots, dark nostrils, white teeth, strands lighter than dark hair).
    The random draws do not depend on the attributes, so the same ``rng`` state draws the same face with
    one attribute changed only where that attribute shows.
    """
    a = attributes
    width, height = size
    if clutter:
        image = Image.fromarray(textured_background(rng, height, width))
    else:
        image = Image.new("RGB", size, random_colour(rng, 60, 200))
    draw = ImageDraw.Draw(image)
    scale = rng.uniform(0.9, 1.05) if clutter else 0.95
    shift = (0.06, 0.03) if clutter else (0.02, 0.01)
    cx = width * (0.5 + rng.uniform(-shift[0], shift[0]))
    cy = height * (0.47 + rng.uniform(-shift[1], shift[1]))
    skin = _jitter(SKIN[a["Pale_Skin"]], rng, 10)
    hair = _jitter(next((HAIR[h] for h in HAIR if a[h]), (0, 0, 0)), rng, 12)
    hair_colour = hair if any(a[h] for h in HAIR) else None
    clothes, hat, tie = random_colour(rng, 20, 140), random_colour(rng, 0, 200), _jitter((200, 20, 30), rng)
    lips = _jitter((215, 15, 70) if a["Wearing_Lipstick"] else (160, 90, 85), rng, 12)
    light = rng.uniform(0.8, 1.15) if clutter else 1.0
    stubble_rng = np.random.default_rng(int(rng.integers(2**32)))
    sw, sh = width * scale, height * scale
    rx = 0.35 if a["Chubby"] else 0.235 if a["Oval_Face"] else 0.28
    ry = 0.33 if a["Oval_Face"] else 0.28
    line = max(2, round(sw / 22))

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        return (cx + x0 * sw, cy + y0 * sh, cx + x1 * sw, cy + y1 * sh)

    def point(x: float, y: float) -> tuple[float, float]:
        return (cx + x * sw, cy + y * sh)

    shade = _shade(skin, 0.62)
    long_hair = hair_colour is not None and not a["Male"]
    # shoulders, neck and neckwear (just below the chin, inside the crop)
    draw.rectangle((0, cy + 0.27 * sh, width, height), fill=clothes)
    if long_hair:  # hair falling to the shoulders behind the face
        draw.rounded_rectangle(box(-0.37, -0.2, 0.37, 0.3), radius=0.1 * sw, fill=hair_colour)
    draw.rectangle(box(-0.1, 0.15, 0.1, 0.3), fill=_shade(skin, 0.9))
    if a["Wearing_Necktie"]:
        draw.polygon(
            [point(-0.12, 0.26), point(0, 0.31), point(0.12, 0.26), point(0, 0.36)], fill=(245, 245, 245)
        )
        draw.polygon(
            [point(-0.045, 0.27), point(0.045, 0.27), point(0.06, 0.45), point(-0.06, 0.45)], fill=tie
        )
    # hair behind the face: its colour, and strands that show its texture
    if hair_colour:
        draw.ellipse(box(-0.37, -0.38, 0.37, 0.1), fill=hair_colour)
    if hair_colour and a["Receding_Hairline"]:  # a bare crown: hair left only at the sides
        draw.ellipse(box(-0.22, -0.4, 0.22, 0.0), fill=skin)
    draw.ellipse(box(-rx, -ry, rx, ry), fill=skin)
    if a["Double_Chin"]:
        draw.chord(box(-0.17, ry - 0.1, 0.17, ry + 0.06), 0, 180, fill=_shade(skin, 0.92))
        draw.arc(box(-0.17, ry - 0.1, 0.17, ry + 0.06), 10, 170, fill=shade, width=line)
    if a["Wearing_Necklace"]:
        for k in range(9):  # beads around the neck, below the chin
            angle = np.pi * (0.1 + 0.8 * k / 8)
            x, y = 0.15 * np.cos(angle), ry - 0.04 + 0.07 * np.sin(angle)
            draw.ellipse(box(x - 0.025, y - 0.02, x + 0.025, y + 0.02), fill=(255, 215, 0))
    if a["High_Cheekbones"]:
        for side in (-1, 1):
            draw.line([point(side * 0.22, -0.03), point(side * 0.13, 0.06)], fill=shade, width=line)
    if hair_colour and a["Sideburns"]:
        for side in (-1, 1):
            edge = side * (rx - 0.02)
            draw.rectangle(
                box(min(edge, edge - side * 0.07), -0.12, max(edge, edge - side * 0.07), 0.1),
                fill=hair_colour,
            )
    if hair_colour and a["Bangs"]:
        draw.rectangle(box(-0.25, -0.3, 0.25, -0.13), fill=hair_colour)
    elif hair_colour and not a["Receding_Hairline"]:
        draw.chord(box(-0.27, -0.34, 0.27, -0.1), 180, 360, fill=hair_colour)
    if hair_colour and (a["Wavy_Hair"] or a["Straight_Hair"]):
        strand, top = _contrast(hair_colour), -0.36
        for x in (-0.33, -0.27, 0.27, 0.33) + (
            (-0.15, -0.05, 0.05, 0.15) if not a["Receding_Hairline"] else ()
        ):
            bottom = 0.25 if long_hair and abs(x) > 0.25 else -0.26 if abs(x) < 0.2 else 0.0
            if a["Wavy_Hair"]:
                steps = max(2, round((bottom - top) / 0.05))
                wave = [
                    point(x + 0.025 * (-1) ** j, top + (bottom - top) * j / steps) for j in range(steps + 1)
                ]
                draw.line(wave, fill=strand, width=line)
            else:
                draw.line([point(x, top), point(x, bottom)], fill=strand, width=line)
    if not a["Young"]:  # wrinkles: forehead lines and folds from the nose to the mouth corners
        for y in (-0.215, -0.175):
            draw.line([point(-0.12, y), point(0.12, y)], fill=shade, width=line)
        for side in (-1, 1):
            draw.line([point(side * 0.07, 0.04), point(side * 0.13, 0.16)], fill=shade, width=line)
    if a["Wearing_Hat"]:
        draw.rectangle(box(-0.4, -0.29, 0.4, -0.21), fill=hat)
        draw.rectangle(box(-0.26, -0.5, 0.26, -0.28), fill=hat)
    # eyes, brows, glasses
    eye_h = 0.012 if a["Narrow_Eyes"] else 0.04
    brow_colour = _shade(hair_colour, 0.6) if hair_colour else (50, 35, 25)
    brow = 0.045 if a["Bushy_Eyebrows"] else 0.014
    for side in (-1, 1):
        ex = side * 0.11
        draw.ellipse(box(ex - 0.06, -0.08 - eye_h, ex + 0.06, -0.08 + eye_h), fill=(255, 255, 255))
        pupil = min(eye_h, 0.022)
        draw.ellipse(box(ex - 0.022, -0.08 - pupil, ex + 0.022, -0.08 + pupil), fill=(40, 30, 30))
        if a["Arched_Eyebrows"]:  # a raised inverted V
            peak = point(ex + side * 0.01, -0.2 - brow / 2)
            draw.line(
                [point(ex - side * 0.07, -0.13), peak, point(ex + side * 0.07, -0.14)],
                fill=brow_colour,
                width=max(2, round(brow * sh)),
            )
        else:
            draw.rectangle(box(ex - 0.07, -0.14 - brow, ex + 0.07, -0.14), fill=brow_colour)
        if a["Bags_Under_Eyes"]:
            draw.chord(box(ex - 0.06, -0.08, ex + 0.06, -0.01), 0, 180, fill=(125, 80, 110))
        if a["Eyeglasses"]:
            draw.rectangle(
                box(ex - 0.085, -0.135, ex + 0.085, -0.03), outline=(10, 10, 10), width=max(2, line - 1)
            )
        if a["Rosy_Cheeks"]:
            draw.ellipse(box(side * 0.17 - 0.05, -0.005, side * 0.17 + 0.05, 0.075), fill=(235, 110, 120))
        if a["Wearing_Earrings"]:
            ear = side * rx
            draw.ellipse(box(ear - 0.03, 0.03, ear + 0.03, 0.1), fill=(255, 215, 0))
    if a["Eyeglasses"]:
        draw.line([point(-0.025, -0.08), point(0.025, -0.08)], fill=(10, 10, 10), width=line)
    if a["Heavy_Makeup"]:
        for side in (-1, 1):
            draw.rectangle(box(side * 0.11 - 0.06, -0.13, side * 0.11 + 0.06, -0.105), fill=(90, 40, 140))
    # nose: a small stub, a wide nose with dark nostrils, or a long narrow one with a highlight
    if a["Big_Nose"]:
        draw.polygon([point(0, -0.05), point(-0.075, 0.075), point(0.075, 0.075)], fill=shade)
        for side in (-1, 1):
            draw.ellipse(box(side * 0.04 - 0.018, 0.05, side * 0.04 + 0.018, 0.075), fill=(60, 30, 30))
    elif a["Pointy_Nose"]:
        draw.polygon([point(0, -0.06), point(-0.03, 0.1), point(0.03, 0.1)], fill=shade)
        draw.line([point(0, -0.04), point(0, 0.09)], fill=_shade(skin, 1.15), width=max(1, line - 1))
    else:
        draw.polygon([point(0, -0.02), point(-0.03, 0.045), point(0.03, 0.045)], fill=shade)
    # facial hair: stubble as dark dots, a moustache (the goatee after the mouth)
    if a["5_o_Clock_Shadow"]:
        x0, y0, x1, y1 = box(-0.2, 0.08, 0.2, ry)
        count = int((x1 - x0) * (y1 - y0) * 0.45)
        xs, ys = stubble_rng.uniform(x0, x1, count), stubble_rng.uniform(y0, y1, count)
        keep = ((xs - cx) / (0.2 * sw)) ** 2 + ((ys - y0) / (y1 - y0)) ** 2 <= 1
        draw.point(list(zip(xs[keep].tolist(), ys[keep].tolist())), fill=(70, 60, 65))
    if a["Mustache"]:
        draw.rectangle(box(-0.1, 0.085, 0.1, 0.12), fill=(60, 40, 25))
    # mouth: a line, an open mouth, a smile with teeth; big lips are thick, drawn around the mouth so they
    # never hide the teeth or the opening, and only below the moustache so they never hide it or the nose
    lip = 0.035 if a["Big_Lips"] else 0.015
    if a["Smiling"]:
        draw.chord(box(-0.12 - lip, 0.06 - lip, 0.12 + lip, 0.22 + lip), 0, 180, fill=lips)
        draw.chord(box(-0.12, 0.06, 0.12, 0.22), 0, 180, fill=(250, 250, 245))
        if a["Mouth_Slightly_Open"]:
            draw.chord(box(-0.08, 0.1, 0.08, 0.2), 0, 180, fill=(60, 10, 20))
    elif a["Mouth_Slightly_Open"]:
        draw.ellipse(box(-0.08 - lip, 0.125, 0.08 + lip, 0.2 + lip), fill=lips)
        draw.ellipse(box(-0.07, 0.125 + 0.6 * lip, 0.07, 0.2), fill=(60, 10, 20))
    else:
        draw.rectangle(box(-0.1, 0.16 - lip, 0.1, 0.16 + lip), fill=lips)
    if a["Goatee"]:  # over the lower lip's edge rather than under it
        draw.rectangle(box(-0.055, 0.225, 0.055, ry - 0.005), fill=(60, 40, 25))
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
