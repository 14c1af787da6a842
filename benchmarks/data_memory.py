"""Memory of the streaming data path: DataLoader workers reading an EDM zip, and ``sims-dataset folder``.

1. Streaming reader (sims.data.zip_dataset.ImageZipDataset): a generated zip of ``--num-images``
   32x32 RGB noise PNGs is read for one full epoch through a DataLoader with ``--workers`` worker
   processes (fork); each worker's memory is read from /proc/<pid>/status (VmRSS, VmHWM = peak
   RSS) and /proc/<pid>/smaps_rollup (USS = Private_Clean + Private_Dirty, PSS) every few batches.
   RSS of a forked worker also counts the pages it shares copy-on-write with the parent (the
   imported torch); USS is what the worker adds. Target: < 200 MB per worker.
2. ``sims-dataset folder`` on a generated folder of ``--convert-images`` 40x32 RGB noise JPEGs
   (1,000 per sub-folder) to a 32x32 zip, run as a subprocess twice: with ``--max-images
   --reference-images`` (default 10,000) and on all images. Peak RSS comes from the kernel
   (``os.wait4`` ru_maxrss, exact), the timeline from /proc sampling. Flat memory: the full run's peak
   is within ~10 MB of the reference run's (the only O(N) state: the zip directory, ~45 bytes per
   entry, and 8 bytes per label).

    python benchmarks/data_memory.py                      # the issue's 100,000 images (several minutes)
    python benchmarks/data_memory.py --num-images 5000 --convert-images 5000 --reference-images 1000

Writes benchmarks/results/data_memory.json (``--out``) and prints a markdown table. Generated data
lives in ``--workdir`` (default: a temporary folder, removed at the end unless ``--keep``; an existing
workdir's generated files are reused).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MB = 1024 * 1024


def proc_mem(pid: int) -> dict:
    """Memory of a process in bytes: rss, hwm (peak RSS), uss, pss; {} if it is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[{"VmRSS": "rss", "VmHWM": "hwm"}[key]] = int(val.split()[0]) * 1024
        with open(f"/proc/{pid}/smaps_rollup") as f:
            priv = 0
            for line in f:
                key, _, val = line.partition(":")
                if key in ("Private_Clean", "Private_Dirty"):
                    priv += int(val.split()[0]) * 1024
                elif key == "Pss":
                    out["pss"] = int(val.split()[0]) * 1024
            out["uss"] = priv
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    return out


def make_zip(path: Path, n: int, side: int = 32) -> float:
    """A stored zip of n side x side RGB noise PNGs in EDM's layout (streamed); returns seconds."""
    from sims.data.image_folder import image_name
    from sims.data.image_transforms import encode_png
    from sims.data.zip_writer import write_dataset

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)

    def emit(put) -> None:
        for i in range(n):
            put(image_name(i), encode_png(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)))
        put("dataset.json", json.dumps({"labels": None}).encode())

    write_dataset(path, emit)
    return time.perf_counter() - t0


def make_folder(path: Path, n: int, w: int = 40, h: int = 32) -> float:
    """n w x h RGB noise JPEGs in sub-folders of 1,000; returns seconds."""
    from PIL import Image

    t0 = time.perf_counter()
    rng = np.random.default_rng(1)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for i in range(n):
        d = tmp / f"{i // 1000:04d}"
        if i % 1000 == 0:
            d.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i:07d}.jpg", quality=90)
    os.replace(tmp, path)
    return time.perf_counter() - t0


