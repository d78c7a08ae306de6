"""A small CelebA-layout dataset of drawn faces whose attributes are visible in the images.

About 25 of the 40 attributes are drawn (hair colour, hat, glasses, smile, open mouth, moustache, goatee,
lipstick, cheeks, tie, necklace, earrings, eyebrows, nose, eyes, blur, face width, skin tone, ...), some
follow from others as in real faces (No_Beard, Heavy_Makeup, Male's correlates) and the rest are random,
so an attribute model can learn most of them but not all, as on real CelebA.
Writes ``img_align_celeba/*.jpg``, ``list_attr_celeba.txt`` and ``list_eval_partition.txt`` exactly as
released (the demo and the tests use it), and folders of unlabeled faces for distillation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mobilenets.datasets.celeba import ATTRIBUTE_FILE, CELEBA_ATTRIBUTES, IMAGE_DIR, PARTITION_FILE

#: Base rates of the attributes not derived from others.
_RANDOM_RATES = {
    "Arched_Eyebrows": 0.3, "Attractive": 0.5, "Bags_Under_Eyes": 0.25, "Big_Lips": 0.3,
    "High_Cheekbones": 0.45, "Oval_Face": 0.3, "Pointy_Nose": 0.3, "Receding_Hairline": 0.2,
    "Straight_Hair": 0.3, "Wavy_Hair": 0.35, "Young": 0.7,
}  # fmt: skip

SKIN = {False: (224, 172, 140), True: (250, 228, 215)}
HAIR = {
    "Black_Hair": (25, 20, 20),
    "Blond_Hair": (235, 205, 95),
    "Brown_Hair": (120, 70, 35),
    "Gray_Hair": (170, 170, 170),
}


def sample_attributes(rng: np.random.Generator) -> dict[str, bool]:
    """One face's 40 attributes, with the correlations of real faces for the drawn ones."""
    a = {name: False for name in CELEBA_ATTRIBUTES}
    for name, rate in _RANDOM_RATES.items():
        a[name] = bool(rng.random() < rate)
    male = bool(rng.random() < 0.5)
    a["Male"] = male
    hair = rng.choice(
        ["Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair", "Bald"], p=[0.3, 0.22, 0.25, 0.13, 0.1]
    )
    a[str(hair)] = True
    a["Wearing_Hat"] = bool(rng.random() < 0.25)
    a["Bangs"] = hair != "Bald" and not a["Wearing_Hat"] and rng.random() < 0.35
    a["Eyeglasses"] = bool(rng.random() < 0.3)
    a["Smiling"] = bool(rng.random() < 0.45)
    a["Mouth_Slightly_Open"] = bool(rng.random() < 0.4)
    a["Mustache"] = bool(rng.random() < (0.4 if male else 0.02))
    a["Goatee"] = bool(rng.random() < (0.35 if male else 0.01))
    a["No_Beard"] = not (a["Mustache"] or a["Goatee"])
    a["Sideburns"] = male and hair != "Bald" and rng.random() < 0.35
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
    a["Blurry"] = bool(rng.random() < 0.12)
    a["Chubby"] = bool(rng.random() < 0.25)
    a["Double_Chin"] = a["Chubby"] and rng.random() < 0.6
    return a


