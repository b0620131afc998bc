"""`mlx-flash train-drafter` on the model's own answers, end to end on a tiny model."""

from __future__ import annotations

import json

import numpy as np

import mlx_flash.offline.answers as answers
from mlx_flash.cli.main import main
from mlx_flash.spec.drafter import load_drafter


def test_train_drafter_on_answers_and_general_requests(tiny_dirs, tmp_path, monkeypatch,
                                                       capsys):
    """Both kinds of request are answered (interleaved), cached per request, and the drafter
    is written with its sidecar naming the mix; it loads for the model."""
    _, flash_dir = tiny_dirs("mistral")  # word tokenizer, no chat template: long requests
    long = [" ".join(f"w{(7 * i + j) % 200 + 3}" for j in range(24)) for i in range(5)]
    monkeypatch.setattr(answers, "general_requests", lambda n: long[:n])
    out, cache = tmp_path / "d.safetensors", tmp_path / "answers.npz"
    args = ["train-drafter", str(flash_dir), "--answers", "2", "--general", "3", "--seq-len",
            "24", "--steps", "3", "--batch-size", "8", "--vocab", "64", "--answer-batch", "2",
            "--out", str(out), "--teacher-cache", str(cache)]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    with np.load(cache) as data:
        assert data["tokens"].shape == (5, 24)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert "3 of the packaged general requests" in meta["text"]
    assert load_drafter(out, flash_dir).vocab.size == 64
