"""The conversation between the pool and one of its workers, and its message tags.

Both sides import this module: the parent (``_pool.conversation``, ``_pool.job``) and the
worker (``_pool.worker``). So it imports nothing: a worker that imports it loads
nothing more.

The conversation over a worker's duplex pipe, every message one pickled frame:

* worker -> parent, once: ``(READY, pid)``, or ``(INIT_FAILED, error)`` if the
  initializer raised (the worker then returns).
* parent -> worker: ``(job_id, fn, [args, ...], pickled)``: call ``fn(*args)`` for each
  entry; *fn* may also come as ``bytes``, its own pickle (a plain function, by
  reference). With *pickled*, each entry is the pickle of its *args*, made one by one
  (a map's items that hold ``shared()`` objects: a chunk of them is cut at
  ``max_tasks_per_child`` without pickling them again, which would make new segments);
  they are all unpickled before the first call, so a worker that dies leaves none of
  their segments behind. A chunk of :meth:`Pool.map` items and a single
  :meth:`Pool.run` call look the same. Or ``(BATCH, [request_bytes, ...])``: several
  such jobs, pickled one by one, run in that order, each answered as soon as it is done.
* worker -> parent: ``(OK, job_id, values, errors, seconds, shared_bytes, pickled)``:
  ``values[i]`` is the i-th result, ``errors`` is ``None`` or maps the index of each call
  that failed to its error, ``seconds`` is how long the job took here (the pool judges
  by it whether calls are quick enough to send together). With *pickled*, each value
  comes as its own pickle, made once (when one of them can't be pickled, or when the
  results are ``shared()`` objects themselves), and ``shared_bytes`` is the shared
  memory those pickles made (a map counts it against its budget); otherwise it is 0.
  Or ``(FAILED, None, error)`` if the request itself could not be read. The replies
  come in the order of the jobs.
* parent closes its end: the stop request. The worker sees EOF once its current call
  has returned, and returns.

An *error* is ``(exception, traceback_text)``, both picklable: an exception that does not
pickle is replaced by a ``pickle.PicklingError`` that names it. One that does travels
pickled on its own, inside the message, and is unpickled on its own: where the parent
can't unpickle it (its class lives in a module only the worker imports, or its
``__init__`` takes other arguments than it passes to ``BaseException``), it gets a
``pickle.PicklingError`` that names it and says why instead, the message itself still
unpickles, and only the call that raised it fails. (A call's result has no such
wrapper, so the ``ok`` reply of quick calls stays as cheap as it was: if a result can't
be unpickled, the reply can't, and the pool fails the job that reply answers.)
"""

from __future__ import annotations

__all__ = ("BATCH", "FAILED", "INIT_FAILED", "OK", "READY")

#: worker -> parent, first: the initializer ran; the worker takes requests.
READY = "ready"
#: worker -> parent, first: the initializer raised; the worker returns.
INIT_FAILED = "init-failed"
#: parent -> worker: several requests in one message, run in order.
BATCH = "batch"
#: worker -> parent: the reply to a job.
OK = "ok"
#: worker -> parent: a request (or its function) could not be read.
FAILED = "failed"