def draw_face(attributes: dict[str, bool], size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Draw a face of ``size`` (width, height) showing ``attributes``."""
    a = attributes
    width, height = size
    background = tuple(int(v) for v in rng.integers(60, 200, 3))
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    cx = width * (0.5 + rng.uniform(-0.03, 0.03))
    cy = height * (0.5 + rng.uniform(-0.02, 0.02))
    rx = width * (0.36 if a["Chubby"] else 0.28)
    ry = height * 0.3

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        return (cx + x0 * width, cy + y0 * height, cx + x1 * width, cy + y1 * height)

    # shoulders and neckwear
    draw.rectangle((0, cy + ry * 0.95, width, height), fill=(50, 60, 110))
    if a["Wearing_Necktie"]:
        draw.polygon(
            [box(-0.05, 0.3, 0, 0)[:2], box(0.05, 0.3, 0, 0)[:2], box(0, 0.46, 0, 0)[:2]], fill=(200, 20, 30)
        )
    if a["Wearing_Necklace"]:
        draw.arc(box(-0.22, 0.18, 0.22, 0.4), 20, 160, fill=(255, 215, 0), width=max(2, width // 40))
    # hair behind the face
    hair_colour = next((HAIR[h] for h in HAIR if a[h]), None)
    if hair_colour:
        draw.ellipse(box(-0.36, -0.38, 0.36, 0.12), fill=hair_colour)
    skin = SKIN[a["Pale_Skin"]]
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=skin)
    if a["Double_Chin"]:
        draw.arc(box(-0.12, 0.18, 0.12, 0.31), 0, 180, fill=(150, 100, 80), width=max(2, width // 50))
    if hair_colour and a["Sideburns"]:
        draw.rectangle(box(-0.29, -0.12, -0.24, 0.05), fill=hair_colour)
        draw.rectangle(box(0.24, -0.12, 0.29, 0.05), fill=hair_colour)
    if hair_colour and a["Bangs"]:
        draw.rectangle(box(-0.24, -0.3, 0.24, -0.17), fill=hair_colour)
    if a["Wearing_Hat"]:
        draw.rectangle(box(-0.38, -0.29, 0.38, -0.23), fill=(30, 90, 40))
        draw.rectangle(box(-0.25, -0.48, 0.25, -0.28), fill=(30, 90, 40))
    # eyes, brows, glasses
    eye_h = 0.012 if a["Narrow_Eyes"] else 0.03
    for side in (-1, 1):
        ex = side * 0.11
        draw.ellipse(box(ex - 0.05, -0.08 - eye_h, ex + 0.05, -0.08 + eye_h), fill=(255, 255, 255))
        draw.ellipse(
            box(ex - 0.018, -0.08 - min(eye_h, 0.018), ex + 0.018, -0.08 + min(eye_h, 0.018)),
            fill=(40, 30, 30),
        )
        brow = 0.025 if a["Bushy_Eyebrows"] else 0.008
        draw.rectangle(box(ex - 0.06, -0.14 - brow, ex + 0.06, -0.14), fill=(50, 35, 25))
        if a["Eyeglasses"]:
            draw.rectangle(
                box(ex - 0.075, -0.12, ex + 0.075, -0.04), outline=(10, 10, 10), width=max(2, width // 45)
            )
        if a["Rosy_Cheeks"]:
            draw.ellipse(box(side * 0.17 - 0.045, 0.0, side * 0.17 + 0.045, 0.07), fill=(235, 110, 120))
        if a["Wearing_Earrings"]:
            draw.ellipse(
                box(side * (rx / width) - 0.02, 0.02, side * (rx / width) + 0.02, 0.07), fill=(255, 215, 0)
            )
    if a["Eyeglasses"]:
        draw.line(
            [box(-0.035, -0.08, 0, 0)[:2], box(0.035, -0.08, 0, 0)[:2]],
            fill=(10, 10, 10),
            width=max(2, width // 45),
        )
    # nose
    nose = 0.05 if a["Big_Nose"] else 0.025
    draw.polygon(
        [box(0, -0.04, 0, 0)[:2], box(-nose, 0.05, 0, 0)[:2], box(nose, 0.05, 0, 0)[:2]], fill=(190, 130, 105)
    )
    # facial hair
    if a["5_o_Clock_Shadow"]:
        draw.chord(box(-0.17, 0.04, 0.17, 0.27), 0, 180, fill=(175, 140, 120))
    if a["Goatee"]:
        draw.rectangle(box(-0.05, 0.19, 0.05, 0.27), fill=(60, 40, 25))
    if a["Mustache"]:
        draw.rectangle(box(-0.09, 0.07, 0.09, 0.1), fill=(60, 40, 25))
    # mouth
    lips = (200, 20, 60) if a["Wearing_Lipstick"] else (150, 70, 70)
    line = max(2, width // 35)
    if a["Mouth_Slightly_Open"]:
        draw.ellipse(box(-0.07, 0.11, 0.07, 0.17), fill=(60, 10, 20), outline=lips, width=line)
    elif a["Smiling"]:
        pass
    else:
        draw.line([box(-0.08, 0.14, 0, 0)[:2], box(0.08, 0.14, 0, 0)[:2]], fill=lips, width=line)
    if a["Smiling"]:
        draw.arc(box(-0.11, 0.04, 0.11, 0.19), 20, 160, fill=lips, width=line)
    if a["Heavy_Makeup"]:
        for side in (-1, 1):
            draw.rectangle(box(side * 0.11 - 0.05, -0.125, side * 0.11 + 0.05, -0.11), fill=(90, 40, 140))
    noise = rng.normal(0, 6, (height, width, 3))
    image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
    if a["Blurry"]:
        image = image.filter(ImageFilter.GaussianBlur(radius=width / 45))
    return image


def write_synthetic_celeba(
    root: Path,
    num_images: int = 200,
    size: tuple[int, int] = (178, 218),
    seed: int = 0,
    fractions: tuple[float, float] = (0.7, 0.15),
) -> np.ndarray:
    """Write a CelebA-layout dataset of ``num_images`` drawn faces under ``root``.

    The first ``fractions[0]`` of the images are train (0), the next ``fractions[1]`` val (1), the rest
    test (2), consecutive as in CelebA. Returns the labels (N, 40) in {-1, 1}.
    """
    root = Path(root)
    (root / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = np.empty((num_images, len(CELEBA_ATTRIBUTES)), dtype=np.int8)
    names = []
    for index in range(num_images):
        attributes = sample_attributes(rng)
        name = f"{index + 1:06d}.jpg"
        draw_face(attributes, size, rng).save(root / IMAGE_DIR / name, quality=95)
        labels[index] = [1 if attributes[a] else -1 for a in CELEBA_ATTRIBUTES]
        names.append(name)
    rows = [f"{num_images}", " ".join(CELEBA_ATTRIBUTES) + " "]
    rows += [f"{name} " + " ".join(f"{v:2d}" for v in row) for name, row in zip(names, labels)]
    (root / ATTRIBUTE_FILE).write_text("\n".join(rows) + "\n")
    train_end = round(num_images * fractions[0])
    val_end = train_end + round(num_images * fractions[1])
    partition = [f"{name} {0 if i < train_end else 1 if i < val_end else 2}" for i, name in enumerate(names)]
    (root / PARTITION_FILE).write_text("\n".join(partition) + "\n")
    return labels


def write_unlabeled_faces(
    folder: Path, num_images: int, size: tuple[int, int] = (178, 218), seed: int = 1
) -> list[Path]:
    """Drawn faces without labels in nested folders (``a/``, ``b/sub/``), as extra distillation data."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(num_images):
        sub = folder / ("a" if index % 2 == 0 else "b/sub")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"face_{index:05d}.jpg"
        draw_face(sample_attributes(rng), size, rng).save(path, quality=95)
        paths.append(path)
    return paths
