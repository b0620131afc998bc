"""`mlx-flash train-predictors`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..format.manifest import PREDICTORS
from ..offline.train_predictors import (
    DEFAULT_MASS,
    DEFAULT_RANK,
    RECALL_GRID,
    TrainConfig,
    make_predictors,
    parse_layer_ranks,
)
from ..runtime.selectors.predictor import DEFAULT_RECALL, KINDS


def train_predictors_cli(args) -> int:
    """`mlx-flash train-predictors DIR ...`: prints a per-layer table and the totals."""
    cfg = TrainConfig(rank=args.rank, ranks=parse_layer_ranks(args.layer_rank),
                      target=args.target, recall=args.recall, kind=args.kind,
                      epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, holdout=args.holdout,
                      seed=args.seed)
    summary = make_predictors(args.dir, cfg, args.text, args.tokens, args.seq_len,
                              args.calibration_dir, progress=True)
    print(f"{'layer':>5} {'rank':>5} {'recall':>7} {'mass':>6} {'prec':>6} {'pred':>6} "
          f"{'target':>6}")
    for r in summary.reports:
        print(f"{r.layer:>5} {r.rank:>5} {r.recall:>7.3f} {r.mass_kept:>6.3f} "
              f"{r.precision:>6.3f} {r.predicted:>6.1%} {r.target_size:>6.1%}")
    mean = np.mean([r.predicted for r in summary.reports])
    recall = np.mean([r.recall for r in summary.reports])
    where = "reused recording" if summary.reused_recording else \
        f"calibration {summary.calibration_seconds:.0f} s"
    print(f"target {summary.entry['target']}: held-out recall {recall:.3f}, {mean:.1%} of "
          f"neurons predicted per token; {where}, training {summary.training_seconds:.0f} s; "
          f"wrote {Path(args.dir) / PREDICTORS} ({summary.entry['size'] / 2**20:.1f} MiB)")
    return 0


def add_text_arguments(p) -> None:
    """--text, --tokens, --seq-len: the calibration text (train-predictors, train-drafter)."""
    p.add_argument("--text", default=None,
                   help="calibration text: a file or a folder of text files (default: Python's "
                        "pydoc topics and stdlib sources, nothing downloaded)")
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens in all")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence")


def add_arguments(subparsers) -> None:
    """Register `train-predictors` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "train-predictors", help="calibrate and train the sparsity predictors of a flash dir")
    p.add_argument("dir", help="flash model dir (predictors are written into it)")
    add_text_arguments(p)
    p.add_argument("--rank", type=int, default=DEFAULT_RANK, help="predictor rank r")
    p.add_argument("--layer-rank", action="append", default=[], metavar="LAYER=RANK",
                   help="rank for one layer (repeatable), e.g. --layer-rank 0=256")
    p.add_argument("--target", default="auto",
                   help="active neurons: auto (relu for ReLU-family FFNs, else mass:"
                        f"{DEFAULT_MASS}), relu, mass:F (top-|h| set with F of sum|h|), "
                        "top:F (top F fraction)")
    p.add_argument("--recall", type=float, default=DEFAULT_RECALL,
                   help="default operating point: per-layer thresholds keep this fraction of "
                        "the target mass on held-out tokens (thresholds for "
                        f"{', '.join(map(str, RECALL_GRID))} are stored too; pick one at load "
                        "time with predictor_recall / --recall)")
    p.add_argument("--kind", default="auto", choices=["auto", *KINDS],
                   help="linear: sigmoid(x A B + b) trained with balanced BCE (default for "
                        "ReLU-family FFNs); ffn: low-rank FFN fit to the weights, score "
                        "|act(gate) * up| (default for gated/smooth FFNs)")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs,
                   help="training epochs (kind linear)")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--holdout", type=float, default=TrainConfig.holdout,
                   help="fraction of calibration sequences held out for thresholds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibration-dir", default=None,
                   help="keep the recorded activations here (reused when the model and text "
                        "match); default: a temp dir, removed afterwards")
    p.set_defaults(func=train_predictors_cli)
