"""`python -m fovea.training`: train stage 1 or stage 2, or export a checkpoint.

    python -m fovea.training stage1 --config run.json [--lr 1e-4 ...] [--nproc 2]
    python -m fovea.training stage2 --config run.json --language-model runs/opt --init-from runs/stage1/export
    torchrun --nproc_per_node=2 -m fovea.training stage1 --config run.json
    python -m fovea.training export --checkpoint runs/s1/checkpoints/step_001000 --out runs/s1/export

Every `TrainConfig` field is a flag (generated from the dataclass, with its docstring as help); flags override
the JSON file. `--nproc N` re-launches the same command under torchrun with N processes on this machine.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from fovea.entrypoints.arg_utils import add_dataclass_options, dataclass_kwargs
from fovea.training.config import TrainConfig

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def build_parser(prog: str = "python -m fovea.training") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{stage1,stage2,export}")
    for stage, text in (("stage1", "ITC + ITM + ITG with a frozen ViT"),
                        ("stage2", "LM loss through a frozen OPT")):
        p = sub.add_parser(stage, help=text, description=f"BLIP-2 {stage}: {text}.")
        p.add_argument("--config", default=None, help="JSON file of TrainConfig options (flags override it)")
        p.add_argument("--nproc", type=int, default=1, help="processes on this machine (torchrun); default 1")
        # flags override the JSON file, so a flag left out must not land as a default
        add_dataclass_options(p, TrainConfig, skip={"stage"}, fill_defaults=False)
    export = sub.add_parser("export", help="write the Hugging Face checkpoint of a training checkpoint")
    export.add_argument("--checkpoint", required=True, help="a checkpoints/step_NNNNNN folder")
    export.add_argument("--out", required=True, help="output directory")
    return parser


def _relaunch(nproc: int, argv: list[str]) -> int:
    """Run this command again under torchrun with `nproc` processes (without --nproc)."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: talk over loopback
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "fovea.training", *rest]
    return subprocess.call(command, env=env)


def main(argv: list[str] | None = None, prog: str = "python -m fovea.training") -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.command == "export":
        from fovea.training.build import export_checkpoint

        print(export_checkpoint(args.checkpoint, args.out))
        return 0
    if args.nproc > 1 and not all(k in os.environ for k in TORCHRUN_ENV):
        return _relaunch(args.nproc, argv)
    values = dataclass_kwargs(args, TrainConfig, skip={"stage"})
    try:
        if args.config is not None:
            config = TrainConfig.from_file(args.config, stage=args.command, **values)
        else:
            config = TrainConfig.from_dict({"stage": args.command, **values})
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    from fovea.training.trainer import train

    result = train(config)
    if result.export_dir is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"exported {Path(result.export_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
