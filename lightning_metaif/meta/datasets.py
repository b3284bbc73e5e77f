"""Meta-train / meta-validation / meta-test splits of task pools, with classes split between them.

The three pools of a :class:`MetaSplits` never share a class (for classification) and never share a task id:
the validation pool's ids start after the training ids and the test ids after the validation ids.

Data sources:

- :func:`digits_splits`: scikit-learn's bundled 8x8 digits (no download), rotated by 0/90/180/270 degrees to
  give 40 classes.
- :func:`sinusoid_splits`: synthetic sinusoid regression.
- :func:`gaussian_mixture_splits`: synthetic few-shot classification (Gaussian classes in a hidden subspace).
- :func:`omniglot_splits` and :func:`mini_imagenet_splits`: read the usual folder layouts from disk.
  Nothing is ever downloaded; a missing folder raises an error that states the expected layout.

Example:
    >>> splits = digits_splits(ways=5, shots=1, queries=5, num_train_tasks=100, num_val_tasks=10, num_test_tasks=10)
    >>> [len(p) for p in splits], splits.val.task_ids[0].item(), tuple(splits.train[0].support_x.shape)
    ([100, 10, 10], 100, (5, 1, 8, 8))
    >>> splits.check_disjoint()
"""

from __future__ import annotations

import csv
import functools
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_metaif.meta.pools import (
    SALT_GAUSSIAN_MIXTURE,
    SALT_SPLIT,
    ClassificationTaskPool,
    SinusoidTaskPool,
    TaskPool,
    task_generator,
)

__all__ = [
    "MetaSplits",
    "class_split",
    "classification_splits",
    "digits_splits",
    "gaussian_mixture_splits",
    "sinusoid_splits",
    "ImageFileDataset",
    "omniglot_splits",
    "mini_imagenet_splits",
]

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class MetaSplits:
    """Three task pools: ``train``, ``val`` and ``test``. Iterates (and unpacks) in that order.

    ``class_names`` optionally maps an integer class (as returned by ``pool.task_classes``) to a readable name.
    """

    train: TaskPool
    val: TaskPool
    test: TaskPool
    class_names: dict[int, str] | None = None

    def __iter__(self) -> Iterator[TaskPool]:
        return iter((self.train, self.val, self.test))

    def items(self) -> list[tuple[str, TaskPool]]:
        return [("train", self.train), ("val", self.val), ("test", self.test)]

    @property
    def classes(self) -> dict[str, list[int]]:
        """Classes each pool may draw from (empty lists for regression pools)."""
        return {name: list(getattr(pool, "classes", [])) for name, pool in self.items()}

    def check_disjoint(self) -> None:
        """Raise ``ValueError`` if two pools share a class or a task id."""
        items = self.items()
        for i, (name_a, pool_a) in enumerate(items):
            for name_b, pool_b in items[i + 1 :]:
                shared = set(getattr(pool_a, "classes", [])) & set(getattr(pool_b, "classes", []))
                if shared:
                    raise ValueError(f"The {name_a} and {name_b} pools share classes {sorted(shared)[:10]}.")
                a0, a1 = pool_a.id_offset, pool_a.id_offset + len(pool_a)
                b0, b1 = pool_b.id_offset, pool_b.id_offset + len(pool_b)
                if a0 < b1 and b0 < a1:
                    raise ValueError(
                        f"The {name_a} ids [{a0}, {a1}) and {name_b} ids [{b0}, {b1}) overlap; use id_offset."
                    )


def _count(value: int | float, total: int, name: str) -> int:
    if isinstance(value, bool) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative count or a fraction in [0, 1), got {value!r}.")
    if isinstance(value, float):
        if value >= 1:
            raise ValueError(f"`{name}` given as a float must be a fraction in [0, 1), got {value}.")
        return int(round(value * total))
    return int(value)


