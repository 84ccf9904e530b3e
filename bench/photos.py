"""The photos the serving benchmarks send: held-out test photos when the data is there, generated ones otherwise."""

from __future__ import annotations

import colorsys
import io
import logging
import random
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_SPLIT = REPO_ROOT / "artifacts" / "splits" / "test.csv"
IMAGES = REPO_ROOT / "data" / "images"
GENERATED_CLASSES = 14  # as many as the dataset has, so a batch mixes as many kinds of picture
GENERATED_SIZE = 256  # about the size of the dataset's photos: decoding costs what it costs for theirs

log = logging.getLogger("bench.photos")


@dataclass(frozen=True)
class Photo:
    class_name: str
    data: bytes  # the encoded file (JPEG)


def benchmark_photos(
    count: int, per_class: int | None = None, split: Path = TEST_SPLIT, images: Path = IMAGES
) -> list[Photo]:
    """Up to `count` held-out test photos (`split` rows, files under `images`) in a fixed shuffled order, at most
    `per_class` of each class; `count` generated photos when the split or the images are missing."""
    if not (split.is_file() and images.is_dir()):
        log.warning("no test split at %s (or no images at %s): using generated photos", split, images)
        return generated_photos(count)
    import pandas as pd

    frame = pd.read_csv(split, dtype={"path": "string", "class_name": "string"})
    if per_class is not None:
        frame = frame.groupby("class_name").head(per_class)
    rows = list(zip(frame["class_name"], frame["path"], strict=True))
    random.Random(0).shuffle(rows)
    return [Photo(name, (images / path).read_bytes()) for name, path in rows[:count]]


def generated_photos(count: int, size: int = GENERATED_SIZE) -> list[Photo]:
    """`count` JPEGs of a product-photo size: per class a hue and a shape on a light background, varied per photo."""
    from PIL import Image, ImageDraw

    photos = []
    for index in range(count):
        kind = index % GENERATED_CLASSES
        rng = random.Random(index)
        red, green, blue = colorsys.hsv_to_rgb(kind / GENERATED_CLASSES, 0.8, rng.uniform(0.5, 0.9))
        image = Image.new("RGB", (size, size), tuple(rng.randint(200, 250) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        inset = rng.randint(size // 10, size // 4)
        box = (inset, inset + rng.randint(-8, 8), size - inset, size - inset)
        fill = (int(red * 255), int(green * 255), int(blue * 255))
        (draw.ellipse if kind % 2 else draw.rectangle)(box, fill=fill, outline=(20, 20, 20), width=3)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        photos.append(Photo(f"class_{kind}", buffer.getvalue()))
    return photos
