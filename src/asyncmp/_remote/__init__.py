"""Adapter: ``serve`` and ``connect``, connections across machines: sockets, the
handshake, the listener.

It imports ``_core``, and from another adapter only the names ``asyncmp`` exports
(``tests/test_layers.py`` checks). This file imports nothing, so importing one
module of the package loads no other.
"""
