"""Runs each contender in a fresh child process inside a capped cgroup v1 memory group.

The child joins the group before it imports anything (a `sh -c 'echo $$ > cgroup.procs; exec
python ...'` wrapper), so the cap covers the whole process, page cache included; an OOM kill is
a result (a row), not a crash of the benchmark. Without root or the cgroup v1 memory controller
the runs are uncapped and the flash contenders read with O_DIRECT (labelled in every row).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..format.manifest import read_manifest
from ..offline.calibrate_disk import drop_page_cache
from ..runtime.generate import format_prompt
from ..runtime.loader import load_tokenizer
from .contenders import Contender

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
WORKER = "mlx_flash.bench.worker"
PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the dir that holds mlx_flash/


# ---------------------------------------------------------------- cgroup v1


def own_memory_cgroup() -> Path:
    """This process's cgroup v1 memory group (children nest there, keeping its accounting)."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                candidate = CGROUP_ROOT / path.lstrip("/")
                if candidate.is_dir():
                    return candidate
    except OSError:
        pass
    return CGROUP_ROOT


def cgroup_problem() -> str | None:
    """None if memory caps can be enforced here, else why not."""
    if os.geteuid() != 0:
        return "not root: cannot create memory cgroups or drop the page cache"
    if not (CGROUP_ROOT / "memory.limit_in_bytes").exists():
        return f"no cgroup v1 memory controller at {CGROUP_ROOT}"
    return None


class MemoryGroup:
    """A cgroup v1 memory group with a limit; use as a context manager (removed on exit)."""

    def __init__(self, parent: Path, name: str, limit: int | None):
        self.path = parent / name
        self.path.mkdir()
        self._write("memory.limit_in_bytes", str(limit if limit is not None else -1))
        if limit is not None and (self.path / "memory.memsw.limit_in_bytes").exists():
            self._write("memory.memsw.limit_in_bytes", str(limit))  # no escape into swap

    def _write(self, name: str, value: str) -> None:
        (self.path / name).write_text(value)

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def usage(self) -> dict:
        """Peak usage, limit hits and OOM kills so far."""
        oom = dict(line.split() for line in self._read("memory.oom_control").splitlines())
        return {"max_usage_bytes": int(self._read("memory.max_usage_in_bytes")),
                "failcnt": int(self._read("memory.failcnt")),
                "oom_kills": int(oom.get("oom_kill", 0))}

    def __enter__(self) -> MemoryGroup:
        return self

    def __exit__(self, *exc) -> None:
        for _ in range(50):  # the last task may take a moment to leave
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


# ---------------------------------------------------------------- what every run shares


@dataclass
class Setup:
    """What every run shares."""

    model: Path
    size: int
    out: Path
    prompt_ids: list[int]
    tokens: int
    dtype: str
    timeout: float
    cgroup_parent: Path | None  # None: no caps (fallback, O_DIRECT for flash)
    force_direct: bool
    unbundled_dir: Path | None = None
    run_id: int = 0
    ppl_ids: list[int] | None = None  # the text runs with task "ppl" score (users' regime)
    record_ids: bool = True  # the flash contender records its selections (window sweep)
    max_decode_s: float | None = None  # a run stops decoding after this (>= 3 tokens)


def prompt_token_ids(model: Path, prompt: str) -> list[int]:
    """The chat-templated prompt, tokenized once so every contender gets the same ids."""
    tokenizer = load_tokenizer(model, read_manifest(model))
    ids = format_prompt(tokenizer, prompt)
    if not ids:
        raise ValueError(f"the prompt {prompt!r} tokenizes to no tokens with {model}'s "
                         "tokenizer: give another --prompt or --prompt-ids")
    return ids


def private_copy(model: Path, gguf: Path | None, dest: Path) -> tuple[Path, Path | None]:
    """Copy the model dir (and GGUF) to `dest` once; returns the copies' paths.

    On a shared machine other processes keep the model's pages in the page cache, charged to
    their cgroups and not to the run's: a mapped file then looks cheaper than it is under the
    cap. Files nobody else opens give every contender the same cold start.
    """
    copy = dest / model.name
    if not (copy / "manifest.json").exists() or \
            (copy / "manifest.json").read_bytes() != (model / "manifest.json").read_bytes():
        print(f"[bench] copying {model} to {copy} ...", file=sys.stderr)
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(model, copy)
    gguf_copy = None
    if gguf is not None and gguf.exists():
        gguf_copy = dest / gguf.name
        if not gguf_copy.exists() or gguf_copy.stat().st_size != gguf.stat().st_size:
            shutil.copyfile(gguf, gguf_copy)
    return copy, gguf_copy


