"""``sims-dataset folder`` / presets (sims.data.convert) and the streaming EDM zip reader (sims.data.zip_dataset).

Pixel values are checked against references computed here with plain Pillow/numpy calls that follow
NVlabs/edm(2) ``dataset_tool.py``'s ``center-crop`` and ``center-crop-dhariwal`` as documented in
sims.data.convert.
"""
from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sims.cli.dataset import main
from sims.data import DatasetError, image_name, load_image_folder, write_image_folder
from sims.data.convert import convert_folder
from sims.data.images import to_uint8
from sims.data.zip_dataset import ImageZipDataset, open_image_dataset


# ------------------------------------------------------------------------------------ references
def _ref_rgb(path: Path) -> Image.Image:
    im = Image.open(path)
    im.load()
    if im.mode.startswith("I;16"):
        im = Image.fromarray(np.rint(np.asarray(im, dtype=np.float64) / 257.0).astype(np.uint8), mode="L")
    return im.convert("RGB")


def ref_center_crop(path: Path, r: int) -> np.ndarray:
    a = np.asarray(_ref_rgb(path))
    h, w = a.shape[:2]
    s = min(h, w)
    a = a[(h - s) // 2:(h + s) // 2, (w - s) // 2:(w + s) // 2]
    return np.asarray(Image.fromarray(a).resize((r, r), Image.Resampling.LANCZOS))


def ref_dhariwal(path: Path, r: int) -> np.ndarray:
    im = _ref_rgb(path)
    while min(*im.size) >= 2 * r:
        im = im.resize(tuple(x // 2 for x in im.size), resample=Image.Resampling.BOX)
    scale = r / min(*im.size)
    im = im.resize(tuple(round(x * scale) for x in im.size), resample=Image.Resampling.BICUBIC)
    a = np.asarray(im)
    y, x = (a.shape[0] - r) // 2, (a.shape[1] - r) // 2
    return a[y:y + r, x:x + r]


def _pixels(ds, i: int) -> np.ndarray:
    """Item i of a data set as uint8 [H, W, C]."""
    return to_uint8(ds[i][0]).permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------------------ sources
def _noise(rng, h, w, c=3):
    base = rng.integers(0, 256, size=(h, w, c), dtype=np.uint8)
    ramp = np.linspace(0, 255, w, dtype=np.float64)[None, :, None]
    return (base.astype(np.float64) * 0.5 + ramp * 0.5).astype(np.uint8)


def make_mixed_folder(root: Path, seed: int = 0) -> list:
    """A folder of mixed sizes/modes/formats; returns the sorted relative image paths."""
    rng = np.random.default_rng(seed)
    specs = [
        ("a_wide.jpg", lambda: Image.fromarray(_noise(rng, 23, 37))),
        ("b_tall_gray.png", lambda: Image.fromarray(_noise(rng, 40, 16, 1)[:, :, 0])),
        ("c_rgba.png", lambda: Image.fromarray(_noise(rng, 30, 30, 4), mode="RGBA")),
        ("d_palette.png", lambda: Image.fromarray(_noise(rng, 20, 31)).quantize(16)),
        ("sub/e_big.JPG", lambda: Image.fromarray(_noise(rng, 48, 64))),
        ("sub/deeper/f_tiny_gray.jpg", lambda: Image.fromarray(_noise(rng, 9, 9, 1)[:, :, 0])),
        ("sub/g_16bit.png", lambda: Image.fromarray((rng.integers(0, 65536, (18, 22))).astype(np.uint16))),
        ("sub/h_exact.png", lambda: Image.fromarray(_noise(rng, 16, 16))),
    ]
    for rel, make in specs:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        make().save(p)
    (root / "README.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"ignored: hidden")
    return sorted(rel for rel, _ in specs)


def make_class_tree(root: Path, seed: int = 1) -> dict:
    """Class folders zebra/ant/cat (sorted: ant=0, cat=1, zebra=2); returns {relative path: class}."""
    rng = np.random.default_rng(seed)
    files = {"zebra/z1.jpg": (70, 40), "zebra/z2.png": (33, 33), "ant/a1.png": (25, 50),
             "ant/nested/a2.jpg": (64, 64), "cat/c1.jpg": (17, 29)}
    classes = {"ant": 0, "cat": 1, "zebra": 2}
    for rel, (w, h) in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_noise(rng, h, w)).save(p)
    return {rel: classes[rel.split("/")[0]] for rel in sorted(files)}


@pytest.fixture(scope="module")
def digits_zip(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "digits8.zip"
    assert main(["digits", "--out", str(out)]) == 0
    return out


# ------------------------------------------------------------------------------------ sims-dataset folder
def test_folder_mixed_sizes_center_crop(tmp_path, capsys):
    src = tmp_path / "src"
    rels = make_mixed_folder(src)
    out = tmp_path / "out" / "mixed-16.zip"
    assert main(["folder", "--source", str(src), "--out", str(out), "--resolution", "16", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {len(rels)} images 16x16x3, no labels" in printed and "ignored 1 files" in printed
    with zipfile.ZipFile(out) as zf:
        infos = zf.infolist()
        assert [i.filename for i in infos] == [image_name(i) for i in range(len(rels))] + ["dataset.json"]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
        assert json.loads(zf.read("dataset.json")) == {"labels": None}
    ds = ImageZipDataset(out, resolution=16)
    assert (len(ds), ds.item_shape, ds.channels, ds.resolution, ds.labels, ds.label_dim) == (len(rels), (3, 16, 16), 3, 16, None, 0)
    for i, rel in enumerate(rels):  # item i = i-th source path in sorted order
        assert np.array_equal(_pixels(ds, i), ref_center_crop(src / rel, 16)), rel
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary files left


def test_folder_class_labels_dhariwal(tmp_path):
    src = tmp_path / "src"
    tree = make_class_tree(src)
    out = tmp_path / "classes.zip"
    argv = ["folder", "--source", str(src), "--out", str(out), "--resolution", "8", "--labels", "folders",
            "--transform", "center-crop-dhariwal", "--no-progress"]
    assert main(argv) == 0
    with zipfile.ZipFile(out) as zf:
        meta = json.loads(zf.read("dataset.json"))
    assert meta["class_names"] == ["ant", "cat", "zebra"]
    assert meta["labels"] == [[image_name(i), c] for i, c in enumerate(tree.values())]
    ds = ImageZipDataset(out, resolution=8, use_labels=True)
    assert ds.labels.tolist() == list(tree.values()) and ds.label_dim == 3 and ds.num_classes == 3
    assert ds.class_names == ["ant", "cat", "zebra"]
    for i, rel in enumerate(tree):
        assert np.array_equal(_pixels(ds, i), ref_dhariwal(src / rel, 8)), rel
        assert ds[i][1].tolist() == np.eye(3)[tree[rel]].tolist()
    mem = load_image_folder(out, resolution=8, use_labels=True)  # the in-memory reader agrees
    assert torch.equal(mem.labels, ds.labels)

    Image.fromarray(_noise(np.random.default_rng(0), 8, 8)).save(src / "loose.png")  # no class folder
    assert main(argv + ["--overwrite"]) == 2
    assert torch.equal(ImageZipDataset(out, use_labels=True).labels, ds.labels)  # old output untouched


def test_presets_64(tmp_path):
    rng = np.random.default_rng(3)
    faces = tmp_path / "ffhq"
    faces.mkdir()
    for i in range(3):
        Image.fromarray(_noise(rng, 80, 80)).save(faces / f"{i:05d}.png")
    Image.fromarray(_noise(rng, 60, 90)).save(faces / "99999.png")  # non-square: centre crop
    for preset in ("ffhq", "afhqv2"):
        out = tmp_path / f"{preset}.zip"
        assert main([preset, "--source", str(faces), "--out", str(out), "--no-progress"]) == 0
        ds = ImageZipDataset(out, resolution=64)
        assert len(ds) == 4 and ds.labels is None
        assert np.array_equal(_pixels(ds, 3), ref_center_crop(faces / "99999.png", 64))
        # on square sources centre-crop is EDM's plain LANCZOS resize
        plain = np.asarray(Image.open(faces / "00000.png").convert("RGB").resize((64, 64), Image.Resampling.LANCZOS))
        assert np.array_equal(_pixels(ds, 0), plain)
    inet = tmp_path / "train"
    for wnid in ("n02", "n01"):
        (inet / wnid).mkdir(parents=True)
        for j in range(2):
            Image.fromarray(_noise(rng, 150 + 10 * j, 200)).save(inet / wnid / f"{wnid}_{j}.JPEG")
    out = tmp_path / "imagenet.zip"
    assert main(["imagenet", "--source", str(inet), "--out", str(out), "--max-images", "3", "--no-progress"]) == 0
    ds = ImageZipDataset(out, resolution=64, use_labels=True)
    assert len(ds) == 3 and ds.labels.tolist() == [0, 0, 1] and ds.class_names == ["n01", "n02"]
    assert np.array_equal(_pixels(ds, 2), ref_dhariwal(inet / "n02" / "n02_0.JPEG", 64))


def test_unreadable_files_reported_and_counted(tmp_path, capsys):
    src = tmp_path / "src"
    rels = make_mixed_folder(src)
    good = io.BytesIO()
    Image.fromarray(_noise(np.random.default_rng(0), 32, 32)).save(good, format="PNG")
    (src / "bad.jpg").write_bytes(b"this is not a JPEG")
    (src / "empty.png").write_bytes(b"")
    (src / "sub" / "trunc.png").write_bytes(good.getvalue()[:200])
    out = tmp_path / "out.zip"
    argv = ["folder", "--source", str(src), "--out", str(out), "--resolution", "8", "--no-progress"]
    assert main(argv) == 2  # never skipped silently: non-zero exit without --skip-unreadable
    err = capsys.readouterr().err
    assert "skipped 3 unreadable files: bad.jpg, empty.png, sub/trunc.png" in err
    assert "--skip-unreadable" in err and "unreadable: sub/trunc.png (" in err
    assert len(ImageZipDataset(out)) == len(rels)  # written without them
    assert main(argv + ["--overwrite", "--skip-unreadable"]) == 0
    assert "skipped 3 unreadable files: bad.jpg, empty.png, sub/trunc.png" in capsys.readouterr().out
    res = convert_folder(src, tmp_path / "api.zip", 8, progress=False)
    assert [name for name, _ in res.skipped] == ["bad.jpg", "empty.png", "sub/trunc.png"]
    assert all(reason for _, reason in res.skipped) and res.num_images == len(rels) and res.num_candidates == len(rels) + 3

    # --max-images counts written images: the unreadable ones in front do not use up the budget
    out2 = tmp_path / "max.zip"
    assert main(argv[:4] + [str(out2), "--resolution", "8", "--no-progress", "--max-images", "2", "--skip-unreadable"]) == 0
    ds = ImageZipDataset(out2)
    assert len(ds) == 2 and np.array_equal(_pixels(ds, 1), ref_center_crop(src / "b_tall_gray.png", 8))

    nothing = tmp_path / "nothing"
    nothing.mkdir()
    (nothing / "x.png").write_bytes(b"junk")
    assert main(["folder", "--source", str(nothing), "--out", str(tmp_path / "n.zip"), "--resolution", "8",
                 "--no-progress"]) == 2
    assert "none of the 1 image files" in capsys.readouterr().err and not (tmp_path / "n.zip").exists()


@pytest.mark.parametrize("suffix", [".zip", ""])
def test_interrupted_write_leaves_no_output(tmp_path, monkeypatch, suffix):
    from sims.data import convert

    src = tmp_path / "src"
    make_mixed_folder(src)
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / f"data{suffix}"
    real, calls = convert.encode_png, []

    def flaky(arr):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(arr)

    monkeypatch.setattr(convert, "encode_png", flaky)
    argv = ["folder", "--source", str(src), "--out", str(out), "--resolution", "8", "--no-progress"]
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    assert list(outdir.iterdir()) == []  # neither the output nor a temporary file
    monkeypatch.setattr(convert, "encode_png", real)
    assert main(argv) == 0
    before = load_image_folder(out).data.clone()
    calls.clear()
    monkeypatch.setattr(convert, "encode_png", flaky)
    with pytest.raises(KeyboardInterrupt):
        main(argv + ["--overwrite"])
    assert [p.name for p in outdir.iterdir()] == [out.name]  # the old output is intact
    assert torch.equal(load_image_folder(out).data, before)


def test_output_exists_and_digits_cifar10_still_work(tmp_path, capsys, digits_zip):
    src = tmp_path / "src"
    make_mixed_folder(src)
    out = tmp_path / "o.zip"
    out.write_bytes(b"precious")
    assert main(["folder", "--source", str(src), "--out", str(out), "--resolution", "8", "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"precious"
    assert main(["folder", "--source", str(tmp_path / "missing"), "--out", str(tmp_path / "m.zip"), "--resolution", "8"]) == 2
    assert "source folder not found" in capsys.readouterr().err

    ds = load_image_folder(digits_zip, resolution=8, use_labels=True)
    assert ds.data.shape == (1797, 1, 8, 8) and ds.label_dim == 10
    import pickle as _pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for b, fname in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = np.full((2, 3072), 10 * b, np.uint8)
        with open(folder / fname, "wb") as f:
            _pickle.dump({b"data": data, b"labels": [b % 10, (b + 1) % 10]}, f, protocol=2)
    cout = tmp_path / "cifar.zip"
    assert main(["cifar10", "--source", str(folder), "--out", str(cout)]) == 0
    cds = ImageZipDataset(cout, resolution=32, use_labels=True)
    assert len(cds) == 10 and cds.channels == 3 and cds.labels.tolist()[:4] == [0, 1, 1, 2]
    assert int(_pixels(cds, 4)[0, 0, 0]) == 20


# ------------------------------------------------------------------------------------ streaming reader
def _loader_cat(ds, num_workers):
    xs, ys = [], []
    for x, y in DataLoader(ds, batch_size=500, shuffle=False, num_workers=num_workers):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("xflip", [False, True])
def test_streaming_matches_in_memory_on_digits(digits_zip, xflip):
    mem = load_image_folder(digits_zip, use_labels=True, xflip=xflip)
    stream = ImageZipDataset(digits_zip, use_labels=True, xflip=xflip)
    for attr in ("label_dim", "item_shape", "is_image", "channels", "resolution", "dim", "num_classes", "xflip", "name"):
        assert getattr(stream, attr) == getattr(mem, attr), attr
    assert len(stream) == len(mem) == 1797 * (2 if xflip else 1) and torch.equal(stream.labels, mem.labels)
    ref_x, ref_y = _loader_cat(mem, 0)
    for workers in (0, 2):
        x, y = _loader_cat(stream, workers)
        assert x.dtype == torch.float32 and torch.equal(x, ref_x) and torch.equal(y, ref_y), workers
    idx = [0, 5, len(stream) - 1, 17]
    bx, by = stream.get_batch(idx)
    assert bx.shape == (4, 1, 8, 8) and by.shape == (4, 10)
    assert torch.equal(bx, ref_x[idx]) and torch.equal(by, ref_y[idx])
    sub = stream.subset(slice(10, 20))
    assert len(sub) == 10 * (2 if xflip else 1) and torch.equal(sub[0][0], mem[10][0]) and sub.label_dim == 10


def test_streaming_pickles_cheaply_and_unconditional(digits_zip):
    ds = ImageZipDataset(digits_zip)
    x0, y0 = ds[3]  # opens this process's descriptor
    assert ds._fd is not None and y0.shape == (0,) and ds.label_dim == 0 and ds.labels is not None
    blob = pickle.dumps(ds)
    assert len(blob) < 200_000  # an index, not the pixels or a zip handle
    clone = pickle.loads(blob)
    assert clone._fd is None and torch.equal(clone[3][0], x0)
    x, y = ds.get_batch(torch.tensor([1, 2]))
    assert x.shape == (2, 1, 8, 8) and y.shape == (2, 0)
    assert torch.equal(ds.get_batch([])[0], torch.empty(0, 1, 8, 8))
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_streaming_reader_folder_deflated_and_errors(tmp_path, digits_zip):
    mem = load_image_folder(digits_zip, use_labels=True)
    folder = tmp_path / "digits_folder"
    with zipfile.ZipFile(digits_zip) as zf:
        zf.extractall(folder)
        deflated = tmp_path / "deflated.zip"
        with zipfile.ZipFile(deflated, "w", compression=zipfile.ZIP_DEFLATED) as out:
            for info in zf.infolist():
                out.writestr(info.filename, zf.read(info))
    for path in (folder, deflated):
        ds = ImageZipDataset(path, resolution=8, use_labels=True)
        assert torch.equal(ds.get_batch(range(0, 1797, 7))[0], mem.data[0:1797:7]) and torch.equal(ds.labels, mem.labels)

    with pytest.raises(DatasetError, match=r"expected 16x16, got 8x8 in .*img00000000.png"):
        ImageZipDataset(digits_zip, resolution=16)
    rgb = tmp_path / "rgb.zip"
    write_image_folder(rgb, np.zeros((3, 8, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match="has no labels"):
        ImageZipDataset(rgb, use_labels=True)
    with pytest.raises(DatasetError, match="data set not found"):
        ImageZipDataset(tmp_path / "missing.zip")

    # a wrong-size image in the middle is caught when that item is read, naming the file
    mixed = tmp_path / "mixed"
    write_image_folder(mixed, np.zeros((3, 8, 8, 3), np.uint8))
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(mixed / image_name(1))
    ds = ImageZipDataset(mixed)
    assert ds[0][0].shape == (3, 8, 8)
    with pytest.raises(DatasetError, match=r"expected 8x8 like .*img00000000.png, got 4x4 in .*img00000001.png"):
        ds[1]
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(mixed / image_name(2))
    with pytest.raises(DatasetError, match="inconsistent channels"):
        ds[2]

    # corrupted bytes inside a stored zip: CRC-32 mismatch, named
    bad = tmp_path / "bad.zip"
    raw = bytearray(rgb.read_bytes())
    with zipfile.ZipFile(rgb) as zf:
        info = zf.getinfo(image_name(1))
    raw[info.header_offset + 30 + len(info.filename) + 40] ^= 0xFF
    bad.write_bytes(bytes(raw))
    ds = ImageZipDataset(bad)
    ds[0]
    with pytest.raises(DatasetError, match=r"corrupt zip entry .*img00000001.png: CRC-32 mismatch"):
        ds[1]


def test_open_image_dataset_threshold(digits_zip):
    small = open_image_dataset(digits_zip, resolution=8, use_labels=True, xflip=True)
    assert type(small).__name__ == "ArrayDataset" and len(small) == 2 * 1797
    big = open_image_dataset(digits_zip, resolution=8, use_labels=True, xflip=True, in_memory_max_bytes=1797 * 64 * 4 - 1)
    assert isinstance(big, ImageZipDataset) and len(big) == 2 * 1797
    assert torch.equal(big[1800][0], small[1800][0]) and torch.equal(big[1800][1], small[1800][1])
    assert type(open_image_dataset(digits_zip, in_memory_max_bytes=1797 * 64 * 4)).__name__ == "ArrayDataset"


# ------------------------------------------------------------------------------------ streaming walk and zip writer
def test_walk_sorted_is_global_sort_order(tmp_path):
    from sims.data.convert import list_images, walk_sorted

    names = ["a.png", "a-b.png", "a0.png", "a/x.png", "a/y/z.png", "ab/c.png", "B.png", "a b/q.png", "é.png",
             "a/notes.txt", "z/.hidden.png"]
    for n in names:
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / n).write_bytes(b"")
    images = [n for n in names if n.endswith(".png") and "/." not in n]
    assert list(walk_sorted(tmp_path)) == sorted(images)
    assert list_images(tmp_path) == (sorted(images), ["a/notes.txt"])


def test_zip64_records_and_byte_determinism(tmp_path, monkeypatch):
    import shutil
    import subprocess

    from sims.data import zip_writer

    src = tmp_path / "src"
    tree = make_class_tree(src)
    a, b = tmp_path / "a.zip", tmp_path / "b.zip"
    convert_folder(src, a, 8, labels="folders", progress=False)
    convert_folder(src, b, 8, labels="folders", progress=False)
    assert a.read_bytes() == b.read_bytes()  # fixed timestamps: same input, same bytes
    monkeypatch.setattr(zip_writer, "_ZIP64_COUNT_LIMIT", 2)  # force the zip64 end records ...
    monkeypatch.setattr(zip_writer, "_ZIP64_OFFSET_LIMIT", 300)  # ... and zip64 offsets in the directory
    z64 = tmp_path / "z64.zip"
    convert_folder(src, z64, 8, labels="folders", progress=False)
    assert z64.read_bytes() != a.read_bytes()
    with zipfile.ZipFile(z64) as zf:
        assert zf.testzip() is None and zf.getinfo(image_name(4)).header_offset > 300
    ds, ref = ImageZipDataset(z64, use_labels=True), ImageZipDataset(a, use_labels=True)
    assert torch.equal(ds.get_batch(range(len(tree)))[0], ref.get_batch(range(len(tree)))[0])
    assert torch.equal(ds.labels, ref.labels)
    if shutil.which("unzip"):
        for path in (a, z64):
            proc = subprocess.run(["unzip", "-tq", str(path)], check=False, capture_output=True, text=True)
            assert proc.returncode == 0, proc.stdout + proc.stderr
