"""Task pools and splits: determinism per (seed, task_id), shapes, class-disjoint splits, folder loaders, errors.

Fixture images for the Omniglot / mini-ImageNet loaders are written to ``tmp_path``; nothing is downloaded.
The cross-process test starts one Python subprocess (about 2-3 s); everything else is light.
"""

from __future__ import annotations

import csv
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from lightning_metaif.influence.tasks import Task, TaskBatch
from lightning_metaif.meta.datasets import (
    ImageFileDataset,
    MetaSplits,
    class_split,
    digits_splits,
    mini_imagenet_splits,
    omniglot_splits,
    sinusoid_splits,
)
from lightning_metaif.meta.pools import ClassificationTaskPool, SinusoidTaskPool, TaskPool, collate_tasks

FIELDS = ("support_x", "support_y", "query_x", "query_y")


def assert_same_task(a: Task, b: Task) -> None:
    assert a.task_id == b.task_id
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x, y), f"{name} differs for task {a.task_id}"


def small_classification_pool(**kwargs) -> ClassificationTaskPool:
    g = torch.Generator().manual_seed(123)
    inputs = torch.randn(120, 3, generator=g)
    labels = torch.arange(120) % 12
    options = dict(ways=4, shots=2, queries=3, num_tasks=40, seed=5)
    options.update(kwargs)
    return ClassificationTaskPool(inputs, labels, **options)


# ------------------------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------------------------

SUBPROCESS_SCRIPT = """
import sys, torch
from lightning_metaif.meta.datasets import digits_splits
from lightning_metaif.meta.pools import SinusoidTaskPool
splits = digits_splits(ways=5, shots=2, queries=3, num_train_tasks=300, num_val_tasks=20, num_test_tasks=20, seed=7)
sine = SinusoidTaskPool(500, shots=4, queries=6, seed=11)
out = {}
# Access in a different order than the parent process, to show content does not depend on iteration order.
for tid in [337, 310, 299, 3, 0]:
    pool = splits.train if tid < 300 else (splits.val if tid < 320 else splits.test)
    t = pool.task(tid)
    out[("digits", tid)] = [t.support_x, t.support_y, t.query_x, t.query_y]
    out[("classes", tid)] = pool.task_classes(tid)
for tid in [499, 17]:
    t = sine.task(tid)
    out[("sine", tid)] = [t.support_x, t.support_y, t.query_x, t.query_y]
torch.save(out, sys.argv[1])
"""


def test_same_task_id_gives_identical_tensors_in_another_process(tmp_path):
    path = tmp_path / "tasks.pt"
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SUBPROCESS_SCRIPT), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    theirs = torch.load(path)

    torch.manual_seed(999)  # the global RNG must not matter
    splits = digits_splits(
        ways=5, shots=2, queries=3, num_train_tasks=300, num_val_tasks=20, num_test_tasks=20, seed=7
    )
    sine = SinusoidTaskPool(500, shots=4, queries=6, seed=11)
    for tid in [0, 3, 299, 310, 337]:
        pool = splits.train if tid < 300 else (splits.val if tid < 320 else splits.test)
        t = pool.task(tid)
        for mine, other in zip(
            [t.support_x, t.support_y, t.query_x, t.query_y], theirs[("digits", tid)], strict=True
        ):
            assert torch.equal(mine, other)
        assert pool.task_classes(tid) == theirs[("classes", tid)]
    for tid in [17, 499]:
        t = sine.task(tid)
        for mine, other in zip(
            [t.support_x, t.support_y, t.query_x, t.query_y], theirs[("sine", tid)], strict=True
        ):
            assert torch.equal(mine, other)


