"""`mlx-flash place`."""

from __future__ import annotations

import sys

from tqdm import tqdm

from ..format.manifest import read_manifest
from ..offline.placement import METHODS, place


def place_cli(args) -> int:
    manifest = read_manifest(args.dir)
    with tqdm(total=manifest.n_layers, desc=f"place ({args.method})", unit="layer",
              file=sys.stderr, disable=None) as bar:
        report = place(args.dir, args.calibration, args.method, args.keep, args.holdout,
                       progress=lambda what: bar.update())
    print(f"placed {args.dir}: {report.layers} layers ordered by {report.method} (active = top "
          f"{report.keep:.0%} per token, {report.train_tokens} calibration tokens); hot-neuron "
          "lists stored for --pin-hot", file=sys.stderr)
    return 0


def add_arguments(subparsers) -> None:
    p = subparsers.add_parser("place", help="reorder a flash dir's neurons on disk so that "
                                            "co-activated ones sit together (in place)")
    p.add_argument("dir", help="flash model dir (rewritten in place, crash-safe)")
    p.add_argument("--calibration", required=True,
                   help="calibration recording dir (mag_NNN.npy + calibration.json, as "
                        "train-predictors --calibration-dir writes)")
    p.add_argument("--method", choices=METHODS, default="coact",
                   help="coact: co-activation chains (Ripple); hot: most active first; "
                        "identity: undo a placement")
    p.add_argument("--keep", type=float, default=0.3,
                   help="a neuron is active for a token when in its top KEEP fraction")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="fraction of calibration tokens (the last ones) not used")
    p.set_defaults(func=place_cli)
