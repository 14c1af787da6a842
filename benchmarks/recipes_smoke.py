"""CPU smoke run of every SIMS recipe (configs/sims/*.yaml) at toy size, end to end through the commands a
user runs on a GPU cluster: an EDM-format network pickle -> ``sims-import edm`` -> ``sims-train
configs/sims/X.yaml sims.base=...`` (synthetic set -> auxiliary fine-tune -> omega sweep on the selection
sets -> report sets).

Per recipe:
1. toy data: scikit-learn's digits (1,797) as 3-channel 8x8 images, tinted per class, written as an EDM zip with the class labels
   (``sims-dataset``'s format; the ImageNet recipe is class-conditional on them);
2. toy base: the EDM base recipe (configs/X.yaml) itself, trained briefly at toy width with ``sims-train``
   (so those recipes run end to end too), its EMA written as an EDM network pickle by the test writer
   (tests/edm_writer.py: EDM's pickle layout, no NVIDIA code), then ``sims-import edm`` (the import is
   checked to give back the trained weights exactly);
3. the SIMS recipe with ``sims.base`` = the import, overriding only sizes: kimg (base, auxiliary,
   snapshots, EMA half-lives scaled to the toy fine-tune), resolution, sample counts, network width,
   sampler steps (8; ImageNet keeps its churn settings), batch, device (1 CPU process). The omega grid,
   the auxiliary learning rates and ramp-ups, the snapshot/EMA structure of the sweep, precision and the
   seed sets are the recipes'. Features: identity (no Inception on a CPU machine); reference: computed.

    python benchmarks/recipes_smoke.py                 # all four (about 20 minutes each on 2 busy cores)
    python benchmarks/recipes_smoke.py --only cifar10 --update   # re-run one, keep the other rows of --out

Writes benchmarks/results/recipes_smoke.json (``--out``) and prints a markdown table. Runs use one
intra-op thread (``OMP_NUM_THREADS=1``): on 2 shared cores it was measured much faster than 2. The
figures are timings and a working pipeline, not quality: the toy bases are a few hundred steps old and
the recipes' auxiliary learning rates are tuned for 6-48 Mimg fine-tunes, not 1.6 kimg.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SONG = dict(embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
            resample_filter=[1, 1])
# Toy sizes per recipe: resolution and network width (the rest of the network is the recipe's).
TOY = {
    "cifar10": dict(res=8, backbone="SongUNet",
                    network=dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])),
    "ffhq64": dict(res=8, backbone="SongUNet",
                   network=dict(model_channels=16, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4])),
    "afhqv2-64": dict(res=8, backbone="SongUNet",
                      network=dict(model_channels=16, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4])),
    # ADM's heads are channels / 64: the attention level needs >= 64 channels
    "imagenet64": dict(res=8, backbone="DhariwalUNet",
                       network=dict(model_channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])),
}
BATCH = 32
BASE_STEPS = 200
AUX_KIMG = 1.6            # 50 steps of 32
NUM_SYNTHETIC = 256
EVAL_SAMPLES = 128
SAMPLER_STEPS = 8


def dotlist(prefix: str, d: dict) -> list:
    return [f"{prefix}.{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in d.items()]


def run(cmd: list, log: Path) -> float:
    """Run a console entry point in a subprocess (one thread); return its wall time; raise on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "WANDB_MODE": "disabled"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({proc.returncode}); see {log}:\n{proc.stderr[-2000:]}")
    return time.time() - t0


def toy_data(path: Path, res: int) -> Path:
    """Digits as tinted 3-channel uint8 images [N, 3, res, res] with their labels, as an EDM zip."""
    import torch

    from sims.data import load_digits_arrays, to_uint8, write_image_folder

    x, y = load_digits_arrays(res)
    rng = np.random.default_rng(0)
    tint = torch.from_numpy(rng.uniform(0.4, 1.0, size=(10, 3, 1, 1)).astype(np.float32))
    rgb = ((x + 1) * tint[y] - 1).clamp(-1, 1)  # a per-class colour, background stays black
    return write_image_folder(path, to_uint8(rgb), y.numpy(), layout="NCHW", overwrite=True)


