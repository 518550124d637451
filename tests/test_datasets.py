"""Tests of the repository-level `datasets` package (bundled data, shifts, OOD, file readers)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from sklearn.datasets import load_digits as sklearn_load_digits

import datasets
from datasets import (
    DatasetFileError,
    Splits,
    available_datasets,
    available_ood,
    gaussian_noise,
    held_out_digits,
    load_cifar10,
    load_dataset,
    load_digits,
    load_idx_dataset,
    load_ood,
    load_svhn,
    load_tabular,
    natural_patches,
    read_idx,
    rotate,
    rotation_angles,
    stratified_split,
    uniform_noise,
)

NUM_DIGITS = 1797
IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _inputs(splits: Splits, part: str = "test") -> torch.Tensor:
    tensor: torch.Tensor = getattr(splits, part).tensors[0]
    return tensor


def _labels(splits: Splits, part: str = "test") -> torch.Tensor:
    tensor: torch.Tensor = getattr(splits, part).tensors[1]
    return tensor


@pytest.fixture(scope="module")
def digits() -> Splits:
    return load_digits(seed=0, flat=True)


@pytest.fixture(scope="module")
def digits04_images() -> Splits:
    return load_dataset("digits04", seed=0, flat=False)


# --------------------------------------------------------------------------- splits


def test_stratified_split_partitions_indices_60_20_20() -> None:
    labels = np.repeat(np.arange(4), 50)
    train, val, test = stratified_split(labels, seed=3)
    assert (len(train), len(val), len(test)) == (120, 40, 40)
    assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(200))
    for part, per_class in ((train, 30), (val, 10), (test, 10)):
        assert np.array_equal(np.bincount(labels[part], minlength=4), [per_class] * 4)


def test_digits_sizes_types_and_range(digits: Splits) -> None:
    sizes = [len(digits.train), len(digits.val), len(digits.test)]
    assert sum(sizes) == NUM_DIGITS
    assert abs(sizes[0] - 0.6 * NUM_DIGITS) <= 2
    assert abs(sizes[1] - 0.2 * NUM_DIGITS) <= 2
    assert abs(sizes[2] - 0.2 * NUM_DIGITS) <= 2
    assert digits.num_classes == 10
    assert digits.input_shape == (64,)
    assert digits.image_shape == (1, 8, 8)
    assert digits.name == "digits"
    x, y = digits.train.tensors
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (sizes[0], 64)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # pixels are raw / 16: every value times 16 is an integer in 0..16
    assert torch.equal(x * 16, (x * 16).round())


def test_digits_split_is_stratified(digits: Splits) -> None:
    all_labels = torch.cat([_labels(digits, p) for p in ("train", "val", "test")])
    totals = torch.bincount(all_labels, minlength=10).double()
    for part, fraction in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        counts = torch.bincount(_labels(digits, part), minlength=10).double()
        assert torch.all((counts - fraction * totals).abs() <= 2), part


def test_digits_split_disjoint_and_complete(digits: Splits) -> None:
    rows = torch.cat([_inputs(digits, p) for p in ("train", "val", "test")])
    full = torch.unique(rows, dim=0)
    reference = torch.as_tensor(np.asarray(sklearn_load_digits().data, np.float32) / 16)
    assert rows.shape[0] == NUM_DIGITS
    assert torch.equal(full, torch.unique(reference, dim=0))


def test_digits_seeding_is_deterministic(digits: Splits) -> None:
    again = load_digits(seed=0, flat=True)
    other = load_digits(seed=1, flat=True)
    assert torch.equal(_inputs(again), _inputs(digits))
    assert torch.equal(_labels(again), _labels(digits))
    assert _inputs(other).shape == _inputs(digits).shape
    assert not torch.equal(_inputs(other), _inputs(digits))


def test_digits_image_layout_matches_flat(digits: Splits) -> None:
    images = load_digits(seed=0, flat=False)
    assert images.input_shape == (1, 8, 8)
    assert _inputs(images).shape[1:] == (1, 8, 8)
    assert torch.equal(_inputs(images).reshape(-1, 64), _inputs(digits))


def test_digits_class_subset_remaps_labels(digits: Splits) -> None:
    sub = load_digits(seed=0, classes=(7, 3))
    assert sub.num_classes == 2
    for part in ("train", "val", "test"):
        assert set(_labels(sub, part).tolist()) == {0, 1}
    sevens = _inputs(digits)[_labels(digits) == 7]
    assert torch.equal(_inputs(sub)[_labels(sub) == 0], sevens)
    with pytest.raises(ValueError, match="classes"):
        load_digits(classes=(1, 1))
    with pytest.raises(ValueError, match="classes"):
        load_digits(classes=(10,))


def test_held_out_digits_partition_the_common_test_set(digits: Splits) -> None:
    splits, ood = held_out_digits(seed=0, flat=True)
    assert splits.name == "digits04" and splits.num_classes == 5
    assert set(_labels(splits, "train").tolist()) == {0, 1, 2, 3, 4}
    expected_ood = _inputs(digits)[_labels(digits) >= 5]
    assert torch.equal(ood, expected_ood)
    assert len(splits.test) + ood.shape[0] == len(digits.test)


@pytest.mark.parametrize(
    ("name", "features", "classes"), [("wine", 13, 3), ("breast_cancer", 30, 2)]
)
def test_tabular_standardised_with_train_statistics(name: str, features: int, classes: int) -> None:
    splits = load_dataset(name, seed=0)
    assert splits.input_shape == (features,) and splits.num_classes == classes
    assert splits.image_shape is None
    x = _inputs(splits, "train").double()
    assert torch.allclose(x.mean(0), torch.zeros(features, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(
        x.std(0, unbiased=False), torch.ones(features, dtype=torch.float64), atol=1e-4
    )
    # validation/test are scaled with the train statistics, so they are not exactly standard
    assert not torch.allclose(_inputs(splits, "test").mean(0), torch.zeros(features), atol=1e-5)
    total = len(splits.train) + len(splits.val) + len(splits.test)
    assert abs(len(splits.test) - 0.2 * total) <= 1
    counts = torch.bincount(_labels(splits, "test"), minlength=classes).double()
    all_labels = torch.cat([_labels(splits, p) for p in ("train", "val", "test")])
    assert torch.all((counts - 0.2 * torch.bincount(all_labels).double()).abs() <= 1)
    again = load_tabular(name, seed=0)
    assert torch.equal(_inputs(again), _inputs(splits))
    assert not torch.equal(_inputs(load_tabular(name, seed=5)), _inputs(splits))


# --------------------------------------------------------------------------- rotation


def test_rotation_angles() -> None:
    angles = rotation_angles()
    assert angles == tuple(range(0, 181, 15))
    assert len(angles) == 13 and angles[0] == 0 and angles[-1] == 180


@pytest.mark.parametrize("size", [5, 4, 8])
def test_rotation_zero_is_identity_and_90_matches_rot90(size: int) -> None:
    generator = torch.Generator().manual_seed(size)
    images = torch.rand(3, 2, size, size, generator=generator)
    assert torch.allclose(rotate(images, 0.0), images, atol=1e-6)
    expected = torch.rot90(images, 1, dims=(-2, -1))
    assert torch.allclose(rotate(images, 90.0), expected, atol=1e-5)
    assert not torch.allclose(rotate(images, 90.0), torch.rot90(images, -1, dims=(-2, -1)))
    assert torch.allclose(rotate(images, 180.0), torch.rot90(images, 2, dims=(-2, -1)), atol=1e-5)


def test_rotation_asymmetric_image_exact_values() -> None:
    image = torch.arange(25.0).reshape(1, 1, 5, 5)
    rotated = rotate(image, 90.0)
    # counter-clockwise: the last column becomes the first row
    assert torch.allclose(rotated[0, 0, 0], torch.tensor([4.0, 9.0, 14.0, 19.0, 24.0]), atol=1e-5)


def test_rotation_flat_inputs_and_determinism(digits: Splits) -> None:
    flat = _inputs(digits)[:10]
    rotated = rotate(flat, 45.0, image_shape=(8, 8))
    assert rotated.shape == flat.shape
    again = rotate(flat, 45.0, image_shape=(1, 8, 8))
    assert torch.equal(rotated, again)
    as_images = rotate(flat.reshape(-1, 1, 8, 8), 45.0).reshape(-1, 64)
    assert torch.equal(rotated, as_images)
    assert not torch.allclose(rotated, flat)
    assert float(rotated.min()) >= 0.0 and float(rotated.max()) <= 1.0 + 1e-6
    # zeros padding: a 45-degree rotation leaves the corners empty
    ones = torch.ones(1, 1, 9, 9)
    assert float(rotate(ones, 45.0)[0, 0, 0, 0]) == 0.0
    with pytest.raises(ValueError, match="image_shape"):
        rotate(flat, 30.0)
    with pytest.raises(ValueError, match="image_shape"):
        rotate(flat, 30.0, image_shape=(7, 7))


# --------------------------------------------------------------------------- OOD


@pytest.mark.parametrize("name", ["uniform", "gaussian", "natural_patches", "digits59"])
@pytest.mark.parametrize("flat", [True, False])
def test_ood_shaped_like_reference(name: str, flat: bool) -> None:
    reference = load_dataset("digits04", seed=0, flat=flat)
    ood = load_ood(name, reference, seed=0)
    assert ood.dtype == torch.float32
    assert ood.shape[1:] == reference.input_shape
    assert float(ood.min()) >= 0.0 and float(ood.max()) <= 1.0
    if name != "digits59":
        assert ood.shape[0] == len(reference.test)
        assert torch.equal(load_ood(name, reference, seed=0), ood)
        assert not torch.equal(load_ood(name, reference, seed=1), ood)


def test_noise_generators() -> None:
    uniform = uniform_noise(500, (1, 8, 8), seed=2)
    assert uniform.shape == (500, 1, 8, 8)
    assert 0.45 < float(uniform.mean()) < 0.55
    gauss = gaussian_noise(500, (64,), seed=2, mean=0.5, std=0.25)
    assert float(gauss.min()) == 0.0 and float(gauss.max()) == 1.0  # clipped tails
    assert 0.45 < float(gauss.mean()) < 0.55
    state = torch.get_rng_state()
    uniform_noise(3, (2,), seed=0)
    assert torch.equal(state, torch.get_rng_state())


def test_natural_patches_gray_and_rgb() -> None:
    gray = natural_patches(6, (1, 8, 8), seed=0)
    assert gray.shape == (6, 1, 8, 8)
    per_patch = gray.reshape(6, -1)
    assert torch.allclose(per_patch.min(1).values, torch.zeros(6))
    assert torch.allclose(per_patch.max(1).values, torch.ones(6))
    rgb = natural_patches(4, (3, 12, 10), seed=0)
    assert rgb.shape == (4, 3, 12, 10)
    assert not torch.allclose(rgb[:, 0], rgb[:, 1])
    with pytest.raises(ValueError):
        natural_patches(2, (2, 8, 8))


def test_ood_reference_mismatch_errors() -> None:
    wine = load_dataset("wine")
    assert load_ood("uniform", wine).shape[1:] == (13,)
    with pytest.raises(ValueError, match="tabular"):
        load_ood("natural_patches", wine)
    with pytest.raises(ValueError, match="digits"):
        load_ood("digits59", wine)


# --------------------------------------------------------------------------- registry


def test_registry_lists_names() -> None:
    assert set(available_datasets()) == {
        "digits",
        "digits04",
        "wine",
        "breast_cancer",
        "mnist",
        "fashion_mnist",
        "kmnist",
        "cifar10",
        "svhn",
    }
    assert {"uniform", "gaussian", "natural_patches", "digits59", "mnist", "cifar10"} <= set(
        available_ood()
    )
    assert datasets.load_dataset is load_dataset


def test_registry_unknown_names_list_valid_ones(digits: Splits) -> None:
    with pytest.raises(ValueError, match="unknown data set 'imagenet'") as err:
        load_dataset("imagenet")
    assert all(name in str(err.value) for name in available_datasets())
    with pytest.raises(ValueError, match="unknown OOD set 'noise'") as err:
        load_ood("noise", digits)
    assert all(name in str(err.value) for name in available_ood())


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "kmnist", "cifar10", "svhn"])
def test_file_datasets_require_data_dir(name: str, digits: Splits) -> None:
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset(name)
    with pytest.raises(ValueError, match="data_dir"):
        load_ood(name, digits)


def test_registry_digits04_matches_held_out(digits04_images: Splits) -> None:
    splits, ood = held_out_digits(seed=0, flat=False)
    assert torch.equal(_inputs(digits04_images), _inputs(splits))
    assert torch.equal(load_ood("digits59", digits04_images, seed=0), ood)


# --------------------------------------------------------------------------- IDX files


def _idx_bytes(magic: int, array: np.ndarray) -> bytes:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx_dir(
    root: Path,
    *,
    gz: bool = False,
    n_train: int = 100,
    n_test: int = 20,
    hw: tuple[int, int] = (6, 5),
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        IDX_NAMES[0]: rng.integers(0, 256, (n_train, *hw), dtype=np.uint8),
        IDX_NAMES[1]: (np.arange(n_train) % 10).astype(np.uint8),
        IDX_NAMES[2]: rng.integers(0, 256, (n_test, *hw), dtype=np.uint8),
        IDX_NAMES[3]: (np.arange(n_test) % 10).astype(np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        data = _idx_bytes(2051 if array.ndim == 3 else 2049, array)
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (root / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reader_raw_and_gz(tmp_path: Path, gz: bool) -> None:
    arrays = _write_idx_dir(tmp_path, gz=gz)
    raw = load_idx_dataset(tmp_path)
    assert raw.train_images.shape == (100, 1, 6, 5)
    assert np.array_equal(raw.train_images[:, 0], arrays[IDX_NAMES[0]])
    assert np.array_equal(raw.train_labels, arrays[IDX_NAMES[1]])
    assert np.array_equal(raw.test_images[:, 0], arrays[IDX_NAMES[2]])
    assert raw.test_labels.dtype == np.int64
    assert raw.image_shape == (1, 6, 5)


def test_idx_registry_splits_and_subfolder(tmp_path: Path) -> None:
    arrays = _write_idx_dir(tmp_path / "raw")
    splits = load_dataset("fashion_mnist", data_dir=tmp_path, seed=0)
    assert splits.input_shape == (30,) and splits.image_shape == (1, 6, 5)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (90, 10, 20)
    assert torch.equal(torch.bincount(_labels(splits, "val")), torch.ones(10, dtype=torch.int64))
    expected_test = torch.from_numpy(arrays[IDX_NAMES[2]].reshape(20, 30).astype(np.float32)) / 255
    assert torch.allclose(_inputs(splits), expected_test)
    images = load_dataset("mnist", data_dir=tmp_path, seed=0, flat=False)
    assert _inputs(images).shape == (20, 1, 6, 5)
    other = load_dataset("mnist", data_dir=tmp_path, seed=1)
    assert not torch.equal(_inputs(other, "val"), _inputs(splits, "val"))


def test_idx_as_ood_resized_to_reference(tmp_path: Path) -> None:
    _write_idx_dir(tmp_path)
    reference = load_dataset("digits", flat=True)
    ood = load_ood("kmnist", reference, data_dir=tmp_path)
    assert ood.shape == (20, 64)
    assert float(ood.min()) >= 0.0 and float(ood.max()) <= 1.0


def test_idx_bad_magic(tmp_path: Path) -> None:
    _write_idx_dir(tmp_path)
    path = tmp_path / IDX_NAMES[0]
    data = bytearray(path.read_bytes())
    data[:4] = struct.pack(">I", 2049)
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetFileError, match=r"magic number 2049.*expected 2051"):
        load_idx_dataset(tmp_path)
    with pytest.raises(DatasetFileError, match="magic"):
        read_idx(tmp_path / IDX_NAMES[2], 2049)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated(tmp_path: Path, gz: bool) -> None:
    _write_idx_dir(tmp_path, gz=gz)
    path = tmp_path / (IDX_NAMES[2] + (".gz" if gz else ""))
    data = path.read_bytes()
    if gz:
        path.write_bytes(gzip.compress(gzip.decompress(data)[:-7]))
    else:
        path.write_bytes(data[:-7])
    with pytest.raises(DatasetFileError, match="truncated") as err:
        load_idx_dataset(tmp_path)
    assert IDX_NAMES[2] in str(err.value)


def test_idx_truncated_gzip_stream_and_trailing_bytes(tmp_path: Path) -> None:
    _write_idx_dir(tmp_path, gz=True)
    path = tmp_path / (IDX_NAMES[0] + ".gz")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DatasetFileError, match="gzip"):
        load_idx_dataset(tmp_path)
    other = tmp_path / "other"
    _write_idx_dir(other)
    extra = other / IDX_NAMES[1]
    extra.write_bytes(extra.read_bytes() + b"\x00")
    with pytest.raises(DatasetFileError, match="trailing"):
        load_idx_dataset(other)


def test_idx_label_count_and_range(tmp_path: Path) -> None:
    _write_idx_dir(tmp_path)
    (tmp_path / IDX_NAMES[3]).write_bytes(_idx_bytes(2049, np.zeros(19, np.uint8)))
    with pytest.raises(DatasetFileError, match="19 labels for 20 images"):
        load_idx_dataset(tmp_path)
    (tmp_path / IDX_NAMES[3]).write_bytes(_idx_bytes(2049, np.full(20, 10, np.uint8)))
    with pytest.raises(DatasetFileError, match=r"0\.\.9"):
        load_idx_dataset(tmp_path)


def test_idx_missing_files_list_expected_names(tmp_path: Path) -> None:
    _write_idx_dir(tmp_path)
    (tmp_path / IDX_NAMES[3]).unlink()
    with pytest.raises(DatasetFileError) as err:
        load_dataset("mnist", data_dir=tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message
    assert all(name in message for name in IDX_NAMES)
    assert "missing file(s) t10k-labels-idx1-ubyte " in message
    assert isinstance(err.value, ValueError)
    with pytest.raises(DatasetFileError, match="does not exist"):
        load_idx_dataset(tmp_path / "absent")


# --------------------------------------------------------------------------- CIFAR-10


def _cifar_records(labels: np.ndarray, rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    pixels = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    records = np.concatenate([labels.astype(np.uint8)[:, None], pixels], axis=1)
    return records.tobytes(), pixels.reshape(-1, 3, 32, 32)


def _write_cifar_dir(root: Path, per_batch: int = 20, n_test: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    images = {}
    for i in range(1, 6):
        data, pixels = _cifar_records(np.arange(per_batch) % 10, rng)
        (root / f"data_batch_{i}.bin").write_bytes(data)
        images[f"data_batch_{i}.bin"] = pixels
    data, pixels = _cifar_records(np.arange(n_test) % 10, rng)
    (root / "test_batch.bin").write_bytes(data)
    images["test_batch.bin"] = pixels
    return images


def test_cifar_reader_in_subfolder(tmp_path: Path) -> None:
    images = _write_cifar_dir(tmp_path / "cifar-10-batches-bin")
    raw = load_cifar10(tmp_path)
    assert raw.train_images.shape == (100, 3, 32, 32)
    assert np.array_equal(raw.train_images[:20], images["data_batch_1.bin"])
    assert np.array_equal(raw.train_images[80:], images["data_batch_5.bin"])
    assert np.array_equal(raw.test_images, images["test_batch.bin"])
    assert np.array_equal(raw.train_labels[:20], np.arange(20) % 10)
    # record layout: byte 1..1024 is the red plane, row-major
    record = (tmp_path / "cifar-10-batches-bin" / "test_batch.bin").read_bytes()[:3073]
    assert np.array_equal(
        raw.test_images[0, 0].reshape(-1), np.frombuffer(record[1:1025], np.uint8)
    )
    splits = load_dataset("cifar10", data_dir=tmp_path, flat=False)
    assert splits.input_shape == (3, 32, 32)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (90, 10, 10)
    digits_ood = load_ood("cifar10", load_dataset("digits", flat=False), data_dir=tmp_path)
    assert digits_ood.shape == (10, 1, 8, 8)


def test_cifar_truncated_and_bad_labels(tmp_path: Path) -> None:
    _write_cifar_dir(tmp_path)
    path = tmp_path / "data_batch_3.bin"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(DatasetFileError, match="multiple of the 3073") as err:
        load_cifar10(tmp_path)
    assert "data_batch_3.bin" in str(err.value)
    bad = bytearray(data)
    bad[3073] = 10
    path.write_bytes(bytes(bad))
    with pytest.raises(DatasetFileError, match=r"0\.\.9"):
        load_cifar10(tmp_path)
    path.write_bytes(b"")
    with pytest.raises(DatasetFileError, match="positive multiple"):
        load_cifar10(tmp_path)


def test_cifar_missing_files_list_expected_names(tmp_path: Path) -> None:
    _write_cifar_dir(tmp_path)
    (tmp_path / "test_batch.bin").unlink()
    with pytest.raises(DatasetFileError) as err:
        load_dataset("cifar10", data_dir=tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "test_batch.bin" in message
    assert all(f"data_batch_{i}.bin" in message for i in range(1, 6))
    assert "cifar-10-batches-bin" in message


# --------------------------------------------------------------------------- SVHN


def _write_svhn(path: Path, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = (np.arange(n) % 10 + 1).astype(np.uint8)[:, None]
    scipy.io.savemat(path, {"X": x, "y": y})
    return x, y


def test_svhn_reader(tmp_path: Path) -> None:
    x, y = _write_svhn(tmp_path / "train_32x32.mat", 100, 0)
    _write_svhn(tmp_path / "test_32x32.mat", 20, 1)
    raw = load_svhn(tmp_path)
    assert raw.train_images.shape == (100, 3, 32, 32)
    assert raw.train_images.dtype == np.uint8
    # X[row, col, channel, i] -> images[i, channel, row, col]
    assert raw.train_images[7, 2, 5, 9] == x[5, 9, 2, 7]
    assert np.array_equal(raw.train_labels, y[:, 0] % 10)
    assert raw.train_labels[9] == 0 and raw.train_labels.max() == 9
    splits = load_dataset("svhn", data_dir=tmp_path)
    assert splits.input_shape == (3 * 32 * 32,)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (90, 10, 20)


def test_svhn_malformed_files(tmp_path: Path) -> None:
    _write_svhn(tmp_path / "test_32x32.mat", 20, 1)
    train = tmp_path / "train_32x32.mat"
    scipy.io.savemat(train, {"X": np.zeros((32, 32, 3, 4), np.uint8)})
    with pytest.raises(DatasetFileError, match=r"missing variable.*y"):
        load_svhn(tmp_path)
    scipy.io.savemat(train, {"X": np.zeros((28, 28, 3, 4), np.uint8), "y": np.ones((4, 1))})
    with pytest.raises(DatasetFileError, match=r"\[32, 32, 3, N>0\]"):
        load_svhn(tmp_path)
    scipy.io.savemat(train, {"X": np.zeros((32, 32, 3, 4), np.uint8), "y": np.zeros((4, 1))})
    with pytest.raises(DatasetFileError, match=r"1\.\.10"):
        load_svhn(tmp_path)
    scipy.io.savemat(train, {"X": np.zeros((32, 32, 3, 4), np.uint8), "y": np.ones((3, 1))})
    with pytest.raises(DatasetFileError, match="3 labels for 4 images"):
        load_svhn(tmp_path)


def test_svhn_corrupt_and_truncated(tmp_path: Path) -> None:
    _write_svhn(tmp_path / "test_32x32.mat", 20, 1)
    train = tmp_path / "train_32x32.mat"
    _write_svhn(train, 50, 0)
    data = train.read_bytes()
    train.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetFileError, match=r"train_32x32\.mat") as err:
        load_svhn(tmp_path)
    assert "corrupt or truncated" in str(err.value)
    train.write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(DatasetFileError, match=r"train_32x32\.mat"):
        load_svhn(tmp_path)


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (np.full((32, 32, 3, 4), 0.5, np.float32), r"in \[0, 1\].*black images"),
        (np.full((32, 32, 3, 4), 12.5, np.float64), "fractional values"),
        (np.full((32, 32, 3, 4), 300, np.int32), r"0\.\.255.*300"),
        (np.full((32, 32, 3, 4), np.nan, np.float32), r"0\.\.255"),
    ],
    ids=["unit-floats", "fractional", "over-255", "nan"],
)
def test_svhn_pixels_that_a_uint8_cast_would_mangle(
    tmp_path: Path, x: np.ndarray, match: str
) -> None:
    """Float X in [0, 1] used to be cast to all-zero images."""
    _write_svhn(tmp_path / "test_32x32.mat", 20, 1)
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": x, "y": np.ones((4, 1))})
    with pytest.raises(DatasetFileError, match=match):
        load_svhn(tmp_path)


def test_svhn_whole_number_float_pixels_are_read(tmp_path: Path) -> None:
    x, _ = _write_svhn(tmp_path / "test_32x32.mat", 20, 1)
    scipy.io.savemat(
        tmp_path / "train_32x32.mat", {"X": x.astype(np.float64), "y": np.ones((20, 1))}
    )
    raw = load_svhn(tmp_path)
    assert np.array_equal(raw.train_images, raw.test_images)  # the same pixels, as uint8


def test_svhn_empty_mat_is_a_dataset_file_error(tmp_path: Path) -> None:
    _write_svhn(tmp_path / "test_32x32.mat", 20, 1)
    (tmp_path / "train_32x32.mat").write_bytes(b"")
    with pytest.raises(DatasetFileError, match=r"train_32x32\.mat.*corrupt or truncated"):
        load_svhn(tmp_path)


def test_svhn_missing_files_list_expected_names(tmp_path: Path) -> None:
    _write_svhn(tmp_path / "train_32x32.mat", 10, 0)
    with pytest.raises(DatasetFileError) as err:
        load_ood("svhn", load_dataset("digits"), data_dir=tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message
    assert "train_32x32.mat" in message and "test_32x32.mat" in message
    assert "missing file(s) test_32x32.mat" in message


def test_no_unpickling_or_network_modules_used() -> None:
    source = "".join(path.read_text() for path in Path(datasets.__file__).parent.glob("*.py"))
    forbidden_calls = (
        "import pickle",
        "urllib",
        "requests",
        "http",
        "fetch_",
        "np.load(",
        "torch.load(",
    )
    for forbidden in forbidden_calls:
        assert forbidden not in source
