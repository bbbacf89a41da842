"""The optional C accelerator; everything else is in pyproject.toml.

``optional=True``: where no compiler (or no Python headers) is found, the build goes on
without it and asynctrace runs its pure-Python twin (asynctrace/_speedups_py.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "asynctrace._speedups",
            sources=["asynctrace/_speedups.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall"],
        )
    ]
)
