"""`mlx-flash train-drafter`."""

from __future__ import annotations

from ..offline.answers import PROMPT_TAIL
from ..offline.train_drafter import DrafterConfig, _Progress, make_drafter
from .train_predictors import add_text_arguments


def train_drafter_cli(args) -> int:
    """`mlx-flash train-drafter DIR ...`: trains, saves, prints time and acceptance."""
    cfg = DrafterConfig(length=args.length, n_res=args.resblocks, vocab=args.vocab,
                        steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        hidden_weight=args.hidden_weight, seed=args.seed)
    n_tokens = (args.tokens // args.seq_len) * args.seq_len
    if args.answers or args.general:  # less what the cache holds
        n_tokens = (args.answers + args.general) * (args.seq_len - PROMPT_TAIL)
    bars = _Progress(n_tokens, cfg.steps)
    try:
        path, report = make_drafter(args.dir, cfg, args.text, args.tokens, args.seq_len,
                                    args.out, bars, args.teacher_cache, args.answers,
                                    args.answer_batch, args.general)
    finally:
        bars.close()
    hold = report.holdout
    print(f"teacher pass {report.teacher_seconds:.0f} s over {report.tokens} tokens, training "
          f"{report.train_seconds:.0f} s ({cfg.steps} steps); vocabulary {cfg.vocab} tokens "
          f"cover {report.vocab_coverage:.1%} of the targets\nheld-out ({hold['positions']} "
          f"positions, teacher forced): top-1 per draft step {hold['top1_per_step']}, mean "
          f"accepted greedy chain {hold['mean_accepted']:.2f} of {cfg.length}\nwrote {path}")
    return 0


def add_arguments(subparsers) -> None:
    """Register `train-drafter` on the CLI's subparsers."""

    p = subparsers.add_parser("train-drafter",
                              help="train the recurrent drafter for speculative decoding")
    p.add_argument("dir", help="flash model dir (the drafter is written into it)")
    add_text_arguments(p)
    p.add_argument("--answers", type=int, default=0,
                   help="train on the model's own greedy answers to this many requests made "
                        "from the calibration text (seq-len tokens each) instead of the text; "
                        "up to 3 per document: explain with an example, explain in prose, "
                        "write new code")
    p.add_argument("--general", type=int, default=0,
                   help="also train on the model's own answers to this many of the packaged "
                        "general requests (prose, advice, letters, stories; no code), "
                        "interleaved with --answers")
    p.add_argument("--answer-batch", type=int, default=16,
                   help="answers generated together (one forward call per token for all)")
    p.add_argument("--steps", type=int, default=DrafterConfig.steps, help="training steps")
    p.add_argument("--batch-size", type=int, default=DrafterConfig.batch_size)
    p.add_argument("--lr", type=float, default=DrafterConfig.lr)
    p.add_argument("--length", type=int, default=DrafterConfig.length,
                   help="draft steps unrolled in training")
    p.add_argument("--resblocks", type=int, default=DrafterConfig.n_res)
    p.add_argument("--vocab", type=int, default=DrafterConfig.vocab,
                   help="tokens the drafter can propose (most frequent targets, then the "
                        "lowest ids)")
    p.add_argument("--hidden-weight", type=float, default=DrafterConfig.hidden_weight,
                   help="weight of the feature-distillation term (MSE to the model's next "
                        "hidden state; 0: cross-entropy only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write here instead of DIR/drafter.safetensors")
    p.add_argument("--teacher-cache", default=None, metavar="FILE.npz",
                   help="keep the teacher pass here (reused when the tokens match; with "
                        "--answers: the answers, reused per request)")
    p.set_defaults(func=train_drafter_cli)