def class_split(
    classes: Sequence[int] | Tensor,
    num_val: int | float,
    num_test: int | float,
    *,
    seed: int = 0,
    shuffle: bool = True,
) -> tuple[list[int], list[int], list[int]]:
    """Split ``classes`` into disjoint (train, val, test) lists.

    ``num_val`` / ``num_test`` are counts (int) or fractions of all classes (float). With ``shuffle`` the
    classes are permuted with ``seed`` first; otherwise the last classes go to test and the ones before
    them to val. Each returned list is sorted.

    Example:
        >>> class_split(range(10), 2, 3, shuffle=False)
        ([0, 1, 2, 3, 4], [5, 6], [7, 8, 9])
        >>> train, val, test = class_split(range(40), 0.2, 0.2, seed=1)
        >>> len(train), len(val), len(test), set(train) & set(val)
        (24, 8, 8, set())
    """
    class_list = [
        int(c) for c in torch.as_tensor(list(classes) if not isinstance(classes, Tensor) else classes)
    ]
    if len(set(class_list)) != len(class_list):
        raise ValueError("`classes` contains duplicates.")
    total = len(class_list)
    n_val, n_test = _count(num_val, total, "num_val"), _count(num_test, total, "num_test")
    if n_val + n_test >= total:
        raise ValueError(
            f"Cannot split {total} classes into val={n_val} and test={n_test} and keep any for training; "
            "lower num_val/num_test."
        )
    if shuffle:
        order = torch.randperm(total, generator=task_generator(seed, 0, SALT_SPLIT)).tolist()
        class_list = [class_list[i] for i in order]
    train = class_list[: total - n_val - n_test]
    val = class_list[total - n_val - n_test : total - n_test]
    test = class_list[total - n_test :]
    return sorted(train), sorted(val), sorted(test)


def classification_splits(
    inputs: Tensor | Any,
    labels: Tensor | Sequence[int] | None,
    split_classes: tuple[Sequence[int], Sequence[int], Sequence[int]],
    *,
    ways: int,
    shots: int,
    queries: int,
    num_train_tasks: int,
    num_val_tasks: int,
    num_test_tasks: int,
    seed: int = 0,
    val_ways: int | None = None,
    class_names: dict[int, str] | None = None,
) -> MetaSplits:
    """Build train/val/test :class:`ClassificationTaskPool` s over one data set with the given class lists.

    Task ids are ``0..num_train_tasks-1`` for train, then val, then test (no overlap). ``val_ways`` (default
    ``ways``) applies to the val and test pools. Errors name the split whose classes are too few.
    """
    names = ("train", "val", "test")
    counts = (num_train_tasks, num_val_tasks, num_test_tasks)
    pools = []
    offset = 0
    for name, classes, num_tasks in zip(names, split_classes, counts, strict=True):
        pool_ways = ways if name == "train" or val_ways is None else val_ways
        if len(classes) < pool_ways:
            raise ValueError(
                f"The {name} split has {len(classes)} classes, fewer than ways={pool_ways}; "
                "give that split more classes (or lower `ways`)."
            )
        pools.append(
            ClassificationTaskPool(
                inputs,
                labels,
                ways=pool_ways,
                shots=shots,
                queries=queries,
                num_tasks=num_tasks,
                classes=list(classes),
                seed=seed,
                id_offset=offset,
            )
        )
        offset += int(num_tasks)
    splits = MetaSplits(*pools, class_names=class_names)
    splits.check_disjoint()
    return splits


@functools.lru_cache(maxsize=2)
def _digits(rotations: bool) -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("digits_splits needs scikit-learn: pip install 'lightning-metaif[data]'.") from exc
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    if not rotations:
        return images.contiguous(), labels
    xs = [torch.rot90(images, k, dims=(-2, -1)) for k in range(4)]
    ys = [labels + 10 * k for k in range(4)]
    return torch.cat(xs).contiguous(), torch.cat(ys)


