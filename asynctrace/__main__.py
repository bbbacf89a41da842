"""``asynctrace`` (and ``python -m asynctrace``): the command line.

asynctrace run [options] -- python app.py ...    zero-code activation
python -m asynctrace run [options] app.py ...    the same, for a script in this Python
python -m asynctrace traces FILE [--correlation-id ID] [--slowest N] [--errors]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from asynctrace import _run, _tasks_cli, _traces

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the subcommand; its exit status."""
    parser = argparse.ArgumentParser(
        prog="asynctrace", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    commands = parser.add_subparsers(dest="subcommand", required=True)
    run = commands.add_parser(
        "run", help="run a command or script with asynctrace installed (zero-code)"
    )
    _run.add_arguments(run)
    traces = commands.add_parser(
        "traces", help="print trace trees from an OTLP/JSON traces file (no Jaeger needed)"
    )
    _traces.add_arguments(traces)
    for name, about in (
        ("ps", "list the tasks in flight of a running app (its /tasks view)"),
        ("tree", "show who awaits whom among a running app's tasks"),
        ("top", "the task list, refreshed"),
    ):
        _tasks_cli.add_arguments(commands.add_parser(name, help=about), refresh=name == "top")
    argv = list(sys.argv[1:] if argv is None else argv)
    module: list[str] = []
    if argv[:1] == ["run"] and "-m" in argv and "--" not in argv[: argv.index("-m")]:
        # `run -m package args`: argparse would take -m for an option of its own
        module = argv[argv.index("-m") :]
        argv = argv[: argv.index("-m")]
    args = parser.parse_args(argv)
    if args.subcommand == "run":
        if module:
            args.command = module
        return _run.main(args, run)
    if args.subcommand in ("ps", "tree", "top"):
        return _tasks_cli.main(args.subcommand, args)
    return _traces.main(args)


if __name__ == "__main__":
    sys.exit(main())