def make_setup(args, size: int) -> Setup:
    """The Setup of parsed benchmark flags; warns on stderr when caps cannot be enforced."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    problem = "--no-cgroup given" if args.no_cgroup else cgroup_problem()
    parent = None if problem else (Path(args.cgroup_parent) if args.cgroup_parent
                                   else own_memory_cgroup())
    if problem:
        print(f"WARNING: {problem}. Caps are NOT enforced; flash contenders read with O_DIRECT "
              "and every row is labelled so.", file=sys.stderr)
    ids = ([int(t) for t in args.prompt_ids.split(",")] if args.prompt_ids
           else prompt_token_ids(Path(args.model), args.prompt))
    return Setup(Path(args.model), size, out, ids,
                 args.tokens, args.dtype, args.timeout, parent,
                 force_direct=args.direct or parent is None)


# ---------------------------------------------------------------- running one contender


def worker_spec(setup: Setup, c: Contender, cap: int | None, tag: str,
                task: str = "generate") -> dict:
    """The JSON the worker reads (`worker.worker_main`); task "generate" or "ppl"."""
    return {"kind": c.kind, "model": str(setup.model), "options": c.options,
            "cap": cap, "dtype": setup.dtype, "prompt_ids": setup.prompt_ids,
            "tokens": setup.tokens, "force_direct": setup.force_direct,
            "unbundled_dir": str(setup.unbundled_dir) if setup.unbundled_dir else None,
            "record_ids": c.name == "flash" and setup.record_ids and task == "generate",
            "ids_file": str(setup.out / f"ids_{tag}.npz"), "task": task,
            "ppl_ids": setup.ppl_ids, "max_decode_s": setup.max_decode_s,
            "result_file": str(setup.out / f"result_{tag}.json")}


def child_command(spec_file: Path, procs: Path | None) -> list[str]:
    """The child's argv: a shell that joins the cgroup first, then execs the worker."""
    worker = [sys.executable, "-m", WORKER, str(spec_file)]
    if procs is None:
        return worker
    return ["sh", "-c", f'echo $$ > {shlex.quote(str(procs))} && exec "$@"', "sh", *worker]


def spawn(cmd: list[str], log: Path, timeout: float) -> tuple[int | None, float]:
    """Run cmd in its own process group; returns (exit status or None on timeout, seconds)."""
    env = dict(os.environ)
    if PACKAGE_PARENT.name not in ("site-packages", "dist-packages"):  # a source checkout
        env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_PARENT),
                                             *filter(None, [os.environ.get("PYTHONPATH")])])
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        except BaseException:  # Ctrl-C: do not leave the child running in its cgroup
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        if rc is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return rc, time.perf_counter() - t0


def run_one(setup: Setup, c: Contender, cap: int | None, task: str = "generate") -> dict:
    """One contender at one cap in a fresh process (and cgroup); always returns a row.
    task: "generate" (decode setup.tokens tokens) or "ppl" (score setup.ppl_ids)."""
    setup.run_id += 1
    tag = f"{c.name}_{'none' if cap is None else cap}" + ("" if task == "generate" else
                                                          f"_{task}")
    row = {"name": c.name, "label": c.label, "kind": c.kind, "cap_bytes": cap,
           "cap_fraction": None if cap is None else cap / setup.size,
           "io_mode": io_mode(setup, c, cap), "task": task}
    if c.skip:
        return {**row, "status": "skipped", "error": c.skip}
    spec = worker_spec(setup, c, cap, tag, task)
    spec_file = setup.out / f"spec_{tag}.json"
    spec_file.write_text(json.dumps(spec))
    Path(spec["result_file"]).unlink(missing_ok=True)
    row["page_cache_dropped"] = drop_page_cache()
    log = setup.out / f"log_{tag}.txt"
    if setup.cgroup_parent is None:
        rc, wall = spawn(child_command(spec_file, None), log, setup.timeout)
        row["cgroup"] = None
    else:
        name = f"mlx_flash_bench_{os.getpid()}_{setup.run_id}"
        with MemoryGroup(setup.cgroup_parent, name, cap) as group:
            rc, wall = spawn(child_command(spec_file, group.procs), log, setup.timeout)
            row["cgroup"] = {"path": str(group.path), **group.usage()}
    row.update(exit_status=rc, wall_s=wall, log=str(log))
    return {**row, **read_result(spec["result_file"], rc, row.get("cgroup"))}


def io_mode(setup: Setup, c: Contender, cap: int | None) -> str:
    """How the run's cap and reads work, for the report."""
    if setup.cgroup_parent is None:
        direct = " O_DIRECT" if c.kind == "flash" else ""
        return f"no cgroup: cap NOT enforced{direct}"
    if cap is None:
        return "cgroup, no limit"
    return "cgroup cap" + (" + O_DIRECT" if setup.force_direct and c.kind == "flash" else
                           " (page cache counts)")


def read_result(path: str, rc: int | None, cgroup: dict | None) -> dict:
    """The worker's result, or the status its exit implies (OOM kill, timeout, crash)."""
    oom = bool(cgroup and cgroup["oom_kills"] > 0)
    if Path(path).exists():
        result = json.loads(Path(path).read_text())
        return {**result, "oom_killed": oom}
    if rc is None:
        return {"status": "timeout", "oom_killed": oom}
    if oom or rc in (-9, 137):
        return {"status": "oom", "oom_killed": True,
                "error": "killed by the OOM killer under the cap" if oom else
                "SIGKILL (OOM killer?)"}
    return {"status": "crashed", "oom_killed": oom, "error": f"exit status {rc}, see the log"}