def digits_splits(
    ways: int = 5,
    shots: int = 1,
    queries: int = 15,
    num_train_tasks: int = 1000,
    num_val_tasks: int = 100,
    num_test_tasks: int = 100,
    seed: int = 0,
    rotations: bool = True,
    num_val_classes: int | float = 0.2,
    num_test_classes: int | float = 0.2,
) -> MetaSplits:
    """Few-shot splits of scikit-learn's bundled 8x8 digits (1797 images, no download).

    With ``rotations`` each digit rotated by ``k * 90`` degrees is its own class ``digit + 10 * k`` (40 classes,
    about 180 images each); the classes are shuffled with ``seed`` and split 24/8/8 by default
    (``num_val_classes`` / ``num_test_classes``: counts or fractions). Images are float32 ``[1, 8, 8]`` in
    ``[0, 1]``. Caveat: a 6 rotated by 180 degrees looks like a 9, so classes 6+20 and 9 (and 9+20 and 6) are
    hard to tell apart. Without rotations there are only 10 classes, too few for three disjoint 5-way splits.

    Example:
        >>> splits = digits_splits(num_train_tasks=50, num_val_tasks=5, num_test_tasks=5, seed=2)
        >>> {k: len(v) for k, v in splits.classes.items()}
        {'train': 24, 'val': 8, 'test': 8}
        >>> splits.class_names[37]
        'digit 7 rot270'
    """
    images, labels = _digits(bool(rotations))
    all_classes = torch.unique(labels).tolist()
    split = class_split(all_classes, num_val_classes, num_test_classes, seed=seed)
    names = {c: f"digit {c % 10} rot{90 * (c // 10)}" for c in all_classes}
    return classification_splits(
        images,
        labels,
        split,
        ways=ways,
        shots=shots,
        queries=queries,
        num_train_tasks=num_train_tasks,
        num_val_tasks=num_val_tasks,
        num_test_tasks=num_test_tasks,
        seed=seed,
        class_names=names,
    )


def gaussian_mixture_splits(
    ways: int = 5,
    shots: int = 1,
    queries: int = 15,
    num_train_tasks: int = 1000,
    num_val_tasks: int = 100,
    num_test_tasks: int = 100,
    seed: int = 0,
    *,
    num_classes: int = 40,
    samples_per_class: int = 60,
    dim: int = 16,
    latent_dim: int = 4,
    separation: float = 2.5,
    noise: float = 1.0,
    num_val_classes: int | float = 0.2,
    num_test_classes: int | float = 0.2,
) -> MetaSplits:
    """Synthetic few-shot classification: Gaussian classes whose means lie in a hidden subspace.

    ``num_classes`` class means are drawn as ``separation * z @ B`` with ``z ~ N(0, I_latent_dim)`` and a random
    orthonormal ``B`` (``latent_dim x dim``); each class has ``samples_per_class`` points ``mean + noise * ε``
    with isotropic ``ε ~ N(0, I_dim)``. What a meta-learner can learn across tasks is the subspace (the other
    directions are pure noise), which a 1-shot learner cannot find from one task. Everything depends only on
    ``seed``; inputs are float32 ``[dim]``. Classes are split between train/val/test like
    :func:`digits_splits`.

    Example:
        >>> splits = gaussian_mixture_splits(num_train_tasks=20, num_val_tasks=5, num_test_tasks=5, seed=1)
        >>> {k: len(v) for k, v in splits.classes.items()}, tuple(splits.train[0].query_x.shape)
        ({'train': 24, 'val': 8, 'test': 8}, (75, 16))
    """
    if num_classes < 3 or samples_per_class < 2 or dim < 1 or not 1 <= latent_dim <= dim:
        raise ValueError(
            "gaussian_mixture_splits needs num_classes >= 3, samples_per_class >= 2 and 1 <= latent_dim <= dim; "
            f"got num_classes={num_classes}, samples_per_class={samples_per_class}, latent_dim={latent_dim}, "
            f"dim={dim}."
        )
    if not separation > 0 or not noise > 0:
        raise ValueError(f"separation and noise must be positive, got {separation} and {noise}.")
    generator = task_generator(seed, 0, SALT_GAUSSIAN_MIXTURE)
    basis, _ = torch.linalg.qr(torch.randn(dim, latent_dim, generator=generator, dtype=torch.float64))
    means = (
        separation * torch.randn(num_classes, latent_dim, generator=generator, dtype=torch.float64) @ basis.T
    )
    labels = torch.arange(num_classes).repeat_interleave(samples_per_class)
    inputs = means[labels] + noise * torch.randn(len(labels), dim, generator=generator, dtype=torch.float64)
    split = class_split(list(range(num_classes)), num_val_classes, num_test_classes, seed=seed)
    return classification_splits(
        inputs.float().contiguous(),
        labels,
        split,
        ways=ways,
        shots=shots,
        queries=queries,
        num_train_tasks=num_train_tasks,
        num_val_tasks=num_val_tasks,
        num_test_tasks=num_test_tasks,
        seed=seed,
    )


