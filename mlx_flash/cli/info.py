"""`mlx-flash info`."""

from __future__ import annotations

import argparse

import numpy as np

from ..format.manifest import (
    add_block_checksums,
    describe_parts,
    has_block_checksums,
    read_manifest,
    verify_checksums,
)


def info_bytes(ckpt) -> dict[str, int]:
    """Approximate bytes each convert stage writes (for the progress bar's total)."""

    ffn = sum(int(np.prod(i.shape)) * 2 for n, i in ckpt.tensors().items() if ckpt.is_ffn_tensor(n))
    res = sum(int(np.prod(i.shape)) * 2 for n, i in ckpt.tensors().items()
              if not ckpt.is_ffn_tensor(n))
    return {"ffn": ffn, "resident": res}


def cmd_info(args) -> int:
    manifest = read_manifest(args.dir)
    if args.write_checksums and not args.verify:
        raise ValueError("--write-checksums needs --verify (a file's block "
                         "checksums are written only after its sha256 matched)")
    if args.write_checksums:
        add_block_checksums(args.dir, manifest)  # checks each sha256 in the same pass
    elif args.verify:
        verify_checksums(args.dir, manifest)
    cfg, ffn = manifest.config, manifest.ffn
    pred = manifest.predictors["size"] if manifest.predictors else 0
    rows = [
        ("format version", manifest.format_version),
        ("architecture", f"{cfg.get('model_type')}: {cfg.get('num_hidden_layers')} layers, "
                         f"d_model {cfg.get('hidden_size')}, {manifest.layers[0].n_neurons} FFN "
                         f"neurons/layer, vocab {cfg.get('vocab_size')}"),
        ("source", f"{manifest.source.get('kind')} {manifest.source.get('path')}"),
        ("resident", f"{manifest.resident['size'] / 2**20:.1f} MiB"),
        ("ffn (flash)", f"{manifest.ffn_bytes / 2**20:.1f} MiB"),
        ("predictors", f"{pred / 2**20:.1f} MiB" if pred else "none (oracle fallback)"),
        ("bundle", f"{ffn.kind} {ffn.activation}, {ffn.dtype}"
                   + (f", {describe_parts(manifest)}, " if ffn.per_part else
                      f", {ffn.bits}-bit groups of {ffn.group_size}, " if ffn.quantized else ", ")
                   + " | ".join(f"{p.name}[{p.count}]" for p in ffn.parts)
                   + f" = {ffn.bundle_bytes} B, stride {manifest.layers[0].stride} B"),
        ("placement", _placement_line(manifest)),
        ("checksums", ("verified" if args.verify else "not checked (pass --verify)")
         + ("; block checksums recorded (checked on read)" if has_block_checksums(manifest)
            else "; no block checksums (add them: --verify --write-checksums)")),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _placement_line(manifest) -> str:
    placed = manifest.placement
    if not placed:
        return "neuron id order (not placed; `mlx-flash place` reorders by co-activation)"
    return (f"{placed['method']} order from {placed['calibration']} (top {placed['keep']:.0%}, "
            f"{placed['train_tokens']} tokens); hot-neuron lists for pinning")


def add_arguments(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("info", help="describe a flash model dir")
    p.add_argument("dir")
    p.add_argument("--verify", action="store_true", help="also check every file's sha256")
    p.add_argument("--write-checksums", action="store_true",
                   help="with --verify: record the per-block checksums that readers check, for "
                        "a dir made before them (the manifest is replaced atomically)")
    p.set_defaults(func=cmd_info)
    return p

