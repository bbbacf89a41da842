"""Zero-code activation: `asynctrace run`, `python -m asynctrace run`, opentelemetry-instrument.

The application below does not import asynctrace's install(): it reports whether asynctrace
is installed and the metadata its task got, its argv, and exits with status 3.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

APP = """
import asyncio, json, sys
import asynctrace
from asynctrace._install import configured_options

async def work():
    await asyncio.sleep(0)
    meta = asynctrace.task_metadata()
    return meta.correlation_id if meta is not None else None

async def main():
    cid = await asyncio.create_task(work())
    print(json.dumps({"argv": sys.argv[1:], "installed": configured_options() is not None,
                      "cid": cid}), flush=True)
    if "--wait" in sys.argv:
        await asyncio.sleep(60)

asyncio.run(main())
sys.exit(3)
"""
BIN = Path(sys.executable).parent


@pytest.fixture
def app(tmp_path: Path) -> Path:
    path = tmp_path / "app.py"
    path.write_text(APP)
    return path


def _report(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _run(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip


def test_without_it_nothing_is_installed(app: Path) -> None:
    report = _report(_run(sys.executable, str(app), cwd=app.parent))
    assert report["installed"] is False
    assert report["cid"] is None


def test_console_script_runs_the_command_instrumented(app: Path) -> None:
    traces = app.parent / "traces.jsonl"
    result = _run(
        str(BIN / "asynctrace"), "run", "--traces-file", str(traces), "--no-metrics", "--",
        sys.executable, str(app), "a", "b c", cwd=app.parent,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    report = _report(result)
    assert report == {"argv": ["a", "b c"], "installed": True, "cid": report["cid"]}
    assert isinstance(report["cid"], str)
    assert "work" in traces.read_text()  # the app's task spans, exported


@pytest.mark.parametrize("form", ["script", "module"])
def test_python_m_runs_a_script_or_module_in_process(app: Path, form: str) -> None:
    target = [str(app)] if form == "script" else ["-m", "app"]
    result = _run(sys.executable, "-m", "asynctrace", "run", "--no-metrics", *target, "x",
                  cwd=app.parent)  # fmt: skip
    assert result.returncode == 3, result.stderr
    report = _report(result)
    assert report["argv"] == ["x"]
    assert report["installed"] is True
    assert isinstance(report["cid"], str)


def test_signals_reach_the_application(app: Path) -> None:
    proc = subprocess.Popen(
        [str(BIN / "asynctrace"), "run", "--no-metrics", "--", sys.executable, str(app),
         "--wait"],
        cwd=app.parent, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["installed"] is True
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == -signal.SIGTERM  # the app's own death by signal: exec'd
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_another_sitecustomize_still_runs(app: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import os\nos.environ['OTHER_SITE'] = 'ran'\n")
    check = tmp_path / "check.py"
    check.write_text(
        "import os, asynctrace._install as i\n"
        "print(os.environ.get('OTHER_SITE'), i.configured_options() is not None)\n"
    )
    result = _run(str(BIN / "asynctrace"), "run", "--no-metrics", "--", sys.executable,
                  str(check), cwd=tmp_path, env={"PYTHONPATH": str(other)})  # fmt: skip
    assert result.stdout.split() == ["ran", "True"], result.stderr


def test_bad_invocations(app: Path) -> None:
    none = _run(str(BIN / "asynctrace"), "run", cwd=app.parent)
    assert none.returncode == 2
    assert "no command given" in none.stderr
    missing = _run(sys.executable, "-m", "asynctrace", "run", "nope.py", cwd=app.parent)
    assert missing.returncode == 2
    assert "no such script: 'nope.py'" in missing.stderr
    absent = _run(str(BIN / "asynctrace"), "run", "--", "no-such-binary-xyz", cwd=app.parent)
    assert absent.returncode == 127
    assert "cannot start 'no-such-binary-xyz'" in absent.stderr
    port = _run(str(BIN / "asynctrace"), "run", "--prometheus-port", "abc", "--", "true",
                cwd=app.parent)  # fmt: skip
    assert port.returncode == 2
    assert "invalid int value: 'abc'" in port.stderr


def test_opentelemetry_instrument_activates_it(app: Path) -> None:
    instrument = shutil.which("opentelemetry-instrument", path=str(BIN))
    if instrument is None:
        pytest.skip("opentelemetry-instrumentation is not installed (the dev extra has it)")
    quiet = {"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none",
             "OTEL_LOGS_EXPORTER": "none"}  # fmt: skip
    result = _run(instrument, sys.executable, str(app), "q", cwd=app.parent, env=quiet)
    assert result.returncode == 3, result.stderr
    assert _report(result)["installed"] is True
    off = _run(instrument, sys.executable, str(app), cwd=app.parent,
               env={**quiet, "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "asynctrace"})  # fmt: skip
    assert _report(off)["installed"] is False


def test_the_environment_configures_it(app: Path) -> None:
    """OTEL_* variables reach install() in the application's process."""
    result = _run(str(BIN / "asynctrace"), "run", "--no-metrics", "--", sys.executable, "-c",
                  "import asynctrace, asynctrace._install as i, time;"
                  "print(i.configured_options().export.service_name)",
                  cwd=app.parent, env={"OTEL_SERVICE_NAME": "zero-code"})  # fmt: skip
    assert result.stdout.strip() == "zero-code", result.stderr
