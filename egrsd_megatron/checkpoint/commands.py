"""`egrsd convert hf-to-megatron | megatron-to-hf` (work in checkpoint.convert)."""

from __future__ import annotations

import argparse


def _hf_to_megatron(args: argparse.Namespace) -> int:
    from .convert import hf_to_megatron

    out = hf_to_megatron(args.hf, args.out, tp=args.tp, pp=args.pp, overwrite=args.overwrite)
    print(f"wrote Megatron checkpoint (TP={args.tp}, PP={args.pp}) to {out}")
    return 0


def _megatron_to_hf(args: argparse.Namespace) -> int:
    from .convert import megatron_to_hf

    out = megatron_to_hf(
        args.ckpt, args.out, max_shard_bytes=int(args.max_shard_gb * 1024**3), overwrite=args.overwrite
    )
    print(f"wrote Hugging Face checkpoint to {out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert checkpoints Hugging Face <-> Megatron (any TP/PP)")
    sub = p.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    a = sub.add_parser("hf-to-megatron", help="Hugging Face folder -> Megatron-LM per-rank checkpoint")
    a.add_argument("--hf", required=True, help="Hugging Face folder (config.json + safetensors)")
    a.add_argument("--out", required=True, help="output checkpoint folder (must not exist or be empty)")
    a.add_argument("--tp", type=int, default=1, help="tensor parallel size to write")
    a.add_argument("--pp", type=int, default=1, help="pipeline parallel size to write")
    a.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    a.set_defaults(func=_hf_to_megatron)
    b = sub.add_parser("megatron-to-hf", help="Megatron checkpoint -> Hugging Face folder (safetensors)")
    b.add_argument("--ckpt", required=True, help="checkpoint folder written by hf-to-megatron or training")
    b.add_argument("--out", required=True, help="output Hugging Face folder (must not exist or be empty)")
    b.add_argument(
        "--max-shard-gb", type=float, default=1.0, help="largest safetensors shard, GiB (held in memory while written)"
    )
    b.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    b.set_defaults(func=_megatron_to_hf)