def bench_reader(zip_path: Path, workers: int, batch_size: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from sims.data.zip_dataset import ImageZipDataset

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ds = ImageZipDataset(zip_path)
    open_s = time.perf_counter() - t0
    import pickle

    pickled = len(pickle.dumps(ds))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    pids = [w.pid for w in getattr(it, "_workers", [])]
    per = {pid: {"first": None, "peak_rss": 0, "peak_hwm": 0, "peak_uss": 0, "peak_pss": 0} for pid in pids}
    main0 = proc_mem(os.getpid())

    def sample():
        for pid in pids:
            m = proc_mem(pid)
            if not m:
                continue
            p = per[pid]
            if p["first"] is None:
                p["first"] = m
            p["peak_rss"] = max(p["peak_rss"], m.get("rss", 0))
            p["peak_hwm"] = max(p["peak_hwm"], m.get("hwm", 0))
            p["peak_uss"] = max(p["peak_uss"], m.get("uss", 0))
            p["peak_pss"] = max(p["peak_pss"], m.get("pss", 0))

    n_items, checksum = 0, 0.0
    t0 = time.perf_counter()
    total = len(loader)
    for b, (x, _) in enumerate(it):
        n_items += x.shape[0]
        checksum += float(x[:, 0, 0, 0].sum())
        if b % 8 == 0 or b >= total - 2:  # the last samples come before the workers shut down
            sample()
    epoch_s = time.perf_counter() - t0
    main1 = proc_mem(os.getpid())
    rows = []
    for i, pid in enumerate(pids):
        p = per[pid]
        first = p["first"] or {}
        rows.append({"worker": i, "pid": pid, "rss_first_mb": first.get("rss", 0) / MB,
                     "peak_rss_mb": max(p["peak_rss"], p["peak_hwm"]) / MB, "peak_uss_mb": p["peak_uss"] / MB,
                     "peak_pss_mb": p["peak_pss"] / MB,
                     "rss_growth_mb": (p["peak_rss"] - first.get("rss", 0)) / MB})
    return {"images": len(ds), "workers": workers, "batch_size": batch_size, "items_read": n_items,
            "open_s": open_s, "epoch_s": epoch_s, "img_per_s": n_items / epoch_s, "pickle_bytes": pickled,
            "zip_mb": zip_path.stat().st_size / MB, "main_rss_mb": main1.get("rss", 0) / MB,
            "main_rss_growth_mb": (main1.get("rss", 0) - main0.get("rss", 0)) / MB,
            "in_memory_float32_mb": len(ds) * ds.dim * 4 / MB, "per_worker": rows}


def run_convert(src: Path, out: Path, max_images) -> dict:
    """One ``sims-dataset folder`` subprocess; exact peak RSS via wait4, RSS timeline sampled."""
    cmd = [sys.executable, "-m", "sims.cli.dataset", "folder", "--source", str(src), "--out", str(out),
           "--resolution", "32", "--overwrite", "--no-progress"]
    if max_images is not None:
        cmd += ["--max-images", str(max_images)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    timeline = []
    stop = threading.Event()

    def sampler():
        while not stop.is_set():
            m = proc_mem(proc.pid)
            if m:
                timeline.append((round(time.perf_counter() - t0, 2), round(m.get("rss", 0) / MB, 1)))
            stop.wait(0.25)

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    stdout, stderr = proc.stdout.read(), proc.stderr.read()  # small outputs: no deadlock
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    th.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stdout.decode()}\n{stderr.decode()}")
    with zipfile.ZipFile(out) as zf:
        n = sum(1 for name in zf.namelist() if name.endswith(".png"))
    step = max(1, len(timeline) // 200)
    return {"images": n, "wall_s": wall, "img_per_s": n / wall, "peak_rss_mb": usage.ru_maxrss * 1024 / MB,
            "rss_samples": timeline[::step], "stdout": stdout.decode().strip().splitlines()[-1:]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=100_000, help="images in the zip the DataLoader reads")
    p.add_argument("--convert-images", type=int, default=None, help="images in the folder to convert (default: --num-images)")
    p.add_argument("--reference-images", type=int, default=10_000, help="the smaller conversion compared against")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workdir", default=None, help="where the generated data goes (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the generated data")
    p.add_argument("--skip-reader", action="store_true")
    p.add_argument("--skip-convert", action="store_true")
    p.add_argument("--target-mb", type=float, default=200.0, help="per-worker memory target")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/data_memory.json"))
    args = p.parse_args()
    n_conv = args.convert_images or args.num_images
    n_ref = min(args.reference_images, n_conv)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sims_data_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
              "target_mb_per_worker": args.target_mb}
    try:
        if not args.skip_reader:
            zpath = work / f"noise32-{args.num_images}.zip"
            if not zpath.exists():
                print(f"generating {zpath} ...", flush=True)
                result["zip_generate_s"] = make_zip(zpath, args.num_images)
            result["reader"] = bench_reader(zpath, args.workers, args.batch_size)
        if not args.skip_convert:
            src = work / f"jpeg40x32-{n_conv}"
            if not src.exists():
                print(f"generating {src} ...", flush=True)
                result["folder_generate_s"] = make_folder(src, n_conv)
            print(f"converting {n_ref} then {n_conv} images ...", flush=True)
            ref = run_convert(src, work / "converted-ref.zip", n_ref)
            full = run_convert(src, work / "converted-full.zip", None)
            result["convert"] = {"reference": ref, "full": full,
                                 "peak_growth_mb": full["peak_rss_mb"] - ref["peak_rss_mb"]}
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    print("\n| measurement | images | value |")
    print("|---|---|---|")
    if "reader" in result:
        r = result["reader"]
        for w in r["per_worker"]:
            ok = "OK" if w["peak_uss_mb"] < args.target_mb and w["peak_rss_mb"] < args.target_mb else (
                "OK (USS)" if w["peak_uss_mb"] < args.target_mb else "OVER")
            print(f"| reader worker {w['worker']}: peak RSS / USS / PSS (MB), target < {args.target_mb:.0f} | {r['images']} | "
                  f"{w['peak_rss_mb']:.0f} / {w['peak_uss_mb']:.0f} / {w['peak_pss_mb']:.0f} ({ok}; RSS growth over "
                  f"the epoch {w['rss_growth_mb']:+.0f}) |")
        print(f"| reader: epoch throughput, {r['workers']} workers | {r['items_read']} | {r['img_per_s']:.0f} img/s |")
        print(f"| reader: open (index build) / pickled size | {r['images']} | {r['open_s']:.2f} s / "
              f"{r['pickle_bytes'] / MB:.1f} MB |")
        print(f"| reader: main process RSS (growth) | {r['images']} | {r['main_rss_mb']:.0f} MB "
              f"({r['main_rss_growth_mb']:+.0f}); in memory the float32 tensor alone would be "
              f"{r['in_memory_float32_mb']:.0f} MB |")
    if "convert" in result:
        c = result["convert"]
        for key in ("reference", "full"):
            x = c[key]
            print(f"| sims-dataset folder: peak RSS | {x['images']} | {x['peak_rss_mb']:.0f} MB "
                  f"({x['img_per_s']:.0f} img/s, {x['wall_s']:.0f} s) |")
        print(f"| sims-dataset folder: peak growth {c['reference']['images']} -> {c['full']['images']} images | | "
              f"{c['peak_growth_mb']:+.1f} MB |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