def edm_pickle(weights: Path, out: Path, name: str, augment: float) -> dict:
    """The exported project EMA as an EDM network pickle (tests/edm_writer.py); returns the backbone kwargs."""
    from edm_writer import pickle_from_precond

    from sims.training.export import load_denoiser

    net, meta = load_denoiser(weights)
    n = meta["network"]
    c, r, _ = meta["data_shape"]
    toy = TOY[name]
    kwargs = dict(img_resolution=r, in_channels=c, out_channels=c, label_dim=int(meta["label_dim"]),
                  model_channels=n["model_channels"], channel_mult=list(n["channel_mult"]),
                  channel_mult_emb=n["channel_mult_emb"], num_blocks=n["num_blocks"],
                  attn_resolutions=list(n["attn_resolutions"]), dropout=n["dropout"], augment_dim=n["augment_dim"],
                  **(SONG if toy["backbone"] == "SongUNet" else {}))
    pickle_from_precond(out, net, toy["backbone"], kwargs, with_augment_pipe=augment > 0,
                        dataset_kwargs={"class_name": "training.dataset.ImageFolderDataset", "path": "toy.zip",
                                        "use_labels": bool(meta["label_dim"]), "xflip": False, "cache": True,
                                        "resolution": r, "max_size": 1797})
    return kwargs


