"""The drafters shipped with the package: found for the model they were trained for, refused
for any other, tied to the model by what a fresh machine reproduces (the source's hash)."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import numpy as np
import pytest

import mlx_flash.spec.drafter as drafter_mod
from mlx_flash.format.errors import FormatError
from mlx_flash.runtime.loader import load_dense
from mlx_flash.spec.drafter import (
    Drafter,
    find_drafter,
    identity_mismatch,
    init_params,
    load_drafter,
    model_identity,
    packaged_drafters,
    save_drafter,
)

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def shipped(tiny_dirs, tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A drafter 'packaged' for the tiny qwen2 model (the package's list points at tmp_path);
    returns (its weights file, the model's flash dir)."""
    _, flash_dir = tiny_dirs("qwen2")
    model, _ = load_dense(flash_dir)
    drafter = Drafter(init_params(64, 1, seed=3), np.arange(200)).attach(model, flash_dir)
    weights = save_drafter(drafter, flash_dir, tmp_path / "tiny-qwen2.safetensors")
    monkeypatch.setattr(drafter_mod, "packaged_drafters", lambda: [weights])
    return weights, flash_dir


def test_a_packaged_drafter_is_found_for_its_model_and_loads(shipped):
    weights, flash_dir = shipped
    assert not (flash_dir / drafter_mod.DRAFTER).exists()
    assert find_drafter(flash_dir) == weights
    assert load_drafter(find_drafter(flash_dir), flash_dir).vocab.size == 200


def test_the_model_dirs_own_drafter_comes_first(shipped, tmp_path):
    weights, _ = shipped
    own = tmp_path / "own"
    own.mkdir()
    (own / drafter_mod.DRAFTER).write_bytes(weights.read_bytes())
    assert find_drafter(own) == own


def test_a_packaged_drafter_is_refused_for_another_model(shipped, tiny_dirs):
    weights, _ = shipped
    _, other = tiny_dirs("llama")
    assert find_drafter(other) == other  # not found: the dir itself, which has none
    with pytest.raises(FormatError, match="no packaged drafter was trained for this model "
                                          r"\(packaged: tiny-qwen2\).*train-drafter"):
        load_drafter(find_drafter(other), other)
    with pytest.raises(FormatError, match="trained for another model"):
        load_drafter(weights, other)  # given by path: checked all the same


def test_identity_is_the_source_hash_where_both_record_one():
    """A fresh convert of the same source (another MLX could write other resident bytes)
    matches; a drafter saved before the source hash was recorded is matched on the resident
    file's hash; d_model and vocab_size always count."""
    saved = {"d_model": 896, "vocab_size": 151936, "source_sha256": "s", "resident_sha256": "r"}
    assert identity_mismatch(saved, {**saved, "resident_sha256": "r2"}) is None
    assert identity_mismatch(saved, {**saved, "source_sha256": "t"}) == "source_sha256"
    assert identity_mismatch(saved, {**saved, "d_model": 64}) == "d_model"
    old = {k: v for k, v in saved.items() if k != "source_sha256"}
    assert identity_mismatch(old, {**saved, "source_sha256": "t"}) is None
    assert identity_mismatch(old, {**saved, "resident_sha256": "r2"}) == "resident_sha256"


def test_cli_generate_with_the_packaged_drafter_matches_plain(tiny_dirs, tmp_path, capsys,
                                                              monkeypatch):
    """`--drafter` without a PATH on a dir with no drafter of its own: the packaged one."""
    from mlx_flash.cli.main import main

    _, flash_dir = tiny_dirs("mistral")  # its tiny tokenizer encodes "w1 w2 w3"
    model, _ = load_dense(flash_dir)
    drafter = Drafter(init_params(64, 1, seed=1), np.arange(256)).attach(model, flash_dir)
    weights = save_drafter(drafter, flash_dir, tmp_path / "tiny-mistral.safetensors")
    monkeypatch.setattr(drafter_mod, "packaged_drafters", lambda: [weights])
    args = ["generate", "--model", str(flash_dir), "--prompt", "w1 w2 w3", "-m", "12",
            "--ignore-chat-template"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    stats = tmp_path / "stats.json"
    assert main(args + ["--drafter", "--stats-json", str(stats)]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and "tokens per verification step" in captured.err
    data = json.loads(stats.read_text())
    assert data["speculative"]["verify_steps"] >= 1
    assert data["memory"]["reserved"] > 0  # the plan counted the packaged drafter


def test_the_shipped_drafter_is_whole_and_for_the_default_model():
    """The file in the package: checksum, format and shapes load; its sidecar names the
    default model's source hash (the converted GGUF that `pull` verifies)."""
    shipped = packaged_drafters()
    if not shipped:
        pytest.skip("no drafter in mlx_flash/spec/data (a source checkout without it)")
    for weights in shipped:
        drafter = load_drafter(weights, half=False)
        model = json.loads(weights.with_suffix(".json").read_text())["model"]
        assert drafter.d_model == model["d_model"] and model["source_sha256"]


def test_the_packaged_data_ships_in_the_wheel():
    """Every file under the data folders matches a package-data pattern of pyproject."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]
    for package in ("mlx_flash.spec", "mlx_flash.offline"):
        folder = ROOT.joinpath(*package.split("."), "data")
        for f in folder.glob("*") if folder.is_dir() else []:
            rel = f.relative_to(folder.parent).as_posix()
            assert any(fnmatch.fnmatch(rel, pat) for pat in data.get(package, [])), rel


@pytest.mark.real_model
def test_real_model_finds_the_packaged_drafter(real_dir):
    """The default model as `pull` makes it: `--drafter` finds the shipped drafter (unless
    the dir has its own), and it loads for this model."""
    if not packaged_drafters():
        pytest.skip("no drafter in mlx_flash/spec/data")
    found = find_drafter(real_dir)
    assert found == real_dir or found in packaged_drafters()
    load_drafter(found, real_dir)
    assert model_identity(real_dir)["source_sha256"]