def test_recreated_and_pickled_pools_give_identical_tasks():
    pool = small_classification_pool()
    first = [pool[i] for i in range(len(pool))]
    recreated = small_classification_pool()
    clone = pickle.loads(pickle.dumps(pool))
    for i in reversed(range(len(pool))):  # reverse order: content must not depend on access order
        assert_same_task(recreated[i], first[i])
        assert_same_task(clone[i], first[i])
        assert pool.task_classes(first[i].task_id) == clone.task_classes(first[i].task_id)

    sine = SinusoidTaskPool(30, shots=3, queries=4, seed=2)
    sine_clone = pickle.loads(pickle.dumps(sine))
    for tid in (29, 0, 13):
        assert_same_task(sine.task(tid), sine_clone.task(tid))


def test_content_depends_on_seed_and_task_id_not_on_position_or_offset():
    pool = small_classification_pool()
    shifted = small_classification_pool(id_offset=10, num_tasks=5)
    # The same id in two pools with the same data and seed is the same task, whatever its position.
    assert_same_task(shifted[0], pool[10])
    assert_same_task(shifted.task(14), pool.task(14))
    other_seed = small_classification_pool(seed=6)
    assert not torch.equal(other_seed[3].support_x, pool[3].support_x)
    # Different ids give different tasks (no repeated streams).
    assert not torch.equal(pool[0].support_x, pool[1].support_x)


# ------------------------------------------------------------------------------------------------------------
# Pool structure
# ------------------------------------------------------------------------------------------------------------


def test_classification_task_layout_and_class_mapping():
    inputs = torch.arange(12).repeat_interleave(10).to(torch.float32).unsqueeze(1)  # x = class label
    labels = torch.arange(12).repeat_interleave(10)
    pool = ClassificationTaskPool(
        inputs, labels, ways=5, shots=2, queries=3, num_tasks=50, seed=1, id_offset=100
    )
    assert pool.task_ids.tolist() == list(range(100, 150)) and pool.task_ids.dtype == torch.long
    assert not pool.is_image and pool.sample_shape == (1,)
    permutations = set()
    for tid in pool.task_ids.tolist():
        task = pool.task(tid)
        assert task.task_id == tid
        assert task.support_y.tolist() == [c for c in range(5) for _ in range(2)]
        assert task.query_y.tolist() == [c for c in range(5) for _ in range(3)]
        classes = pool.task_classes(tid)
        assert len(set(classes)) == 5
        # label j shows original class classes[j]
        assert task.support_x[:, 0].long().tolist() == [classes[y] for y in task.support_y.tolist()]
        assert task.query_x[:, 0].long().tolist() == [classes[y] for y in task.query_y.tolist()]
        support_idx, query_idx = pool.task_indices(tid)
        assert len(set(support_idx.tolist()) | set(query_idx.tolist())) == 25  # no sample used twice
        permutations.add(tuple(classes))
    assert len(permutations) > 40  # class choice and label order vary between tasks
    assert set().union(*permutations) == set(range(12))


def test_indexing_iteration_and_batch():
    pool = small_classification_pool(id_offset=7)
    assert len(pool) == 40
    assert pool[-1].task_id == 46 and pool[0].task_id == 7
    assert 7 in pool and 47 not in pool and pool.position(10) == 3
    with pytest.raises(IndexError):
        pool[40]
    with pytest.raises(KeyError, match="not in this pool"):
        pool.task(3)
    assert [t.task_id for t in pool] == list(range(7, 47))
    batch = pool.batch([0, 5, 2])
    assert isinstance(batch, TaskBatch) and batch.task_ids.tolist() == [7, 12, 9]
    assert tuple(batch.support_x.shape) == (3, 8, 3) and tuple(batch.query_y.shape) == (3, 12)
    assert_same_task(batch[1], pool[5])
    full = pool.batch()
    assert len(full) == 40 and torch.equal(full.task_ids, pool.task_ids)
    assert pool.batch_ids(torch.tensor([46, 7])).task_ids.tolist() == [46, 7]


