"""``sims-dataset``: write a real data set in EDM's format (a folder or zip of PNGs + dataset.json).

  sims-dataset digits   --out data/digits8.zip  [--resolution 8|16]
  sims-dataset cifar10  --source cifar-10-batches-py --out data/cifar10-32x32.zip [--split train]
  sims-dataset folder   --source DIR --out OUT.zip --resolution R [--transform center-crop|center-crop-dhariwal]
                        [--labels none|folders] [--max-images N] [--skip-unreadable]
  sims-dataset ffhq     --source ffhq/images1024x1024 --out data/ffhq-64x64.zip
  sims-dataset afhqv2   --source afhqv2 --out data/afhqv2-64x64.zip
  sims-dataset imagenet --source ILSVRC/Data/CLS-LOC/train --out data/imagenet-64x64.zip

digits/cifar10: pixels are quantised as clip(round(127.5 x + 127.5), 0, 255) (SPEC section 4);
labels are written to dataset.json unless --no-labels.

folder (and the presets ffhq, afhqv2: EDM's LANCZOS resize to 64x64, no labels; imagenet: EDM2's
center-crop-dhariwal to 64x64, labels from the class folders): every PNG/JPEG/... under --source,
in sorted path order, converted to RGB, centre-cropped and resized to R x R (the exact transforms
are in sims.data.convert), streamed into the output one image at a time. --labels folders: the
top-level sub-folder is the class; sorted class names -> 0..K-1, listed in dataset.json as
"class_names". Unreadable files are left out, named and counted ("skipped K unreadable files: ...");
the output is still written, but the exit status is 2 unless --skip-unreadable is given.

Every output appears atomically (temporary file + rename). Use it with data.name=folder data.path=OUT.
"""
from __future__ import annotations

import argparse
import sys

from sims.cli.common import user_errors

FOLDER_KINDS = ("folder", "ffhq", "afhqv2", "imagenet")


def build_parser() -> argparse.ArgumentParser:
    from sims.data.convert import LABEL_MODES, PRESETS, TRANSFORMS

    p = argparse.ArgumentParser(prog="sims-dataset", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="source_kind", required=True, metavar="{" + ",".join(("digits", "cifar10") + FOLDER_KINDS) + "}")

    def common(sp: argparse.ArgumentParser, labels_flag: bool = True) -> None:
        sp.add_argument("--out", required=True, help="output folder, or a .zip file (stored, uncompressed)")
        if labels_flag:
            sp.add_argument("--no-labels", action="store_true", help='write {"labels": null}')
        sp.add_argument("--overwrite", action="store_true", help="replace an existing output")

    d = sub.add_parser("digits", help="scikit-learn's 8x8 digits (1,797 images, 10 classes)")
    d.add_argument("--resolution", type=int, default=8, choices=(8, 16), help="8 (native) or 16 (bilinear upsample)")
    common(d)
    c = sub.add_parser("cifar10", help="CIFAR-10 from the python pickle batches")
    c.add_argument("--source", required=True, help="the cifar-10-batches-py folder (or cifar-10-python.tar.gz)")
    c.add_argument("--split", default="train", choices=("train", "test"))
    common(c)

    def folder_common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--source", required=True, help="folder of images (PNG, JPEG, ...; any depth, any sizes)")
        sp.add_argument("--max-images", type=int, default=None, help="stop after writing N images")
        sp.add_argument("--skip-unreadable", action="store_true",
                        help="accept leaving out unreadable files (they are still listed); exit status 0")
        sp.add_argument("--no-progress", action="store_true", help="no progress bar")
        common(sp, labels_flag=False)

    f = sub.add_parser("folder", help="any folder of images -> R x R RGB, centre-cropped and resized")
    f.add_argument("--resolution", type=int, required=True, help="output side R in pixels")
    f.add_argument("--transform", default="center-crop", choices=TRANSFORMS,
                   help="center-crop: central square + LANCZOS (EDM); center-crop-dhariwal: ADM's ImageNet crop (EDM2)")
    f.add_argument("--labels", default="none", choices=LABEL_MODES, help="folders: class = top-level sub-folder")
    folder_common(f)
    for name, preset in PRESETS.items():
        folder_common(sub.add_parser(name, help=preset.help))
    return p


def _convert_folder(args) -> int:
    from sims.data.convert import PRESETS, convert_folder, skipped_summary
    from sims.errors import DatasetError

    if args.source_kind == "folder":
        resolution, transform, labels = args.resolution, args.transform, args.labels
    else:
        preset = PRESETS[args.source_kind]
        resolution, transform, labels = preset.resolution, preset.transform, preset.labels

    def on_skip(rel: str, reason: str) -> None:
        from tqdm import tqdm

        tqdm.write(f"[sims] unreadable: {rel} ({reason})", file=sys.stderr)

    res = convert_folder(args.source, args.out, resolution, transform=transform, labels=labels,
                         max_images=args.max_images, overwrite=args.overwrite, progress=not args.no_progress,
                         on_skip=on_skip)
    classes = f", {len(res.class_names)} classes" if res.class_names is not None else ", no labels"
    print(f"[sims] wrote {res.num_images} images {res.resolution}x{res.resolution}x{res.channels}{classes} "
          f"({transform}) to {res.out}", flush=True)
    if res.num_ignored:
        shown = ", ".join(res.ignored[:5]) + (", ..." if res.num_ignored > 5 else "")
        print(f"[sims] ignored {res.num_ignored} files without an image extension: {shown}", flush=True)
    if res.skipped:
        summary = skipped_summary(res.skipped)
        if args.skip_unreadable:
            print(f"[sims] {summary}", flush=True)
        else:
            raise DatasetError(f"{summary} ({res.out} was written without them; check them, or pass "
                               f"--skip-unreadable to accept this)")
    return 0


@user_errors("sims-dataset")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.source_kind in FOLDER_KINDS:
        return _convert_folder(args)
    from sims.data import load_digits_arrays, read_cifar10, write_image_folder
    from sims.data.images import to_uint8
    from sims.errors import InputError

    if args.source_kind == "digits":
        images, labels = load_digits_arrays(args.resolution)
        pixels = to_uint8(images)  # [N, 1, R, R]
    else:
        pixels, labels = read_cifar10(args.source, args.split)  # [N, 3, 32, 32]
    try:
        out = write_image_folder(args.out, pixels, None if args.no_labels else labels, layout="NCHW",
                                 overwrite=args.overwrite)
    except FileExistsError as exc:
        msg = str(exc)
        if msg.startswith("output exists"):
            msg = f"output exists: {args.out} (add --overwrite to replace it)"
        raise InputError(msg) from None
    n, c, h, w = pixels.shape
    print(f"[sims] wrote {n} images {w}x{h}x{c} to {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
