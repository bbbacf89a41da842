"""Export: what ``install()`` sets up so telemetry leaves the process.

``options`` (install()'s arguments and the standard environment, validated), ``otlp`` (the
OTLP span exporter and asynctrace's counting wrappers), ``files`` (the OTLP/JSON file
exporter), ``setup`` (providers, sinks and the ``/metrics`` server for one installation) and
``summary`` (the per-operation table). Imports the sinks and the core, never the API layer.
"""

__all__: list[str] = []