def test_dataloader_with_collate_yields_task_batches():
    splits = digits_splits(ways=5, shots=1, queries=15, num_train_tasks=20, num_val_tasks=4, num_test_tasks=4)
    loader = DataLoader(splits.train, batch_size=8, shuffle=True, collate_fn=collate_tasks)
    seen = []
    for batch in loader:
        assert isinstance(batch, TaskBatch)
        assert batch.support_x.shape[1:] == (5, 1, 8, 8) and batch.query_x.shape[1:] == (75, 1, 8, 8)
        assert batch.support_y.dtype == torch.long
        for i, tid in enumerate(batch.task_ids.tolist()):
            assert_same_task(batch[i], splits.train.task(tid))
        seen.extend(batch.task_ids.tolist())
    assert sorted(seen) == list(range(20))


def test_sinusoid_pool_shapes_and_formula():
    pool = SinusoidTaskPool(
        100, shots=5, queries=10, seed=4, amplitude=(1.0, 2.0), phase=(0.0, 1.0), x_range=(0, 3)
    )
    assert not pool.is_image and pool.task_classes(50) == []
    for tid in (0, 50, 99):
        task = pool.task(tid)
        assert task.support_x.shape == (5, 1) and task.support_y.shape == (5, 1)
        assert task.query_x.shape == (10, 1) and task.query_y.shape == (10, 1)
        assert task.query_x.dtype == torch.float32
        amplitude, phase = pool.task_params(tid)
        assert 1.0 <= amplitude <= 2.0 and 0.0 <= phase <= 1.0
        x = torch.cat([task.support_x, task.query_x])
        y = torch.cat([task.support_y, task.query_y])
        assert float(x.min()) >= 0 and float(x.max()) <= 3
        assert torch.allclose(y, amplitude * torch.sin(x - phase), atol=1e-5)
    double = SinusoidTaskPool(3, shots=2, queries=2, dtype=torch.float64)
    assert double[0].support_x.dtype == torch.float64


def test_large_pool_is_lazy():
    # 100,000 tasks: construction only builds per-class index lists; the last id is reachable.
    inputs, labels = torch.randn(2000, 4), torch.arange(2000) % 100
    pool = ClassificationTaskPool(inputs, labels, ways=5, shots=1, queries=15, num_tasks=100_000, seed=3)
    assert len(pool) == 100_000
    last = pool[-1]
    assert last.task_id == 99_999 and last.query_x.shape == (75, 4)
    assert_same_task(pool.task(99_999), last)
    sine = SinusoidTaskPool(100_000, shots=5, queries=5)
    assert sine[99_999].task_id == 99_999
    splits = digits_splits(num_train_tasks=100_000, num_val_tasks=100_000, num_test_tasks=100_000)
    assert splits.test[-1].task_id == 299_999


def test_dataset_of_pairs_is_accepted():
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(2, 4, 4, generator=g), i % 6) for i in range(60)]
    pool = ClassificationTaskPool(pairs, None, ways=3, shots=2, queries=2, num_tasks=10)
    assert pool.is_image and pool.sample_shape == (2, 4, 4)
    task = pool[3]
    support_idx, _ = pool.task_indices(3)
    assert torch.equal(task.support_x[0], pairs[int(support_idx[0])][0])

    images = [Image.fromarray(np.full((5, 5), 10 * i, dtype=np.uint8)) for i in range(20)]

    class PilDataset(torch.utils.data.Dataset):
        targets = [i % 4 for i in range(20)]

        def __len__(self):
            return 20

        def __getitem__(self, i):
            return images[i], self.targets[i]

    pil_pool = ClassificationTaskPool(PilDataset(), None, ways=2, shots=1, queries=1, num_tasks=5)
    task = pil_pool[0]
    assert task.support_x.shape == (2, 1, 5, 5) and task.support_x.dtype == torch.float32
    s_idx, _ = pil_pool.task_indices(0)
    assert torch.allclose(task.support_x[0], torch.full((1, 5, 5), 10 * int(s_idx[0]) / 255.0))


# ------------------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------------------


