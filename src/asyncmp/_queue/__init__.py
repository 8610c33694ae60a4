"""Adapter: ``AsyncQueue``, a facade over the reader lock, a getter per route and the
putter.

It imports ``_core``, and from another adapter only the names ``asyncmp`` exports
(``tests/test_layers.py`` checks). This file imports nothing, so importing one
module of the package loads no other.
"""