def smoke(name: str, work: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    from sims.config import load_config

    toy = TOY[name]
    res = toy["res"]
    work.mkdir(parents=True, exist_ok=True)
    data = toy_data(work / f"data{res}.zip", res)
    recipe = load_config(ROOT / "configs" / "sims" / f"{name}.yaml", ["run_dir=x"])
    common = [f"data.path={data}", f"data.resolution={res}", "data.num_workers=0", *dotlist("network", toy["network"]),
              f"train.batch_size={BATCH}", f"train.batch_gpu={BATCH}", "train.devices=1", "train.num_nodes=1",
              "train.accelerator=cpu", "train.progress_bar=false", "train.grid_seeds=16",
              f"sampler.num_steps={SAMPLER_STEPS}", "sampler.batch_size=256"]
    row = {"recipe": f"configs/sims/{name}.yaml", "resolution": res, "network": toy["network"],
           "precision": recipe.train.precision, "label_dim_expected": 10 if recipe.data.use_labels else 0}

    # 1. the toy base: EDM's base recipe at toy size (a few hundred steps; lr raised so it learns something)
    base_run = work / "base-run"
    row["base_wall_s"] = run(["sims.cli.train", f"configs/{name}.yaml", f"run_dir={base_run}", *common,
                              f"train.total_kimg={BASE_STEPS * BATCH / 1000}", "train.lr=2e-3",
                              "train.lr_rampup_kimg=0.64", "train.ema_halflife_kimg=0.5", "train.ckpt_every_kimg=3.2",
                              "sims.enabled=false"], work / "base.log")
    done = dict(line.split("=", 1) for line in (base_run / "base" / "DONE").read_text().split())
    row["base_steps"], row["base_steps_per_s"] = int(done["steps"]), float(done["steps_per_second"])

    # 2. EDM pickle -> sims-import
    pkl = work / f"edm-{name}-toy.pkl"
    edm_pickle(base_run / "base" / "ema.safetensors", pkl, name, float(recipe.train.augment))
    imported = work / f"edm-{name}"
    row["import_wall_s"] = run(["sims.cli.import_edm", "edm", str(pkl), "--out", str(imported)], work / "import.log")
    a, b = load_file(str(base_run / "base" / "ema.safetensors")), load_file(str(imported / "base" / "ema.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "import changed the weights"
    info = json.loads((imported / "IMPORT.json").read_text())
    row.update(pickle_mb=round(pkl.stat().st_size / 2 ** 20, 2), parameters=info["parameters"],
               import_round_trip_exact=True)

    # 3. the SIMS recipe on the import, sizes overridden
    s = recipe.sims
    scale = AUX_KIMG / float(s.aux_kimg)  # the recipe's fine-tune structure, shrunk to the toy's length
    aux_halflife = float(s.aux_ema_halflife_kimg if s.aux_ema_halflife_kimg is not None else recipe.train.ema_halflife_kimg)
    sims_over = [f"sims.base={imported}", f"sims.num_synthetic={NUM_SYNTHETIC}", f"sims.aux_kimg={AUX_KIMG}",
                 f"sims.aux_snapshot_every_kimg={float(s.aux_snapshot_every_kimg) * scale:.4g}",
                 f"sims.aux_ema_halflife_kimg={aux_halflife * scale:.4g}",
                 f"sims.aux_ema_halflives_kimg=[{','.join(f'{h * scale:.4g}' for h in s.aux_ema_halflives_kimg)}]",
                 f"sims.aux_lr_rampup_kimg={float(s.aux_lr_rampup_kimg) * scale:.4g}",
                 f"sims.selection_num_samples={EVAL_SAMPLES}", f"sims.report_num_samples={EVAL_SAMPLES}",
                 "sims.features=identity", "train.ckpt_every_kimg=0.64"]
    sims_run = work / "sims-run"
    row["sims_wall_s"] = run(["sims.cli.train", f"configs/sims/{name}.yaml", f"run_dir={sims_run}", *common,
                              *sims_over], work / "sims.log")
    done = dict(line.split("=", 1) for line in (sims_run / "aux" / "DONE").read_text().split())
    report = json.loads((sims_run / "eval" / "report.json").read_text())
    snaps = sorted(p.name for p in (sims_run / "aux" / "snapshots").iterdir()) if (sims_run / "aux" / "snapshots").is_dir() else []
    row.update(
        aux_steps=int(done["steps"]), aux_steps_per_s=float(done["steps_per_second"]), aux_lr=float(s.aux_lr),
        aux_snapshots=snaps, sweep_cells=len(report["selection"]), omegas=[float(w) for w in s.omegas],
        best_omega=report["best_omega"], chosen=report["chosen"], edge_of_grid=report.get("edge_of_grid"),
        base_fd_per_set=report["base"]["fd_per_set"], sims_fd_per_set=report["sims"]["fd_per_set"],
        base_fd_mean=report["base_fd_mean"], sims_fd_mean=report["best_fd_mean"],
        relative_change=report["relative_change"], nfe_base=report["base"]["nfe"], nfe_sims=report["sims"]["nfe"],
        report_seed_offsets=report["report_seed_offsets"], num_samples=EVAL_SAMPLES, features="identity",
        synthetic_count=json.loads((sims_run / "synthetic" / "manifest.json").read_text())["count"],
        overrides=common + sims_over)
    return row


def write_result(out: Path, rows: list) -> None:
    """Write the rows measured so far (and the machine) to ``out`` as JSON, atomically: the file is rewritten
    after every recipe, and an interruption must not leave it half-written."""
    from sims.utils import atomic_write_json

    atomic_write_json(out, {"benchmark": "recipes_smoke", "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
                            "threads": 1, "rows": rows})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", choices=list(TOY), default=list(TOY))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "recipes_smoke.json"))
    p.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--update", action="store_true", help="keep the rows of --out for the recipes not run now")
    args = p.parse_args(argv)
    rows = []
    if args.update and Path(args.out).is_file():
        rows = [r for r in json.loads(Path(args.out).read_text())["rows"]
                if r["recipe"] not in {f"configs/sims/{n}.yaml" for n in args.only}]
    with tempfile.TemporaryDirectory(prefix="recipes_smoke_") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        for name in args.only:
            t0 = time.time()
            print(f"[recipes_smoke] {name} ...", flush=True)
            row = smoke(name, work / name)
            row["total_wall_s"] = time.time() - t0
            row["load_average_1min_at_end"] = os.getloadavg()[0]
            rows.append(row)
            rows.sort(key=lambda r: list(TOY).index(Path(r["recipe"]).stem))
            print(f"[recipes_smoke] {name}: {row['total_wall_s']:.0f} s, best omega {row['best_omega']}, "
                  f"FD {row['base_fd_mean']:.4g} -> {row['sims_fd_mean']:.4g}", flush=True)
            write_result(Path(args.out), rows)  # after every recipe: an interrupted run keeps what it measured
    print("\n| recipe | res | params | base steps/s | import s | aux steps/s | cells | best ω | FD base → SIMS (mean of 3) | NFE | SIMS run s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['resolution']} | {r['parameters']:,} | {r['base_steps_per_s']:.2f} | "
              f"{r['import_wall_s']:.0f} | {r['aux_steps_per_s']:.2f} | {r['sweep_cells']} | {r['best_omega']:g} | "
              f"{r['base_fd_mean']:.4g} → {r['sims_fd_mean']:.4g} ({100 * r['relative_change']:+.1f}%) | "
              f"{r['nfe_base']:.0f}/{r['nfe_sims']:.0f} | {r['sims_wall_s']:.0f} |")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
