"""Command line: ``actsparse demo | calibrate | eval | sweep | attribution | generate``.

One module per command (``register(subparsers)`` adds its arguments, ``run(args, config)`` runs it), the
argument groups they share in :mod:`.args`, the shared steps in :mod:`.common`, terminal output in :mod:`.format`.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from typing import NoReturn

from .._version import __version__
from ..errors import ActSparseError
from ..schema import json_safe
from . import attribution, calibrate, demo, evaluate, generate, sweep
from .common import check_outputs, check_window, precheck_scopes, sparsify_config, will_calibrate

__all__ = ["main", "build_parser", "COMMANDS"]

ISSUES_URL = "https://github.com/actsparse/actsparse/issues"

COMMANDS = {
    "demo": demo.run,
    "calibrate": calibrate.run,
    "eval": evaluate.run,
    "sweep": sweep.run,
    "attribution": attribution.run,
    "generate": generate.run,
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (what is wrong, where the options are), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="actsparse", description="Post-training activation sparsity for HF LMs")
    parser.add_argument("--version", action="version", version=f"actsparse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (demo, calibrate, evaluate, sweep, attribution, generate):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version (0) and bad arguments (2, one line on stderr already)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    try:
        # commands that may calibrate: a bad recipe fails before any loading
        config = sparsify_config(args) if hasattr(args, "default_scopes") else None
        check_outputs(args)  # every output place writable, before any work
        check_window(args)
        if config is not None and will_calibrate(args):
            precheck_scopes(args, config)  # scopes that match nothing: before the model loads
        result = COMMANDS[args.command](args, config)
    except (ActSparseError, OSError) as e:  # the user's mistake, or the machine's (a full disk, no permission)
        print(f"actsparse {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"actsparse {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception:  # anything else is a bug in actsparse (or below it): show where, ask for a report
        traceback.print_exc()
        print(
            f"actsparse {args.command}: internal error (a bug, not your input): please report it at "
            f"{ISSUES_URL} with the command line and the traceback above",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(json_safe(result), indent=2, default=str, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
