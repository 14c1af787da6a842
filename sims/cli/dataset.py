"""``sims-dataset``: write a real data set in EDM's format (a folder or zip of PNGs + dataset.json).

  sims-dataset digits  --out data/digits8.zip  [--resolution 8|16]
  sims-dataset cifar10 --source cifar-10-batches-py --out data/cifar10-32x32.zip [--split train]

Pixels are quantised as clip(round(127.5 x + 127.5), 0, 255) (SPEC section 4); labels are written
to dataset.json unless --no-labels. The output is then used with ``data.name=folder data.path=OUT``.
"""
from __future__ import annotations

import argparse
import sys

from sims.cli.common import user_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sims-dataset", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="source_kind", required=True, metavar="{digits,cifar10}")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--out", required=True, help="output folder, or a .zip file (stored, uncompressed)")
        sp.add_argument("--no-labels", action="store_true", help='write {"labels": null}')
        sp.add_argument("--overwrite", action="store_true", help="replace an existing output")

    d = sub.add_parser("digits", help="scikit-learn's 8x8 digits (1,797 images, 10 classes)")
    d.add_argument("--resolution", type=int, default=8, choices=(8, 16), help="8 (native) or 16 (bilinear upsample)")
    common(d)
    c = sub.add_parser("cifar10", help="CIFAR-10 from the python pickle batches")
    c.add_argument("--source", required=True, help="the cifar-10-batches-py folder (or cifar-10-python.tar.gz)")
    c.add_argument("--split", default="train", choices=("train", "test"))
    common(c)
    return p


@user_errors("sims-dataset")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from sims.data import load_digits_arrays, read_cifar10, to_uint8_images, write_image_folder

    if args.source_kind == "digits":
        images, labels = load_digits_arrays(args.resolution)
        pixels = to_uint8_images(images)  # [N, 1, R, R]
    else:
        pixels, labels = read_cifar10(args.source, args.split)  # [N, 3, 32, 32]
    try:
        out = write_image_folder(args.out, pixels, None if args.no_labels else labels, layout="NCHW",
                                 overwrite=args.overwrite)
    except FileExistsError as exc:
        msg = str(exc)
        if msg.startswith("output exists"):
            msg = f"output exists: {args.out} (add --overwrite to replace it)"
        raise ValueError(msg) from None
    n, c, h, w = pixels.shape
    print(f"[sims] wrote {n} images {w}x{h}x{c} to {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
