"""Real data sets: digits, toys, EDM folder/zip (SPEC section 4), CIFAR-10 batches, ArrayDataset, sims-dataset."""
from __future__ import annotations

import json
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from sims.config import DataConfig
from sims.data import (
    TOY_NAMES,
    ArrayDataset,
    DatasetError,
    from_uint8,
    load_digits_arrays,
    load_image_folder,
    load_real_dataset,
    make_toy,
    read_cifar10,
    to_uint8,
    write_image_folder,
)


def _cfg(**kw):
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), kw)
    OmegaConf.set_struct(cfg, True)
    return cfg


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


# ------------------------------------------------------------------------------------ digits
def test_digits_8x8_shape_range_labels():
    ds = load_real_dataset(_cfg(name="digits", resolution=8))
    assert ds.data.shape == (1797, 1, 8, 8) and ds.data.dtype == torch.float32
    assert ds.data.min() == -1.0 and ds.data.max() == 1.0
    # x = v/16*2-1 with integer v in 0..16: every value sits on that 17-level grid
    v = (ds.data + 1) / 2 * 16
    assert torch.allclose(v, v.round(), atol=1e-5)
    assert ds.labels is not None and ds.labels.dtype == torch.int64
    assert sorted(ds.labels.unique().tolist()) == list(range(10))
    assert (ds.resolution, ds.channels, ds.is_image, ds.dim, ds.label_dim) == (8, 1, True, 64, 0)
    x, label = ds[0]
    assert x.shape == (1, 8, 8) and label.shape == (0,)


def test_digits_16x16_upsample_and_bad_resolution():
    x8, y8 = load_digits_arrays(8)
    x16, y16 = load_digits_arrays(16)
    assert x16.shape == (1797, 1, 16, 16)
    assert x16.min() >= -1.0 and x16.max() <= 1.0
    assert torch.equal(y8, y16)
    v = (x16 + 1) / 2 * 16
    assert not torch.allclose(v, v.round(), atol=1e-3), "bilinear upsampling should interpolate, not replicate"
    # bilinear (align_corners=False) 2x: each 2x2 output block averages to a smoothed version of its source pixel
    assert (torch.nn.functional.avg_pool2d(x16, 2) - x8).abs().mean() < 0.2
    with pytest.raises(DatasetError, match=r"data.resolution=12.*8 or 16"):
        load_real_dataset(_cfg(name="digits", resolution=12))


def test_digits_one_hot_labels_and_collate():
    ds = load_real_dataset(_cfg(name="digits", use_labels=True))
    assert ds.label_dim == 10
    x, label = ds[5]
    assert label.dtype == torch.float32 and label.shape == (10,)
    assert label.sum() == 1 and int(label.argmax()) == int(ds.labels[5])
    xb, lb = next(iter(DataLoader(ds, batch_size=7, shuffle=False)))
    assert xb.shape == (7, 1, 8, 8) and lb.shape == (7, 10)
    assert torch.equal(lb.argmax(1), ds.labels[:7])


def test_channels_mismatch_and_max_size():
    with pytest.raises(DatasetError, match=r"data.channels=2 .* 1 channels"):
        load_real_dataset(_cfg(name="digits", channels=2))
    gray, rgb = load_real_dataset(_cfg(name="digits", resolution=16)), load_real_dataset(_cfg(name="digits", resolution=16, channels=3))
    assert rgb.data.shape == (1797, 3, 16, 16) and all(torch.equal(rgb.data[:, c], gray.data[:, 0]) for c in range(3))
    ds = load_real_dataset(_cfg(name="digits", max_size=100, use_labels=True))
    assert len(ds) == 100 and ds.label_dim == 10
    with pytest.raises(ValueError, match=r"digits, toy2d, folder, cifar10"):
        load_real_dataset(_cfg(name="mnist"))