def test_digits_splits_are_class_and_id_disjoint():
    splits = digits_splits(
        ways=5, shots=1, queries=15, num_train_tasks=200, num_val_tasks=30, num_test_tasks=40, seed=3
    )
    train, val, test = splits
    classes = splits.classes
    assert len(classes["train"]) + len(classes["val"]) + len(classes["test"]) == 40
    assert not set(classes["train"]) & set(classes["val"])
    assert not set(classes["train"]) & set(classes["test"])
    assert not set(classes["val"]) & set(classes["test"])
    ids = [set(p.task_ids.tolist()) for p in splits]
    assert ids[0] == set(range(200)) and ids[1] == set(range(200, 230)) and ids[2] == set(range(230, 270))
    for name, pool in splits.items():
        for tid in pool.task_ids[:25].tolist():
            assert set(pool.task_classes(tid)) <= set(classes[name])
    task = train[0]
    assert train.is_image and task.support_x.shape == (5, 1, 8, 8) and task.query_x.shape == (75, 1, 8, 8)
    assert task.support_x.dtype == torch.float32
    assert float(task.support_x.min()) >= 0.0 and float(task.support_x.max()) <= 1.0
    # A different seed gives a different class split.
    other = digits_splits(num_train_tasks=5, num_val_tasks=5, num_test_tasks=5, seed=4)
    assert other.classes != classes


def test_digit_rotations_are_real_rotations():
    splits = digits_splits(ways=5, shots=1, queries=1, num_train_tasks=50, num_val_tasks=5, num_test_tasks=5)
    pool = splits.train
    from lightning_metaif.meta.datasets import _digits

    images, labels = _digits(True)
    n = images.shape[0] // 4
    assert torch.equal(images[n + 5], torch.rot90(images[5], 1, dims=(-2, -1)))
    assert int(labels[n + 5]) == int(labels[5]) + 10
    assert splits.class_names[23] == "digit 3 rot180"
    task = pool[0]
    assert task.support_x.shape == (5, 1, 8, 8)


def test_sinusoid_splits_have_disjoint_ids():
    train, val, test = sinusoid_splits(
        shots=5, queries=5, num_train_tasks=10, num_val_tasks=3, num_test_tasks=4
    )
    assert train.task_ids.tolist() == list(range(10))
    assert val.task_ids.tolist() == [10, 11, 12] and test.task_ids.tolist() == [13, 14, 15, 16]
    MetaSplits(train, val, test).check_disjoint()


def test_check_disjoint_detects_overlap():
    a = small_classification_pool(classes=[0, 1, 2, 3, 4])
    b = small_classification_pool(classes=[4, 5, 6, 7], id_offset=100)
    c = small_classification_pool(classes=[8, 9, 10, 11], id_offset=200)
    with pytest.raises(ValueError, match="share classes"):
        MetaSplits(a, b, c).check_disjoint()
    a2 = small_classification_pool(classes=[0, 1, 2, 3])
    b2 = small_classification_pool(classes=[4, 5, 6, 7], id_offset=10)
    c2 = small_classification_pool(classes=[8, 9, 10, 11], id_offset=500)
    with pytest.raises(ValueError, match="overlap; use id_offset"):
        MetaSplits(a2, b2, c2).check_disjoint()
    MetaSplits(a2, small_classification_pool(classes=[4, 5, 6, 7], id_offset=40), c2).check_disjoint()


def test_class_split():
    train, val, test = class_split(list(range(20)), 4, 0.25, seed=1)
    assert (len(train), len(val), len(test)) == (11, 4, 5)
    assert sorted(train + val + test) == list(range(20))
    assert class_split(range(20), 4, 5, seed=1) == (train, val, test)
    with pytest.raises(ValueError, match="keep any for training"):
        class_split(range(5), 3, 2)
    with pytest.raises(ValueError, match="fraction"):
        class_split(range(5), 1.5, 1)


# ------------------------------------------------------------------------------------------------------------
# Configuration errors
# ------------------------------------------------------------------------------------------------------------


def test_more_ways_than_classes_is_an_error():
    with pytest.raises(ValueError, match="ways=13 is larger than the 12 classes"):
        small_classification_pool(ways=13)
    with pytest.raises(ValueError, match="ways=5 is larger than the 4 classes"):
        small_classification_pool(ways=5, classes=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="fewer than ways"):
        digits_splits(ways=5, rotations=False)  # 10 classes cannot make three disjoint 5-way splits


