"""Only the compiled extension lives here; everything else is in pyproject.toml.

``pipeline.marketdata._ticks`` (the frame -> ring slot fast path of the ingest process) is
optional: without a C compiler the install still succeeds and ingest runs the pure-Python path
(``pipeline ingest --fast-path auto`` says which one it uses; ``on`` refuses to start without it).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pipeline.marketdata._ticks",
            ["pipeline/marketdata/_ticks.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers", "-Wno-cast-function-type"],
            optional=True,
        ),
        # futex wake-ups for sleeping ring readers (pipeline/ipc/wake.py); optional likewise:
        # without it readers nap instead of sleeping until woken
        Extension(
            "pipeline.ipc._futex",
            ["pipeline/ipc/_futex.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra",
                                "-Wno-unused-parameter", "-Wno-missing-field-initializers",
                                "-Wno-cast-function-type"],
            optional=True,
        ),
        # the compiled SBE decoder (pipeline/binance/sbe.py make_decoder); optional likewise:
        # without it SBE frames take the pure-Python reference decoder
        Extension(
            "pipeline.binance._sbe",
            ["pipeline/binance/_sbe.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra",
                                "-Wno-unused-parameter", "-Wno-missing-field-initializers",
                                "-Wno-cast-function-type"],
            optional=True,
        ),
    ]
)
