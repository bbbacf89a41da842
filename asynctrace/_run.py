"""``asynctrace run``: zero-code activation, like ``opentelemetry-instrument``.

    asynctrace run [options] -- python app.py arg ...     # any command that starts Python
    python -m asynctrace run [options] app.py arg ...     # a script, in this interpreter
    python -m asynctrace run [options] -m package arg ...  # a module, likewise

asynctrace is installed process-wide before the application's code runs, from the options
here and the standard environment (``OTEL_SERVICE_NAME``, ``OTEL_EXPORTER_OTLP_*``, ...).
The application runs unchanged: its ``sys.argv``, exit status and signals are its own. A
command is started with ``os.execvpe`` (it replaces this process) and this package's
``_bootstrap`` folder first on ``PYTHONPATH``, whose ``sitecustomize`` installs asynctrace in
every Python the command starts (child processes too). A script or ``-m`` module given to
``python -m asynctrace run`` runs in this interpreter, as ``python`` would run it.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
from pathlib import Path
from typing import Any

__all__ = ["OPTIONS_ENV", "add_arguments", "main"]

OPTIONS_ENV = "ASYNCTRACE_RUN_OPTIONS"
BOOTSTRAP = Path(__file__).resolve().parent / "_bootstrap"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``run`` subcommand's arguments."""
    parser.add_argument("--service-name", help="service.name (else OTEL_SERVICE_NAME)")
    parser.add_argument("--otlp-endpoint", help="export spans by OTLP to this base URL")
    parser.add_argument("--otlp-protocol", choices=["http/protobuf", "http/json", "grpc"])
    parser.add_argument("--traces-file", help="also write spans to this OTLP/JSON file")
    parser.add_argument("--prometheus-port", type=int, help="serve /metrics on this port")
    parser.add_argument("--prometheus-addr", help="bind address for /metrics (127.0.0.1)")
    parser.add_argument("--no-metrics", action="store_true", help="no Prometheus metrics")
    parser.add_argument("--no-loop-monitor", action="store_true", help="no loop lag monitor")
    parser.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="the command (after --), or a script or -m module to run in this interpreter",
    )


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for name in ("service_name", "otlp_endpoint", "otlp_protocol", "traces_file",
                 "prometheus_port", "prometheus_addr"):  # fmt: skip
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    if args.no_metrics:
        options["metrics"] = False
    if args.no_loop_monitor:
        options["loop_monitor"] = False
    return options


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run the command or script with asynctrace installed; its exit status."""
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        parser.error("run: no command given (asynctrace run [options] -- python app.py ...)")
    options = _options(args)
    if command[0] == "-m" or command[0].endswith(".py"):
        return _run_here(command, options, parser)
    env = dict(os.environ)
    env[OPTIONS_ENV] = json.dumps(options)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BOOTSTRAP), env.get("PYTHONPATH", "")) if p)
    try:
        os.execvpe(command[0], command, env)  # noqa: S606 - the user's own command
    except OSError as exc:
        sys.stderr.write(f"asynctrace run: cannot start {command[0]!r}: {exc.strerror}\n")
        return 127


def _run_here(command: list[str], options: dict[str, Any], parser: argparse.ArgumentParser) -> int:
    import asynctrace  # noqa: PLC0415

    if command[0] == "-m":
        if len(command) < 2:  # noqa: PLR2004
            parser.error("run: -m needs a module name")
        target, rest, as_module = command[1], command[2:], True
    else:
        target, rest, as_module = command[0], command[1:], False
        if not Path(target).is_file():
            parser.error(f"run: no such script: {target!r}")
    asynctrace.install(**options)
    sys.argv = [target, *rest]
    if as_module:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.path.insert(0, str(Path(target).resolve().parent))
        runpy.run_path(target, run_name="__main__")
    return 0
