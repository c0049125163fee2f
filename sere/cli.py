"""The `sere` command: one entry point for the offline tools.

    sere calibrate     --model DIR --data PATH [--metric cosine|frobenius|cka] ...
    sere substitution  --model DIR --data PATH ...
    sere evaluate      --model DIR --text PATH --batch-size B ... --json OUT
    sere tune          --model DIR --text PATH --max-ppl-increase 0.01 [--out FILE]
    sere <command> --help

Each command is the `main(argv, prog=...)` of its module (sere.hf.<command>; sere.tune), which
owns its parser: `sere calibrate ...` and `python -m sere.calibrate ...` are the same program. A tool
module (and transformers with it) is imported only when its command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib import metadata

__all__ = ["COMMANDS", "main"]

# command -> (module with `main(argv, prog=...)`, one-line summary for `sere --help`)
COMMANDS = {
    "calibrate": ("sere.hf.calibrate", "write the expert similarity sidecar (read by policy sere)"),
    "substitution": ("sere.hf.substitution", "write the substitution error sidecar (read by policy sere-err)"),
    "evaluate": ("sere.hf.evaluate", "compare policies with topk under lock-step batch decoding"),
    "tune": ("sere.tune", "pick each batch size's settings for a perplexity target (writes the schedule)"),
}


def _version() -> str:
    try:
        return metadata.version("sere")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def build_parser(prog: str = "sere") -> argparse.ArgumentParser:
    """The top-level parser: a required command and everything after it left for the command."""
    width = max(map(len, COMMANDS)) + 3
    listing = "\n".join(f"  {name:<{width}}{summary}" for name, (_, summary) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog=prog,
        usage="%(prog)s [-h] [--version] <command> [options]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Similarity-based Expert Re-routing (SERE) for batch decoding of MoE models: the\n"
                    "offline tools. Serving goes through vLLM (`--hf-overrides '{\"sere\": {...}}'`)\n"
                    f"or the Ray Serve app in deploy/.\n\ncommands:\n{listing}",
        epilog=f"Run `{prog} <command> --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    # help=SUPPRESS: the description lists the commands (argparse would wrap the long names)
    commands = parser.add_subparsers(dest="command", metavar="<command>", required=True, help=argparse.SUPPRESS)
    for name in COMMANDS:
        # add_help=False: `sere calibrate --help` reaches calibrate's own parser
        commands.add_parser(name, add_help=False)
    return parser


def main(argv: list[str] | None = None, prog: str = "sere") -> int:
    """Run `sere <command> [options]`; returns the exit status (0) for the console script.

    Errors in the command line exit with status 2 and a message (argparse's convention).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args, rest = build_parser(prog).parse_known_args(argv)
    module_name, _ = COMMANDS[args.command]
    tool = importlib.import_module(module_name)
    tool.main(rest, prog=f"{prog} {args.command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
