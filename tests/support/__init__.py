"""Helpers shared by the test modules; a test module imports helpers from here (or gets
them as ``conftest.py`` fixtures), never from another test module.

- ``io``: raw framing, kernel buffer probes, waiting without sleeps, fault hooks.
- ``queues``: fresh queues with their adapters, child processes that are always reaped.
- ``heartbeat``: a task that shows whether the event loop stalls.
- ``memory``: the process's resident memory, for bounds on what a peer's claim costs.
- ``channels``: every channel asyncmp offers, behind one small interface.
- ``conformance``: the promises every channel keeps, as functions that take a channel.
- ``loops``: a call from another event loop, in a thread of its own, and the check that it
  was refused.
"""
