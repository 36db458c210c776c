"""Only the compiled part of the build; everything else is in pyproject.toml.

transport/_ringfast.c (the ring's hot paths, transport/cursor.py) is optional: where no C compiler is there the
install goes on without it and the rings run their Python cursors, slower but the same protocol.
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("transport._ringfast", ["transport/_ringfast.c"], optional=True,
                             extra_compile_args=["-O2", "-std=gnu11"])])
