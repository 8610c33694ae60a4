"""Adapter: ``open_pool``: the pool, its jobs, map and stream, and the worker side.

It imports ``_core``, and from another adapter only the names ``asyncmp`` exports
(``tests/test_layers.py`` checks). This file imports nothing, so a worker that
imports the worker module loads no other module of the package.
"""