def sinusoid_splits(
    shots: int = 10,
    queries: int = 10,
    num_train_tasks: int = 1000,
    num_val_tasks: int = 100,
    num_test_tasks: int = 100,
    seed: int = 0,
    **kwargs: Any,
) -> MetaSplits:
    """Train/val/test :class:`SinusoidTaskPool` s with consecutive, disjoint id ranges.

    Regression has no classes: the pools share the task distribution and differ in their tasks (ids).
    ``kwargs`` go to :class:`SinusoidTaskPool` (``amplitude``, ``phase``, ``x_range``, ``dtype``).

    Example:
        >>> train, val, test = sinusoid_splits(num_train_tasks=20, num_val_tasks=5, num_test_tasks=5)
        >>> val.task_ids.tolist()
        [20, 21, 22, 23, 24]
    """
    counts = (num_train_tasks, num_val_tasks, num_test_tasks)
    offsets = (0, num_train_tasks, num_train_tasks + num_val_tasks)
    pools = [
        SinusoidTaskPool(n, shots=shots, queries=queries, seed=seed, id_offset=o, **kwargs)
        for n, o in zip(counts, offsets, strict=True)
    ]
    return MetaSplits(*pools)


# ------------------------------------------------------------------------------------------------------------
# Image folders
# ------------------------------------------------------------------------------------------------------------


class ImageFileDataset(Dataset):
    """Lazily loaded image files: ``dataset[i] -> (float tensor [C, H, W] in [0, 1], label)``.

    Args:
        files: image paths.
        labels: one integer label per file (also available as ``targets``).
        image_size: images are resized to ``image_size x image_size`` (``None``: keep the size).
        mode: PIL mode, ``"L"`` (1 channel) or ``"RGB"`` (3 channels).
        rotations: optional number of quarter turns per file (``torch.rot90``), for rotation-augmented classes.
        invert: use ``1 - x`` (Omniglot: strokes become 1 on a 0 background).
        cache_size: how many decoded, resized images (kept as uint8) to cache, least recently used evicted.
    """

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        labels: Sequence[int],
        *,
        image_size: int | None,
        mode: str = "RGB",
        rotations: Sequence[int] | None = None,
        invert: bool = False,
        cache_size: int = 10_000,
    ) -> None:
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels; give one label per file.")
        if rotations is not None and len(rotations) != len(files):
            raise ValueError("`rotations` needs one entry per file.")
        if mode not in ("L", "RGB"):
            raise ValueError(f"`mode` must be 'L' or 'RGB', got {mode!r}.")
        if image_size is not None and image_size < 1:
            raise ValueError(f"`image_size` must be a positive integer or None, got {image_size}.")
        self.files = [str(f) for f in files]
        self.targets = torch.as_tensor(list(labels), dtype=torch.long)
        self.rotations = None if rotations is None else [int(r) % 4 for r in rotations]
        self.image_size, self.mode, self.invert = image_size, mode, bool(invert)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, path: str) -> Tensor:
        cached = self._cache.get(path)
        if cached is not None:
            self._cache.move_to_end(path)
            return cached
        from PIL import Image

        with Image.open(path) as image:
            image = image.convert(self.mode)
            if self.image_size is not None and image.size != (self.image_size, self.image_size):
                image = image.resize((self.image_size, self.image_size), Image.Resampling.LANCZOS)
            array = np.asarray(image, dtype=np.uint8)
        tensor = torch.from_numpy(array.copy())
        tensor = tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1).contiguous()
        if self.cache_size > 0:
            self._cache[path] = tensor
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return tensor

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x = self._load(self.files[index]).to(torch.float32) / 255.0
        if self.invert:
            x = 1.0 - x
        if self.rotations is not None and self.rotations[index]:
            x = torch.rot90(x, self.rotations[index], dims=(-2, -1)).contiguous()
        return x, int(self.targets[index])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()  # do not ship decoded images to DataLoader workers / pickles
        return state


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_EXTENSIONS)


_OMNIGLOT_LAYOUT = (
    "{root}/images_background/<Alphabet>/<characterXX>/*.png and/or "
    "{root}/images_evaluation/<Alphabet>/<characterXX>/*.png (the layout of the official Omniglot zips "
    "images_background.zip and images_evaluation.zip from github.com/brendenlake/omniglot, unzipped into root)"
)


