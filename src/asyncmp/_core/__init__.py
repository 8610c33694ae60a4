"""The layers every adapter stands on: the wire codec, the frame engine, descriptor I/O,
the loop and thread layers, the only reader of multiprocessing's internals, the
platform switch, the exceptions, the block manager that ``open_*`` return, and what
every child process does first.

A module here imports the standard library, anyio, trio and other modules of
``_core``, never an adapter (``tests/test_layers.py`` checks). This file imports
nothing, so importing one module of the package loads no other.
"""
