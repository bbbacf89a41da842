"""The public surface: what `asynctrace` exports, and that each name is documented."""

from __future__ import annotations

import inspect

import asynctrace
import asynctrace.testing

EXPECTED = {
    "Installation",
    "Instrument",
    "TaskMetadata",
    "TaskRecord",
    "__version__",
    "correlation",
    "correlation_id",
    "create_task",
    "install",
    "loop_factory",
    "random_correlation_id",
    "task_metadata",
    "telemetry_errors",
    "uninstall",
}


def test_all_is_sorted_and_complete() -> None:
    """`__all__` lists exactly the public names, sorted, and each exists."""
    assert asynctrace.__all__ == sorted(asynctrace.__all__)
    assert set(asynctrace.__all__) >= EXPECTED
    for name in asynctrace.__all__:
        assert hasattr(asynctrace, name), name


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
    import pkgutil  # noqa: PLC0415

    for info in pkgutil.iter_modules(asynctrace.__path__):
        module = importlib.import_module(f"asynctrace.{info.name}")
        assert isinstance(getattr(module, "__all__", None), list), info.name