def omniglot_splits(
    root: str | os.PathLike,
    *,
    ways: int = 5,
    shots: int = 1,
    queries: int = 15,
    num_train_tasks: int = 1000,
    num_val_tasks: int = 100,
    num_test_tasks: int = 100,
    seed: int = 0,
    image_size: int = 28,
    rotations: bool = False,
    num_train_characters: int | float = 1200,
    num_val_characters: int | float = 100,
    invert: bool = True,
    cache_size: int = 50_000,
) -> MetaSplits:
    """Omniglot few-shot splits from the standard folder layout (nothing is downloaded).

    Every character (``<set>/<Alphabet>/<characterXX>``) of ``images_background`` and ``images_evaluation``
    is a class. The characters (sorted by path) are shuffled with ``seed`` and split into
    ``num_train_characters`` / ``num_val_characters`` / the rest (the 1200/100/323 split of Vinyals et al. and
    Finn et al.); counts may be fractions. With ``rotations`` each character rotated by 0/90/180/270 degrees
    is a separate class (class ``4 * character + k``), and all rotations of a character stay in one split.
    Images: float32 ``[1, image_size, image_size]`` in ``[0, 1]``, inverted by default (strokes = 1).
    ``MetaSplits.class_names`` maps classes to ``"Alphabet/characterXX"`` (``"@rot90"`` etc. for rotations).
    """
    root_path = Path(root).expanduser()
    if not (root_path / "images_background").is_dir() and (root_path / "omniglot-py").is_dir():
        root_path = root_path / "omniglot-py"  # torchvision's download layout
    sets = [
        root_path / name for name in ("images_background", "images_evaluation") if (root_path / name).is_dir()
    ]
    if not sets:
        raise FileNotFoundError(
            f"Omniglot not found under '{root_path}'. Expected {_OMNIGLOT_LAYOUT.format(root=root_path)}. "
            "Nothing is downloaded by lightning_metaif: download and unzip the data yourself and pass its folder as root."
        )
    characters: list[tuple[str, list[Path]]] = []
    for set_dir in sets:
        for alphabet in sorted(p for p in set_dir.iterdir() if p.is_dir()):
            for character in sorted(p for p in alphabet.iterdir() if p.is_dir()):
                images = _images_in(character)
                if images:
                    characters.append((f"{alphabet.name}/{character.name}", images))
    if not characters:
        raise ValueError(
            f"No character folders with images found in {[str(s) for s in sets]}. Expected "
            f"{_OMNIGLOT_LAYOUT.format(root=root_path)}. Nothing is downloaded."
        )
    num_chars = len(characters)
    n_train = _count(num_train_characters, num_chars, "num_train_characters")
    n_val = _count(num_val_characters, num_chars, "num_val_characters")
    if n_train < 1 or n_train + n_val >= num_chars:
        raise ValueError(
            f"Found {num_chars} Omniglot characters, cannot split them into train={n_train}, val={n_val} and a "
            "non-empty test split; lower num_train_characters / num_val_characters."
        )
    train_c, val_c, test_c = class_split(range(num_chars), n_val, num_chars - n_train - n_val, seed=seed)

    factor = 4 if rotations else 1
    files: list[Path] = []
    labels: list[int] = []
    turns: list[int] = []
    names: dict[int, str] = {}
    for c, (name, images) in enumerate(characters):
        for k in range(factor):
            label = factor * c + k
            names[label] = name if not rotations else f"{name}@rot{90 * k}"
            files.extend(images)
            labels.extend([label] * len(images))
            turns.extend([k] * len(images))
    dataset = ImageFileDataset(
        files,
        labels,
        image_size=image_size,
        mode="L",
        rotations=turns if rotations else None,
        invert=invert,
        cache_size=cache_size,
    )

    def expand(chars: list[int]) -> list[int]:
        return [factor * c + k for c in chars for k in range(factor)]

    return classification_splits(
        dataset,
        None,
        (expand(train_c), expand(val_c), expand(test_c)),
        ways=ways,
        shots=shots,
        queries=queries,
        num_train_tasks=num_train_tasks,
        num_val_tasks=num_val_tasks,
        num_test_tasks=num_test_tasks,
        seed=seed,
        class_names=names,
    )


