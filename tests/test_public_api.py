"""The public surface: exactly what `asynctrace` exports, and that each name is documented."""

from __future__ import annotations

import inspect

import asynctrace
import asynctrace.testing

EXPECTED = [
    "Cancellation",
    "Carried",
    "Installation",
    "Instrument",
    "OTLPJsonFileSpanExporter",
    "Summary",
    "TaskContextFilter",
    "TaskMetadata",
    "TaskRecord",
    "__version__",
    "add_task_context",
    "carry",
    "correlation",
    "correlation_id",
    "create_task",
    "flush",
    "install",
    "loop_factory",
    "random_correlation_id",
    "resume",
    "run_in_executor",
    "shutdown",
    "summary",
    "task_metadata",
    "telemetry_errors",
    "uninstall",
]
EXPECTED_TESTING = ["TaskCapture", "capture_tasks", "record_of", "reset"]


def test_all_is_exactly_the_public_names() -> None:
    """`__all__` lists exactly the public names, sorted, and each exists (httpx's pin)."""
    assert asynctrace.__all__ == EXPECTED
    assert asynctrace.testing.__all__ == EXPECTED_TESTING
    for module in (asynctrace, asynctrace.testing):
        for name in module.__all__:
            assert getattr(module, name) is not None, name
    # "@py_builtins" and "@pytest_ar": pytest rewrites the asserts of an installed plugin's
    # whole distribution (asynctrace registers one, pytest11), and adds these names.
    public = {n for n in vars(asynctrace) if not n.startswith(("_", "@"))} - {"annotations"}
    # what the package exposes besides __all__ is its public submodules (once imported)
    submodules = {"export", "sinks", "testing", "web", "instrumentor", "pytest_plugin"}
    assert public - set(EXPECTED) <= submodules


def test_public_names_have_docstrings() -> None:
    """Every public function and class carries a docstring (the users' guide points at them)."""
    for module in (asynctrace, asynctrace.testing):
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) or callable(obj):
                assert inspect.getdoc(obj), f"{module.__name__}.{name} has no docstring"


def test_private_modules_declare_all() -> None:
    """Each implementation module states its own `__all__` (httpx's convention)."""
    import importlib  # noqa: PLC0415
    import importlib.util  # noqa: PLC0415
    import pkgutil  # noqa: PLC0415

    # modules for tools that may not be installed: opentelemetry-instrument's base class
    optional = {"asynctrace.instrumentor": "opentelemetry.instrumentation"}
    for info in pkgutil.walk_packages(asynctrace.__path__, "asynctrace."):
        needs = optional.get(info.name)
        if needs is not None and importlib.util.find_spec(needs) is None:
            continue
        module = importlib.import_module(info.name)
        assert isinstance(getattr(module, "__all__", None), list), info.name
