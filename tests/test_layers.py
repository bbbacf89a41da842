"""The layout: imports flow one way (api -> export -> sinks -> core), and importing is cheap.

The contracts live in pyproject.toml ([tool.importlinter]); import-linter checks them on the
whole import graph, function-level imports included. The import-cost tests run a fresh
interpreter each and look at ``sys.modules``: what a user's process actually loads.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("opentelemetry", "prometheus_client")


def test_layer_contracts_are_kept() -> None:
    """No module imports a layer above its own; the core imports no telemetry library."""
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [str(lint_imports), "--no-cache", "--config", str(ROOT / "pyproject.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout, result.stdout


def test_type_checking_imports_name_no_module_of_the_package() -> None:
    """Type-only imports (hidden from the contracts) never close an import circle inside.

    The package's own ``__init__`` is the one exception: it sits above every layer, and names
    the exporter it loads lazily for type checkers.
    """
    offenders = []
    for path in sorted((ROOT / "asynctrace").rglob("*.py")):
        if path == ROOT / "asynctrace" / "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith(
                        "asynctrace"
                    ):
                        offenders.append(f"{path.name}: from {inner.module} import ...")
    assert offenders == []


def loaded_after(code: str) -> dict[str, list[str]]:
    """Run ``code`` in a fresh interpreter; which of the heavy libraries' modules it loaded."""
    probe = textwrap.dedent(code) + textwrap.dedent(
        f"""
        import json, sys
        print(json.dumps({{
            name: sorted(m for m in sys.modules if m == name or m.startswith(name + "."))
            for name in {HEAVY!r}
        }}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    loaded: dict[str, list[str]] = json.loads(result.stdout.splitlines()[-1])
    return loaded


def test_import_loads_no_telemetry_library() -> None:
    """`import asynctrace` loads neither OpenTelemetry nor prometheus_client."""
    assert loaded_after("import asynctrace") == {name: [] for name in HEAVY}


def test_metadata_and_log_correlation_alone_load_no_telemetry_library() -> None:
    """Correlation ids, create_task and the log filter work without loading either library."""
    loaded = loaded_after(
        """
        import asyncio, logging, asynctrace

        records = []

        class Keep(logging.Handler):
            def emit(self, record):
                records.append(record)

        log = logging.getLogger("probe")
        handler = Keep()
        handler.addFilter(asynctrace.TaskContextFilter())
        log.addHandler(handler)

        async def work():
            log.warning("hello")
            return asynctrace.correlation_id()

        async def main():
            with asynctrace.correlation("req-1"):
                return await asynctrace.create_task(work(), operation_name="w")

        assert asyncio.run(main()) == "req-1"
        assert records[0].correlation_id == "req-1"
        assert asynctrace.add_task_context(None, "info", {}) == {}
        """
    )
    assert loaded == {name: [] for name in HEAVY}


def test_metrics_only_install_loads_prometheus_client_and_no_opentelemetry() -> None:
    """`install()` with metrics only loads prometheus_client, and nothing of OpenTelemetry."""
    loaded = loaded_after(
        """
        import asyncio, asynctrace
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry()

        async def main():
            asynctrace.install(registry=registry)
            await asynctrace.create_task(asyncio.sleep(0), operation_name="w")

        asyncio.run(main())
        got = registry.get_sample_value("asynctrace_tasks_created_total", {"operation": "w"})
        assert got == 1, got
        asynctrace.shutdown()
        """
    )
    assert loaded["prometheus_client"]
    assert loaded["opentelemetry"] == []


def test_export_install_loads_the_sdk() -> None:
    """The probe can see a library load: asking for export does load the OpenTelemetry SDK."""
    loaded = loaded_after(
        """
        import asynctrace
        from prometheus_client import CollectorRegistry

        asynctrace.install(otlp_endpoint="http://127.0.0.1:9", registry=CollectorRegistry())
        asynctrace.shutdown()
        """
    )
    assert "opentelemetry.sdk.trace" in loaded["opentelemetry"]