_MINI_LAYOUT = (
    "either {root}/{{train,val,test}}/<wnid>/*.jpg (one folder per class) or {root}/images/*.jpg together with "
    "{root}/train.csv, {root}/val.csv and {root}/test.csv (header 'filename,label'; the Ravi & Larochelle split)"
)


def mini_imagenet_splits(
    root: str | os.PathLike,
    *,
    ways: int = 5,
    shots: int = 1,
    queries: int = 15,
    num_train_tasks: int = 1000,
    num_val_tasks: int = 100,
    num_test_tasks: int = 100,
    seed: int = 0,
    image_size: int = 84,
    cache_size: int = 10_000,
) -> MetaSplits:
    """mini-ImageNet few-shot splits (64/16/20 classes) from disk; nothing is downloaded.

    Accepts the folder layout ``root/{train,val,test}/<wnid>/*.jpg`` or the csv layout ``root/images/*.jpg`` +
    ``root/{train,val,test}.csv`` (``filename,label``). The split of each class comes from the layout. Classes
    are numbered by sorted wnid (``MetaSplits.class_names`` maps back). Images: float32
    ``[3, image_size, image_size]`` in ``[0, 1]`` (no mean/std normalisation). Decoded images are cached as
    uint8 (``cache_size`` images, about 21 KB each at 84x84).
    """
    root_path = Path(root).expanduser()
    split_names = ("train", "val", "test")
    layout = _MINI_LAYOUT.format(root=root_path)
    per_split: dict[str, list[tuple[Path, str]]] = {}
    if all((root_path / s).is_dir() for s in split_names):
        for s in split_names:
            entries = []
            for class_dir in sorted(p for p in (root_path / s).iterdir() if p.is_dir()):
                entries.extend((f, class_dir.name) for f in _images_in(class_dir))
            if not entries:
                raise ValueError(f"'{root_path / s}' has no <wnid>/*.jpg images. Expected {layout}.")
            per_split[s] = entries
    elif (root_path / "images").is_dir() and all((root_path / f"{s}.csv").is_file() for s in split_names):
        for s in split_names:
            entries = []
            with open(root_path / f"{s}.csv", newline="") as handle:
                reader = csv.DictReader(handle)
                if reader.fieldnames is None or not {"filename", "label"} <= set(reader.fieldnames):
                    raise ValueError(
                        f"'{root_path / (s + '.csv')}' must have the header 'filename,label', got {reader.fieldnames}."
                    )
                for row in reader:
                    entries.append((root_path / "images" / row["filename"], row["label"]))
            if not entries:
                raise ValueError(f"'{root_path / (s + '.csv')}' lists no images. Expected {layout}.")
            missing = [str(f) for f, _ in entries if not f.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} images listed in '{root_path / (s + '.csv')}' are missing, e.g. {missing[0]}. "
                    f"Expected {layout}. Nothing is downloaded."
                )
            per_split[s] = entries
    else:
        raise FileNotFoundError(
            f"mini-ImageNet not found under '{root_path}'. Expected {layout}. "
            "Nothing is downloaded by lightning_metaif: obtain the data yourself and pass its folder as root."
        )
    wnids = sorted({wnid for entries in per_split.values() for _, wnid in entries})
    index = {w: i for i, w in enumerate(wnids)}
    split_classes = []
    for s in split_names:
        split_classes.append(sorted({index[w] for _, w in per_split[s]}))
    for i, a in enumerate(split_names):
        for b in split_names[i + 1 :]:
            shared = set(split_classes[i]) & set(split_classes[split_names.index(b)])
            if shared:
                raise ValueError(
                    f"The {a} and {b} splits share classes {[wnids[c] for c in sorted(shared)][:5]}; "
                    "mini-ImageNet splits must have disjoint classes."
                )
    files = [f for s in split_names for f, _ in per_split[s]]
    labels = [index[w] for s in split_names for _, w in per_split[s]]
    dataset = ImageFileDataset(files, labels, image_size=image_size, mode="RGB", cache_size=cache_size)
    return classification_splits(
        dataset,
        None,
        tuple(split_classes),  # type: ignore[arg-type]
        ways=ways,
        shots=shots,
        queries=queries,
        num_train_tasks=num_train_tasks,
        num_val_tasks=num_val_tasks,
        num_test_tasks=num_test_tasks,
        seed=seed,
        class_names=dict(enumerate(wnids)),
    )
