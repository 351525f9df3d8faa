"""Make MNIST-like 28×28 digit images without the internet.

No installed package ships the real MNIST, and nothing may be downloaded at run
time, so the MNIST example draws its digits from scikit-learn's shipped
``load_digits``: 1,797 real handwritten digits of 8×8 pixels, values 0–16. Each is
scaled to 0–255, upscaled with Pillow to an 18–22 px box and centred in a 28×28
canvas, as MNIST centres its digits in a 20×20 box.

Held-out split
--------------
The 1,797 digits are split once, with a fixed seed that does not depend on the
``seed`` arguments, into 1,347 *training* digits and 450 *held-out* digits
(stratified by label, see `digit_split`). ``train_model.py`` trains only on the
training digits; `make_images` draws the images to score only from the held-out
digits. The model therefore never sees the digits it scores, as in the Azure
tutorial, where the model is trained on MNIST's training set and scores its test
set. There are only 450 held-out digits, so 10,000 images show each of them about
22 times, every time with another random variation (shift of up to ±2 px, box size,
brightness, stroke noise), so that no two images are byte-identical.

Run as a script to make the images in a folder::

    python examples/mnist/make_data.py /tmp/mnist-images --count 10000
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import struct
import tempfile
import uuid
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["digit_split", "make_images", "render_digits"]

LABELS_FILE = "labels.csv"
IMAGE_SIZE = 28

# Fixed, so that the held-out digits are the same whatever seed a caller passes.
_SPLIT_SEED = 0
_HELD_OUT_FRACTION = 0.25
# MNIST fits each digit in a 20×20 box; a random box size varies the stroke scale.
_BOX_SIZES = (18, 20, 22)
_MAX_SHIFT = 2
_BRIGHTNESS = (0.8, 1.25)
_NOISE_STD = 10.0


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """Return scikit-learn's digits as ``(images, labels)``, loaded once."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _boxes() -> dict[int, np.ndarray]:
    """Return every digit upscaled to each box size, as float32 arrays of 0–255.

    Upscaling the 1,797 digits once (three sizes, well under a second) lets
    `render_digits` make thousands of images by slicing arrays only.
    """
    images, _ = _digits()
    scaled = np.clip(images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    boxes: dict[int, np.ndarray] = {}
    for size in _BOX_SIZES:
        boxes[size] = np.stack(
            [
                np.asarray(
                    Image.fromarray(image).resize(
                        (size, size), Image.Resampling.BICUBIC
                    ),
                    dtype=np.float32,
                )
                for image in scaled
            ]
        )
    return boxes


def digit_split() -> tuple[np.ndarray, np.ndarray]:
    """Split scikit-learn's 1,797 digits into training and held-out digits.

    The split is stratified by label and made with a fixed seed, so it is the
    same in every process and for every ``seed`` given elsewhere.

    Returns
    -------
    train, held_out : numpy.ndarray
        Sorted indices into ``sklearn.datasets.load_digits()``: 1,347 training
        digits and 450 held-out digits.

    Examples
    --------
    >>> train, held_out = digit_split()
    >>> len(train), len(held_out), len(set(train) & set(held_out))
    (1347, 450, 0)
    """
    from sklearn.model_selection import train_test_split

    _, labels = _digits()
    train, held_out = train_test_split(
        np.arange(len(labels)),
        test_size=_HELD_OUT_FRACTION,
        stratify=labels,
        random_state=_SPLIT_SEED,
    )
    return np.sort(train), np.sort(held_out)


def render_digits(
    indices: Sequence[int] | np.ndarray, rng: np.random.Generator | int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Render digits of ``load_digits`` as MNIST-like 28×28 images.

    Each image gets its own random variation: box size (18, 20 or 22 px),
    a shift of up to ±2 px from the centre, brightness (strokes saturate at
    255 as in MNIST) and noise on the strokes; the background stays 0.

    Parameters
    ----------
    indices : sequence of int
        Indices into ``sklearn.datasets.load_digits()``; repeat an index to get
        several variations of one digit.
    rng : numpy.random.Generator or int, default 0
        Source of the variations, or a seed for one.

    Returns
    -------
    images : numpy.ndarray
        ``uint8`` array of shape ``(len(indices), 28, 28)``.
    labels : numpy.ndarray
        ``int64`` array of shape ``(len(indices),)``, the digit shown.

    Examples
    --------
    >>> images, labels = render_digits([0, 0, 1], rng=0)
    >>> images.shape, images.dtype, labels.tolist()
    ((3, 28, 28), dtype('uint8'), [0, 0, 1])
    >>> bool((images[0] != images[1]).any())
    True
    """
    rng = np.random.default_rng(rng)
    idx = np.asarray(indices, dtype=np.int64)
    _, labels = _digits()
    boxes = _boxes()
    n = len(idx)
    sizes = rng.choice(_BOX_SIZES, size=n)
    shifts = rng.integers(-_MAX_SHIFT, _MAX_SHIFT + 1, size=(n, 2))
    canvas = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for i in range(n):
        size = int(sizes[i])
        top = (IMAGE_SIZE - size) // 2 + int(shifts[i, 0])
        left = (IMAGE_SIZE - size) // 2 + int(shifts[i, 1])
        # A 22 px box shifted by 2 px can cross the edge: clip it like a crop.
        t0, l0 = max(top, 0), max(left, 0)
        t1, l1 = min(top + size, IMAGE_SIZE), min(left + size, IMAGE_SIZE)
        canvas[i, t0:t1, l0:l1] = boxes[size][
            idx[i], t0 - top : t1 - top, l0 - left : l1 - left
        ]
    brightness = rng.uniform(*_BRIGHTNESS, size=(n, 1, 1)).astype(np.float32)
    noise = rng.normal(0.0, _NOISE_STD, size=canvas.shape).astype(np.float32)
    canvas = canvas * brightness + noise * (canvas > 8)
    images = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return images, labels[idx]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data)
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _png_bytes(image: np.ndarray) -> bytes:
    """Encode a 2-D ``uint8`` array as an 8-bit grayscale PNG.

    Pillow's ``Image.save`` spends about 0.4 ms on each tiny PNG, most of the
    time to make 10,000 images; this plain encoder (no row filters, which a
    28×28 image does not need) takes a sixth of that, and Pillow reads its output
    back to the same array.
    """
    height, width = image.shape
    rows = np.zeros((height, width + 1), dtype=np.uint8)
    rows[:, 1:] = image  # each row starts with filter type 0, "none"
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + _png_chunk(b"IEND", b"")
    )


def _scored_indices(count: int, seed: int) -> np.ndarray:
    """Return the held-out digit behind each of ``count`` images.

    Cycles through the held-out digits, in a new random order each cycle, so the
    labels (and so ``labels.csv``) depend on ``seed`` as the images do.
    """
    _, held_out = digit_split()
    rng = np.random.default_rng([seed, 1])
    cycles = -(-count // len(held_out))
    order = np.concatenate([rng.permutation(held_out) for _ in range(cycles)])
    return order[:count]


def _labels_csv(labels: np.ndarray) -> str:
    rows = "".join(f"{n}.png,{label}\n" for n, label in enumerate(labels.tolist()))
    return "file,label\n" + rows


def _is_complete(folder: Path, count: int, labels_text: str) -> bool:
    """Whether ``folder`` already holds the ``count`` images that match ``labels``."""
    labels_file = folder / LABELS_FILE
    if not labels_file.is_file():
        return False
    if labels_file.read_text() != labels_text:
        return False
    names = {entry.name for entry in os.scandir(folder) if entry.name.endswith(".png")}
    return names == {f"{n}.png" for n in range(count)}


def _check_replaceable(folder: Path) -> None:
    """Refuse to replace a folder that holds anything but images and labels."""
    if not folder.is_dir():
        raise FileExistsError(
            f"folder={str(folder)!r} exists and is not a folder; "
            "pass the path of a folder to create, like 'mnist-images'"
        )
    foreign = sorted(
        entry.name
        for entry in os.scandir(folder)
        if not (
            entry.is_file()
            and (entry.name.endswith(".png") or entry.name == LABELS_FILE)
        )
    )
    if foreign:
        names = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise FileExistsError(
            f"folder={str(folder)!r} holds other files ({names}); "
            "make_images only replaces a folder of PNG images and labels.csv: "
            "pass a new or empty folder"
        )


def make_images(
    folder: str | os.PathLike[str], count: int = 10_000, seed: int = 0
) -> Path:
    """Write ``count`` MNIST-like PNG images of held-out digits to ``folder``.

    The images are named ``0.png``, ``1.png``, … like the Azure tutorial's, 28×28
    grayscale (white digit on black), drawn only from the held-out digits (see
    `digit_split`) so that a model made by ``train_model.py`` never saw them.
    ``labels.csv`` (columns ``file,label``) beside them gives each image's digit.

    Idempotent: when ``folder`` already holds the same ``count`` images with a
    matching ``labels.csv``, nothing is written. Otherwise the images are written
    to a temporary folder beside ``folder`` and renamed into place, so an
    interrupted run never leaves a half-made folder behind.

    Parameters
    ----------
    folder : str or os.PathLike
        Folder to create (or to replace, if it holds only images and labels).
    count : int, default 10_000
        Number of images.
    seed : int, default 0
        Seed of the variations and of the order of the digits.

    Returns
    -------
    pathlib.Path
        ``folder``.

    Raises
    ------
    FileExistsError
        If ``folder`` exists and holds files other than PNG images and labels.

    Examples
    --------
    >>> import tempfile
    >>> folder = make_images(tempfile.mkdtemp() + "/digits", count=3)
    >>> sorted(p.name for p in folder.iterdir())
    ['0.png', '1.png', '2.png', 'labels.csv']
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(
            f"count={count!r} is not a number of images; use an int like 10_000"
        )
    folder = Path(folder)
    indices = _scored_indices(count, seed)
    labels_text = _labels_csv(_digits()[1][indices])
    if folder.exists():
        if _is_complete(folder, count, labels_text):
            return folder
        _check_replaceable(folder)
    images, _ = render_digits(indices, np.random.default_rng([seed, 2]))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        for n, image in enumerate(images):
            (tmp / f"{n}.png").write_bytes(_png_bytes(image))
        # Written last: a labels file means the images before it are complete.
        (tmp / LABELS_FILE).write_text(labels_text)
        _swap_in(tmp, folder, count, labels_text)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _swap_in(tmp: Path, folder: Path, count: int, labels_text: str) -> None:
    """Rename the finished ``tmp`` folder to ``folder``, replacing an old one."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
        folder.rename(old)
    try:
        tmp.rename(folder)
    except OSError:
        # Another process made the same folder meanwhile: keep theirs if it matches.
        if not _is_complete(folder, count, labels_text):
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python make_data.py FOLDER [--count N] [--seed S]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="folder to write the images and labels.csv to")
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folder = make_images(args.folder, count=args.count, seed=args.seed)
    print(f"{args.count} images and {LABELS_FILE} in {folder}")


if __name__ == "__main__":
    main()