def test_shots_plus_queries_larger_than_smallest_class_is_an_error():
    inputs = torch.randn(50, 2)
    labels = torch.cat([torch.zeros(20), torch.ones(20), torch.full((10,), 2)]).long()
    with pytest.raises(ValueError, match=r"class 2 has only 10 samples"):
        ClassificationTaskPool(inputs, labels, ways=2, shots=5, queries=6, num_tasks=3)
    # Leaving the small class out fixes it.
    ClassificationTaskPool(inputs, labels, ways=2, shots=5, queries=6, num_tasks=3, classes=[0, 1])
    with pytest.raises(ValueError, match="samples per class are needed"):
        digits_splits(shots=100, queries=100)


@pytest.mark.parametrize(
    "field,value",
    [("ways", 0), ("shots", 0), ("queries", -1), ("num_tasks", 0), ("shots", 1.5), ("ways", True)],
)
def test_non_positive_sizes_are_errors(field, value):
    with pytest.raises(ValueError, match=f"`{field}` must be a positive integer"):
        small_classification_pool(**{field: value})


@pytest.mark.parametrize("field,value", [("shots", 0), ("queries", 0), ("num_tasks", -3)])
def test_sinusoid_non_positive_sizes_are_errors(field, value):
    options = dict(num_tasks=5, shots=2, queries=2)
    options[field] = value
    num_tasks = options.pop("num_tasks")
    with pytest.raises(ValueError, match=f"`{field}` must be a positive integer"):
        SinusoidTaskPool(num_tasks, **options)


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="one label per input row"):
        ClassificationTaskPool(
            torch.randn(10, 2), torch.zeros(9).long(), ways=1, shots=1, queries=1, num_tasks=1
        )
    with pytest.raises(ValueError, match="must be integers"):
        ClassificationTaskPool(torch.randn(10, 2), torch.zeros(10), ways=1, shots=1, queries=1, num_tasks=1)
    with pytest.raises(ValueError, match="labels with no samples"):
        small_classification_pool(classes=[0, 1, 2, 99])
    with pytest.raises(ValueError, match="non-negative"):
        small_classification_pool(id_offset=-1)
    with pytest.raises(ValueError, match="amplitude"):
        SinusoidTaskPool(3, shots=1, queries=1, amplitude=(2.0, 1.0))


# ------------------------------------------------------------------------------------------------------------
# Folder loaders (tiny fixtures written to tmp_path)
# ------------------------------------------------------------------------------------------------------------


def _gray(char_index: int, image_index: int) -> int:
    return 10 + 20 * char_index + 3 * image_index  # <= 255 for the fixture sizes below


def make_omniglot(root: Path, images_per_char: int = 4) -> list[str]:
    """Two alphabets x 3 characters in images_background, one alphabet x 3 in images_evaluation (9 classes)."""
    names = []
    layout = [
        ("images_background", "Alpha", 3),
        ("images_background", "Beta", 3),
        ("images_evaluation", "Gamma", 3),
    ]
    index = 0
    for set_name, alphabet, count in layout:
        for c in range(count):
            folder = root / set_name / alphabet / f"character{c + 1:02d}"
            folder.mkdir(parents=True)
            for i in range(images_per_char):
                array = np.full((12, 12), _gray(index, i), dtype=np.uint8)
                array[0, :] = 255  # a bright top row, to check rotations
                Image.fromarray(array, mode="L").save(folder / f"{index:04d}_{i:02d}.png")
            names.append(f"{alphabet}/character{c + 1:02d}")
            index += 1
    return names  # in sorted class order


