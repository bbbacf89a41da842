"""``python -m asynctrace``: the command line.

python -m asynctrace traces FILE [--correlation-id ID] [--slowest N] [--errors]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from asynctrace import _traces


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the subcommand; its exit status."""
    parser = argparse.ArgumentParser(prog="python -m asynctrace", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    traces = commands.add_parser(
        "traces", help="print trace trees from an OTLP/JSON traces file (no Jaeger needed)"
    )
    _traces.add_arguments(traces)
    args = parser.parse_args(argv)
    return _traces.main(args)  # the only command (argparse refuses others)


if __name__ == "__main__":
    sys.exit(main())
