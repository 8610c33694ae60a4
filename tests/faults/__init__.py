"""Fault injection: each module inflicts one kind of fault and states what may be lost.

Every module's docstring gives the setup, the fault, the expected outcome (which exception)
and exactly what is lost; ``docs/faults.md`` sums them up for users. The cases:

1. a receive cancelled while waiting, right after readiness, mid-frame: ``test_receive_cancelled``
2. a send cancelled mid-frame while the reader is paused: ``test_send_cancelled``
3. a queue get cancelled while it holds the reader lock: ``test_queue_get_cancelled``
4. a producer SIGKILLed in the middle of a 64 MiB put: ``test_producer_killed``
5. a peer killed after sending whole messages: ``test_peer_killed``
6. a producer that exits right after put: ``test_producer_exit``
7. the consumer is gone: ``test_consumer_gone``
8. a sync consumer blocked in get() next to an async one, under uvloop: ``test_shared_queue_flags``
9. hostile frames: ``test_hostile_frames``
10. closing at bad moments, then reuse of the descriptor number: ``test_close_at_bad_moments``
11. no leaked fd, thread, child process or zombie, no ResourceWarning: the autouse leak check
    of ``tests/conftest.py`` wraps every test here too (``tests/test_leakcheck.py`` tests it)
12. the soak: ``soak.py`` (``nox -s soak``), kept working by ``test_soak``

Child-process targets are in ``fault_workers``; shared helpers are in ``tests/support``.
"""