def test_omniglot_layout(tmp_path):
    names = make_omniglot(tmp_path)
    splits = omniglot_splits(
        tmp_path,
        ways=2,
        shots=1,
        queries=2,
        num_train_tasks=30,
        num_val_tasks=5,
        num_test_tasks=5,
        num_train_characters=5,
        num_val_characters=2,
        image_size=28,
    )
    splits.check_disjoint()
    assert {k: len(v) for k, v in splits.classes.items()} == {"train": 5, "val": 2, "test": 2}
    assert sorted(splits.class_names.values()) == sorted(names)
    pool = splits.train
    assert pool.is_image
    task = pool[0]
    assert task.support_x.shape == (2, 1, 28, 28) and task.query_x.shape == (4, 1, 28, 28)
    assert task.support_x.dtype == torch.float32
    # Images match their labels: the (inverted) gray level encodes the character.
    for tid in pool.task_ids[:10].tolist():
        task = pool.task(tid)
        classes = pool.task_classes(tid)
        for x, y in zip(task.query_x, task.query_y, strict=True):
            value = 1.0 - float(x[0, 14, 14])  # centre pixel, inverted back
            char = round((value * 255 - 10) / 20 - 0.2)  # image offsets are at most 9 < 20/2
            assert char == classes[int(y)]
            assert float(x[0, 0, 14]) < float(x[0, 14, 14])  # the bright top row is dark after inversion
    # Determinism across re-creation.
    again = omniglot_splits(
        tmp_path,
        ways=2,
        shots=1,
        queries=2,
        num_train_tasks=30,
        num_val_tasks=5,
        num_test_tasks=5,
        num_train_characters=5,
        num_val_characters=2,
    )
    assert_same_task(again.test[-1], splits.test[-1])
    assert_same_task(pickle.loads(pickle.dumps(splits.val))[2], splits.val[2])