# ------------------------------------------------------------------------------------ toys
@pytest.mark.parametrize("name", TOY_NAMES)
def test_toys_deterministic_dim_and_scale(name):
    a = make_toy(name, 4000, 0.05, seed=3)
    b = make_toy(name, 4000, 0.05, seed=3)
    c = make_toy(name, 4000, 0.05, seed=4)
    d = 3 if name == "swiss_roll" else 2
    assert a.shape == (4000, d) and np.isfinite(a).all()
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)
    # fixed standardisation: roughly zero mean and unit variance per axis
    assert np.all(np.abs(a.mean(0)) < 0.15) and np.all(np.abs(a.std(0) - 1) < 0.15)


def test_toy_dataset_and_errors():
    ds = load_real_dataset(_cfg(name="toy2d", toy="circles", num_samples=300, seed=1))
    assert ds.data.shape == (300, 2) and not ds.is_image and ds.resolution is None and ds.dim == 2
    assert torch.allclose(ds.data, torch.from_numpy(make_toy("circles", 300, 0.05, 1)).float())
    xb, lb = next(iter(DataLoader(ds, batch_size=16)))
    assert xb.shape == (16, 2) and lb.shape == (16, 0)
    with pytest.raises(ValueError, match=r"unknown toy 'spiral'.*moons"):
        make_toy("spiral", 10)
    with pytest.raises(ValueError, match="noise"):
        make_toy("moons", 10, noise=-1.0)
    with pytest.raises(DatasetError, match="no labels"):
        load_real_dataset(_cfg(name="toy2d", use_labels=True))


# ------------------------------------------------------------------------------------ ArrayDataset
def test_array_dataset_one_hot_subset_xflip():
    data = torch.linspace(-1, 1, 6 * 3 * 2 * 4).reshape(6, 3, 2, 4)
    labels = torch.tensor([0, 2, 1, 2, 0, 1])
    ds = ArrayDataset(data, labels)  # label_dim inferred: 3
    assert ds.label_dim == 3 and ds.item_shape == (3, 2, 4)
    assert torch.equal(ds[1][1], torch.tensor([0.0, 0.0, 1.0]))
    sub = ds.subset([1, 3])
    assert len(sub) == 2 and sub.label_dim == 3 and torch.equal(sub.labels, torch.tensor([2, 2]))
    flipped = ArrayDataset(data, labels, label_dim=5, xflip=True)
    assert len(flipped) == 12
    assert torch.equal(flipped[6 + 2][0], data[2].flip(-1)) and torch.equal(flipped[2][0], data[2])
    assert torch.equal(flipped[8][1], flipped[2][1]) and flipped[8][1].shape == (5,)
    unlabelled = ArrayDataset(data, labels, label_dim=0)
    assert unlabelled[0][1].shape == (0,) and unlabelled.num_classes == 3
    with pytest.raises(ValueError, match="label_dim=2"):
        ArrayDataset(data, labels, label_dim=2)
    with pytest.raises(ValueError, match="no labels"):
        ArrayDataset(data, None, label_dim=3)
    with pytest.raises(ValueError, match="xflip"):
        ArrayDataset(torch.zeros(4, 2), xflip=True)
    with pytest.raises(IndexError):
        ds[6]


# ------------------------------------------------------------------------------------ EDM folder / zip
@pytest.mark.parametrize("suffix", ["", ".zip"])
def test_folder_round_trip_rgb_labels(tmp_path, suffix):
    rng = np.random.default_rng(0)
    n = 1003  # > 1000: exercises the 00001/ sub-folder
    pixels = rng.integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8)  # NHWC
    labels = rng.integers(0, 7, size=n)
    out = write_image_folder(tmp_path / f"ds{suffix}", pixels, labels)
    if suffix:
        with zipfile.ZipFile(out) as zf:
            names = zf.namelist()
            assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
            meta = json.loads(zf.read("dataset.json"))
    else:
        names = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
        meta = json.loads((out / "dataset.json").read_text())
    assert "00000/img00000000.png" in names and "00001/img00001002.png" in names
    assert meta["labels"][1002] == ["00001/img00001002.png", int(labels[1002])]
    ds = load_real_dataset(_cfg(name="folder", path=str(out), resolution=4, channels=3, use_labels=True))
    assert ds.data.shape == (n, 3, 4, 4) and ds.label_dim == 7
    assert torch.equal(to_uint8(ds.data), torch.from_numpy(pixels).permute(0, 3, 1, 2))
    assert torch.equal(ds.labels, torch.from_numpy(labels))
    assert int(ds[1002][1].argmax()) == labels[1002]