def test_omniglot_rotations_and_torchvision_folder(tmp_path):
    make_omniglot(tmp_path / "omniglot-py", images_per_char=3)
    splits = omniglot_splits(
        tmp_path,  # finds root/omniglot-py like torchvision's layout
        ways=3,
        shots=1,
        queries=1,
        num_train_tasks=5,
        num_val_tasks=2,
        num_test_tasks=2,
        num_train_characters=5,
        num_val_characters=2,
        rotations=True,
        image_size=12,
        invert=False,
    )
    assert {k: len(v) for k, v in splits.classes.items()} == {"train": 20, "val": 8, "test": 8}
    for pool in splits:  # all four rotations of a character stay in one split
        chars = {c // 4 for c in pool.classes}
        assert set(pool.classes) == {4 * c + k for c in chars for k in range(4)}
    dataset = splits.train._inputs
    assert isinstance(dataset, ImageFileDataset)
    base_index = dataset.targets.tolist().index(0)
    rot_index = dataset.targets.tolist().index(1)
    assert dataset.files[base_index] == dataset.files[rot_index]
    x0, _ = dataset[base_index]
    x1, _ = dataset[rot_index]
    assert torch.equal(x1, torch.rot90(x0, 1, dims=(-2, -1)))
    assert float(x0[0, 0].mean()) == 1.0 and float(x1[0, :, 0].mean()) == 1.0  # top row -> left column
    assert splits.class_names[1].endswith("@rot90")


def test_missing_omniglot_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as info:
        omniglot_splits(missing)
    message = str(info.value)
    assert str(missing) in message and "images_background/<Alphabet>/<characterXX>/*.png" in message
    assert "Nothing is downloaded" in message
    (tmp_path / "empty" / "images_background").mkdir(parents=True)
    with pytest.raises(ValueError, match="No character folders"):
        omniglot_splits(tmp_path / "empty")


def _color(wnid_index: int, image_index: int) -> tuple[int, int, int]:
    return (30 * wnid_index + 5, 200 - 20 * wnid_index, 40 + 10 * image_index)


def make_mini_imagenet(root: Path, *, csv_layout: bool) -> dict[str, list[str]]:
    splits = {"train": ["n001", "n002", "n003"], "val": ["n004", "n005"], "test": ["n006", "n007"]}
    for split, wnids in splits.items():
        rows = []
        for wnid in wnids:
            w = int(wnid[1:]) - 1
            for i in range(4):
                image = Image.new("RGB", (16, 12), _color(w, i))
                name = f"{wnid}{i:08d}.jpg"
                if csv_layout:
                    (root / "images").mkdir(parents=True, exist_ok=True)
                    image.save(root / "images" / name, quality=95)
                    rows.append((name, wnid))
                else:
                    (root / split / wnid).mkdir(parents=True, exist_ok=True)
                    image.save(root / split / wnid / name, quality=95)
        if csv_layout:
            with open(root / f"{split}.csv", "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["filename", "label"])
                writer.writerows(rows)
    return splits


MINI_OPTIONS = dict(
    ways=2, shots=1, queries=2, num_train_tasks=12, num_val_tasks=3, num_test_tasks=3, image_size=20
)


def test_mini_imagenet_folder_and_csv_layouts_agree(tmp_path):
    wnids = make_mini_imagenet(tmp_path / "folders", csv_layout=False)
    make_mini_imagenet(tmp_path / "csv", csv_layout=True)
    folders = mini_imagenet_splits(tmp_path / "folders", **MINI_OPTIONS)
    csv_splits = mini_imagenet_splits(tmp_path / "csv", **MINI_OPTIONS)
    for splits in (folders, csv_splits):
        splits.check_disjoint()
        names = {k: sorted(splits.class_names[c] for c in v) for k, v in splits.classes.items()}
        assert names == wnids
        task = splits.train[0]
        assert splits.train.is_image
        assert task.support_x.shape == (2, 3, 20, 20) and task.query_x.shape == (4, 3, 20, 20)
        assert float(task.support_x.min()) >= 0.0 and float(task.support_x.max()) <= 1.0
        for tid in splits.train.task_ids.tolist():
            task = splits.train.task(tid)
            classes = splits.train.task_classes(tid)
            for x, y in zip(task.support_x, task.support_y, strict=True):
                w = int(splits.class_names[classes[int(y)]][1:]) - 1
                r, g = _color(w, 0)[:2]
                assert abs(float(x[0].mean()) * 255 - r) < 8 and abs(float(x[1].mean()) * 255 - g) < 8
    for (_, a), (_, b) in zip(folders.items(), csv_splits.items(), strict=True):
        for tid in a.task_ids.tolist():
            assert_same_task(a.task(tid), b.task(tid))
    default = mini_imagenet_splits(tmp_path / "folders", ways=2, shots=1, queries=1, num_train_tasks=2)
    assert default.train[0].support_x.shape == (2, 3, 84, 84)


def test_mini_imagenet_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        mini_imagenet_splits(tmp_path / "missing")
    message = str(info.value)
    assert str(tmp_path / "missing") in message and "{train,val,test}/<wnid>/*.jpg" in message
    assert "train.csv" in message and "Nothing is downloaded" in message

    make_mini_imagenet(tmp_path / "badcsv", csv_layout=True)
    (tmp_path / "badcsv" / "val.csv").write_text("file,wnid\nx.jpg,n004\n")
    with pytest.raises(ValueError, match="header 'filename,label'"):
        mini_imagenet_splits(tmp_path / "badcsv")

    make_mini_imagenet(tmp_path / "gone", csv_layout=True)
    (tmp_path / "gone" / "images" / "n00600000001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        mini_imagenet_splits(tmp_path / "gone")

    make_mini_imagenet(tmp_path / "big", csv_layout=False)
    with pytest.raises(ValueError, match="fewer than ways=3"):
        mini_imagenet_splits(tmp_path / "big", ways=3, shots=1, queries=1)
    with pytest.raises(ValueError, match="class .* has only 4 samples"):
        mini_imagenet_splits(tmp_path / "big", ways=2, shots=2, queries=3)


def test_pools_are_task_pools():
    for pool in (small_classification_pool(), SinusoidTaskPool(2, shots=1, queries=1)):
        assert isinstance(pool, TaskPool) and isinstance(pool, torch.utils.data.Dataset)