def test_folder_round_trip_grayscale_quantised_no_labels(tmp_path):
    x = torch.rand(10, 1, 8, 8) * 2 - 1  # float images in [-1, 1], NCHW
    q = to_uint8(x)
    out = write_image_folder(tmp_path / "g.zip", q)
    ds = load_image_folder(out, resolution=8)
    assert ds.channels == 1 and ds.labels is None and ds.label_dim == 0
    assert torch.equal(ds.data, from_uint8(q))  # pixel-exact after quantisation
    assert (ds.data - x).abs().max() <= 0.5 / 127.5 + 1e-6
    xb, lb = next(iter(DataLoader(ds, batch_size=4)))
    assert xb.shape == (4, 1, 8, 8) and lb.shape == (4, 0)
    with zipfile.ZipFile(out) as zf:
        assert json.loads(zf.read("dataset.json")) == {"labels": None}
    with pytest.raises(DatasetError, match="no labels"):
        load_image_folder(out, use_labels=True)
    with pytest.raises(FileExistsError):
        write_image_folder(out, q)
    write_image_folder(out, q[:3], overwrite=True)
    assert len(load_image_folder(out)) == 3
    with pytest.raises(TypeError, match="uint8"):
        write_image_folder(tmp_path / "f", x)


def test_folder_errors_missing_path_and_no_images(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match=r"data set not found: .*nope \(set data.path=\.\.\.\)"):
        load_real_dataset(_cfg(name="folder", path=str(missing)))
    with pytest.raises(DatasetError, match=r"needs data.path"):
        load_real_dataset(_cfg(name="folder"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no PNG images"):
        load_image_folder(tmp_path / "empty")
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="readable zip"):
        load_image_folder(tmp_path / "bad.zip")


def test_folder_errors_bad_images(tmp_path):
    gray = np.zeros((8, 8), np.uint8)
    d = tmp_path / "nonsquare"
    _png(d / "00000/img00000000.png", gray)
    _png(d / "00000/img00000001.png", np.zeros((4, 6), np.uint8))  # H=4, W=6
    with pytest.raises(DatasetError, match=r"square, got 6x4 in .*img00000001.png"):
        load_image_folder(d, resolution=8)

    d = tmp_path / "wrongsize"
    _png(d / "00000/img00000000.png", gray)
    with pytest.raises(DatasetError, match=r"expected 16x16, got 8x8 in .*img00000000.png"):
        load_real_dataset(_cfg(name="folder", path=str(d), resolution=16))

    d = tmp_path / "corrupt"
    _png(d / "00000/img00000000.png", gray)
    (d / "00000/img00000001.png").write_bytes(b"\x89PNG garbage, not an image")
    with pytest.raises(DatasetError, match=r"cannot read image .*img00000001.png"):
        load_image_folder(d)
    zipped = write_image_folder(tmp_path / "c.zip", gray[None])
    with zipfile.ZipFile(zipped, "a") as zf:
        zf.writestr("00000/img00000001.png", b"garbage")
    with pytest.raises(DatasetError, match=r"cannot read image .*c.zip:00000/img00000001.png"):
        load_image_folder(zipped)

    d = tmp_path / "mixed"
    _png(d / "a.png", gray)
    _png(d / "b.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"inconsistent channels: .*b.png"):
        load_image_folder(d)


def test_folder_errors_labels(tmp_path):
    out = write_image_folder(tmp_path / "lab", np.zeros((3, 8, 8), np.uint8), labels=[0, 1, 2])
    meta = json.loads((out / "dataset.json").read_text())
    meta["labels"].append(["00000/img00000099.png", 1])
    (out / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"labels '00000/img00000099.png', which is not in the data set"):
        load_image_folder(out)
    meta["labels"] = meta["labels"][:2]  # img00000002 now unlabelled
    (out / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"img00000002.png has no label"):
        load_image_folder(out)
    (out / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="cannot parse"):
        load_image_folder(out)


# ------------------------------------------------------------------------------------ CIFAR-10
def _write_cifar(root: Path, per_batch: int = 3) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b, fname in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = np.zeros((per_batch, 3072), np.uint8)
        for i in range(per_batch):
            data[i, :1024] = 10 * b + i  # red plane
            data[i, 1024:2048] = 100  # green plane
            data[i, 2048 + 5] = 200  # blue, row 0, column 5
        batch = {b"batch_label": b"x", b"data": data, b"labels": [(b + i) % 10 for i in range(per_batch)]}
        with open(folder / fname, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder


def test_cifar10_pickle_reading(tmp_path):
    folder = _write_cifar(tmp_path)
    ds = load_real_dataset(_cfg(name="cifar10", path=str(folder), resolution=32, channels=3, use_labels=True))
    assert ds.data.shape == (15, 3, 32, 32) and ds.label_dim == 10
    px = to_uint8(ds.data)
    assert px[4, 0].unique().tolist() == [11]  # batch 2 (b=1), image 1: red plane = 11
    assert px[4, 1].unique().tolist() == [100]
    assert px[4, 2, 0, 5] == 200 and px[4, 2].sum() == 200
    assert ds.labels.tolist()[:6] == [0, 1, 2, 1, 2, 3]
    test_px, test_labels = read_cifar10(tmp_path, split="test")  # the parent folder works too
    assert test_px.shape == (3, 3, 32, 32) and test_px[0, 0, 0, 0] == 50 and test_labels.tolist() == [5, 6, 7]
    tgz = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    tar_px, _ = read_cifar10(tgz, split="train")
    assert np.array_equal(tar_px, px.numpy())


def test_cifar10_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"data set not found: .*missing"):
        read_cifar10(tmp_path / "missing")
    folder = _write_cifar(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match=r"batch not found: .*data_batch_3"):
        read_cifar10(folder)
    with pytest.raises(DatasetError, match="data.resolution=32"):
        load_real_dataset(_cfg(name="cifar10", path=str(folder), resolution=8, channels=3))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(DatasetError, match="refusing to load builtins.print"):
        read_cifar10(folder, split="test")


# ------------------------------------------------------------------------------------ sims-dataset
def test_sims_dataset_cli(tmp_path, capsys):
    from sims.cli.dataset import main

    out = tmp_path / "digits16.zip"
    assert main(["digits", "--out", str(out), "--resolution", "16"]) == 0
    ds = load_image_folder(out, resolution=16, use_labels=True)
    x16, y16 = load_digits_arrays(16)
    assert torch.equal(ds.data, from_uint8(to_uint8(x16)))
    assert torch.equal(ds.labels, y16) and ds.label_dim == 10
    assert main(["digits", "--out", str(out)]) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err

    folder = _write_cifar(tmp_path / "src")
    out = tmp_path / "cifar"
    assert main(["cifar10", "--source", str(folder), "--out", str(out), "--no-labels"]) == 0
    ds = load_image_folder(out, resolution=32)
    assert ds.data.shape == (15, 3, 32, 32) and ds.labels is None
    assert np.array_equal(to_uint8(ds.data).numpy(), read_cifar10(folder)[0])
