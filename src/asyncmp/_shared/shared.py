"""``shared(obj)``: large buffers cross processes through shared memory, mapped on receipt.

Pickling the wrapper
--------------------
:func:`shared` returns a wrapper whose ``__reduce_ex__`` pickles the object with
protocol 5, whatever protocol the outer pickler uses (``Connection.send``, a Queue's
feeder thread and asyncmp all use ``ForkingPickler``). Every out-of-band buffer
(``pickle.PickleBuffer``, which numpy arrays and others hand out) of at least
:data:`SHARED_THRESHOLD` bytes (1 MiB) is copied into one POSIX shared memory segment
per message; smaller ones, and objects without any, stay in the pickle (in-band). An
object that exports a buffer smaller than that (a small numpy array) is handed back to
the outer pickler as it is, so a small message costs what plain pickling costs. What
the outer pickle carries is the segment's name, its size, where each buffer lies in it,
and the protocol-5 pickle of the rest. Unpickling it, anywhere, maps the segment and
unpickles the object with those buffers, views of the mapping: the object itself, not
the wrapper, and nothing copied.

Lifetime: who unlinks a segment
-------------------------------
A name in ``/dev/shm`` outlives every process unless somebody unlinks it, and a mapping
outlives its name. So:

* **The receiver unlinks the name as soon as it has mapped it.** From then on the
  segment lives exactly as long as the mapping, which lives as long as the last object
  that uses one of its buffers (a memoryview keeps its ``mmap``, which unmaps when it is
  garbage-collected). A receiver that is killed while using the data loses its mapping
  with its address space: nothing is left.
* **A message that is never received** (the pipe closed with it inside, a sender killed
  after sending, a receiver that never reads) is cleaned up by ``multiprocessing``'s
  resource tracker: the sender registers the name with it *before* creating the
  segment, and the receiver unregisters it right after unlinking it. The tracker is one
  process for the whole program (spawned and forkserver children inherit it; this
  module starts it before a fork, so forked children share their parent's too), it
  survives the SIGKILL of any process that uses it, and when the program ends it
  unlinks what is still registered. (This module also holds the tracker's lock across
  every fork: see the fork hooks at the end.) It would also warn there about "leaked
  shared_memory objects": a message that was never received *is* one.
* **The resource tracker's trap** (the stdlib's ``SharedMemory`` registers a segment in
  every process that attaches to it, and the first of those to exit unlinks it under the
  others' feet) does not arise: only the sender registers, and the receiver, the only
  process that maps the segment, unlinks it itself. A receiver unregisters only with the
  tracker the sender registered with (the reference carries its identity); a receiver
  outside the program (a process that multiprocessing did not start) leaves the entry,
  and the tracker's cleanup at the end then finds the name already gone.

The receiver's buffers
----------------------
The receiver maps the segment copy-on-write (``MAP_PRIVATE``): its reads see the
segment's pages, and its first write to a page copies that page into memory of its own,
which the segment never sees. Nothing writes to a segment once its sender has filled it
(the sender keeps no mapping; on receipt the name is gone), so the buffers behave as
memory the receiver allocated itself, across a fork too: a child forked from the
receiver gets them copy-on-write, as the rest of its parent's memory, and neither sees
the other's writes. (A shared mapping would be shared with every child forked from then
on, both ways.) Reading costs the same either way. The first write to a page costs a
copy of it (a pass that writes a whole received array takes about ten times as long as
one over memory the process owns), and the page is then held twice (the segment's and
the copy) until the object is freed.

macOS maps a POSIX shared memory object only shared: there the receiver's writes go to
the segment, which no other process maps, but a child forked from the receiver shares
the buffers with it (fork is not macOS's default start method, nor a safe one).

Filling a segment
-----------------
On Linux the sender writes the buffers into the segment with ``pwrite`` rather than
through a mapping: ``/dev/shm`` is a tmpfs, and a write to it that finds no room fails
with ``ENOSPC`` (turned into :class:`~asyncmp.SharedMemoryError`), where a store into a
mapping would kill the process with SIGBUS. Every byte the receiver reads was written,
so it never touches a page that doesn't exist. Elsewhere (macOS, where a shared memory
object can only be mapped) the segment is sized with ``ftruncate`` and filled through a
mapping.

Names are ``/asyncmp-``, six hex digits that every process of one program shares (from
its resource tracker's identity: a listing of ``/dev/shm`` tells one program's segments
from another's), a dash and 12 random hex digits: 28 characters, within macOS' limit of 31.
Unpickling accepts no other name, checks the sizes against the segment before it maps
anything, and maps only the size the reference states.

Windows has no POSIX shared memory: there a shared object is pickled in-band, as
without ``shared()`` (protocol 5, so buffers are still pickled without an extra copy).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import pickle
import re
import secrets
import sys
import threading
import zlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, Generic, TypeVar

from .._core.exceptions import SharedMemoryError
from .._core.mpinternals import resource_tracker_id, resource_tracker_lock, shm_calls

__all__ = (
    "NAME_PREFIX",
    "SHARED_THRESHOLD",
    "SegmentsMade",
    "Shared",
    "program_tag",
    "refusing",
    "shared",
)

T = TypeVar("T")

#: Out-of-band buffers of at least this many bytes go into shared memory; smaller ones
#: stay in the pickle. Making a segment costs a fixed few hundred microseconds (a name,
#: the resource tracker told twice, a mapping), and its fresh pages cost more per byte
#: than a pipe: below about a megabyte, pickling through the pipe is as fast or faster
#: (measured by the benchmarks' large-array section).
SHARED_THRESHOLD = 1024 * 1024
#: Every segment's name is this, then the program's tag, a dash and 12 random hex digits
#: (``/dev/shm/asyncmp-...`` on Linux).
NAME_PREFIX = "asyncmp-"
_NAME = re.compile(r"/asyncmp-[0-9a-f]{6}-[0-9a-f]{12}\Z")
#: Each buffer starts at a multiple of this in its segment (what numpy and SIMD expect).
_ALIGN = 64
#: The most one ``pwrite`` moves on Linux.
_MAX_WRITE = 0x7FFFF000

#: ``(shm_open, shm_unlink)``; None where there is no POSIX shared memory (Windows), and
#: then a shared object is pickled in-band. Tests set it to None to run Windows' path.
SHM: tuple[Any, Any] | None = shm_calls()
#: Fill a segment with ``pwrite`` (Linux: ENOSPC rather than SIGBUS when ``/dev/shm`` is
#: full) or through a mapping (macOS, where shared memory objects can't be written to).
FILL_BY_WRITE: bool = sys.platform == "linux"
#: Map a received segment copy-on-write (``MAP_PRIVATE``), so that the receiver's buffers
#: are its own as any memory it allocated would be (see "The receiver's buffers" above).
#: macOS maps a POSIX shared memory object only ``MAP_SHARED`` (its kernel refuses any
#: other mapping of one with EINVAL): there the receiver maps it shared.
MAP_COPY: bool = sys.platform != "darwin"

#: Why shared references are refused in this context (a connection to another machine),
#: or None where they are fine.
_refusal: ContextVar[str | None] = ContextVar("asyncmp_shared_refusal", default=None)


@contextlib.contextmanager
def refusing(reason: str) -> Iterator[None]:
    """Within this block (in this context), pickling or unpickling a shared object raises
    :class:`SharedMemoryError` with *reason*."""
    token = _refusal.set(reason)
    try:
        yield
    finally:
        _refusal.reset(token)


class _Recording(threading.local):
    """Per thread: the list that :class:`SegmentsMade` collects this thread's new segments
    in, or None. Per thread, because another thread (a Queue's feeder) may be pickling
    shared objects of its own at the same moment."""

    def __init__(self) -> None:
        self.segments: list[tuple[str, int]] | None = None
        self.standing: SegmentsMade | None = None


_recording = _Recording()


class SegmentsMade:
    """The segments that pickling makes in this thread within a ``with`` block: their
    names and sizes, to count the shared memory a pickle holds or to take back those of a
    pickle that will not be sent (it failed half-way, or is made again another way)::

        made = SegmentsMade()
        try:
            with made:
                data = dumps(obj)
        except Exception:
            made.discard()  # what the pickle made before it failed
            raise

    Blocks don't nest: an inner one hides the segments it records from an outer one.
    A process that pickles what it sends in one thread (a pool's worker) can keep one
    standing record there instead, cheaper than a block per pickle: :meth:`standing`.
    """

    __slots__ = ("_outer", "segments")

    def __init__(self) -> None:
        #: ``(name, size)`` of each segment made, in order.
        self.segments: list[tuple[str, int]] = []
        self._outer: list[tuple[str, int]] | None = None

    def __enter__(self) -> SegmentsMade:
        self._outer = _recording.segments
        _recording.segments = self.segments
        return self

    def __exit__(self, *exc_info: object) -> None:
        _recording.segments = self._outer

    @classmethod
    def standing(cls) -> SegmentsMade:
        """This thread's standing record, entered at the first call and never left: it
        collects every segment made in this thread outside other blocks. Clear its
        ``segments`` before the pickle it is to record."""
        made = _recording.standing
        if made is None:
            made = _recording.standing = cls()
            _recording.segments = made.segments
        return made

    @property
    def nbytes(self) -> int:
        """The bytes of shared memory the segments made hold."""
        return sum(size for _, size in self.segments)

    def discard(self) -> None:
        """Unlink the segments made that are still there, and tell the resource tracker,
        as a receiver would: for a pickle that no process will receive (never sent, or
        sent to a receiver that is gone). A segment already gone was received, and its
        receiver told the tracker. Never raises."""
        segments = list(self.segments)
        self.segments.clear()
        if SHM is None:
            return
        _, shm_unlink = SHM
        for name, _ in segments:
            try:
                shm_unlink(name)
            except FileNotFoundError:
                continue
            except OSError:
                pass
            with contextlib.suppress(Exception):
                _unregister(name)


class Shared(Generic[T]):
    """What :func:`shared` returns: pickles *obj* with its large buffers in shared memory.

    It has no other use: keep the object itself for anything but sending.
    """

    __slots__ = ("obj",)

    def __init__(self, obj: T) -> None:
        self.obj = obj

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return reduce_shared(self.obj)

    def __repr__(self) -> str:
        return f"asyncmp.shared({self.obj!r})"


def shared(obj: T) -> T:
    """Wrap *obj* so that pickling it puts its large buffers into shared memory.

    Send the result where you would send *obj*: ``Connection.send``, ``Queue.put``,
    ``SimpleQueue.put``, asyncmp's ``send`` and ``put``, a pool's arguments and results.
    The receiver gets *obj* itself (not a wrapper), its buffers of at least
    :data:`SHARED_THRESHOLD` bytes (1 MiB) mapped from shared memory, not copied: a
    numpy array arrives with ``flags.owndata == False``. They are mapped copy-on-write
    (except on macOS), so they are the receiver's own: its writes, and those of a child
    it forks, reach nobody else; the first write to each page copies the page. The
    segment is freed once the receiver has dropped the last object that uses it, or, for
    a message never received, when the program ends.

    Only out-of-band buffers go there: the ``pickle.PickleBuffer`` objects that numpy
    arrays (and pandas and pyarrow objects built on them) hand pickle under protocol 5.
    The rest of *obj*, and smaller buffers, are pickled as usual. So:

    - An object with nothing to share is returned as it is, and costs exactly what it
      costs without ``shared()``: a number, a string, ``None``, and an object that
      exports a buffer smaller than the threshold (a small numpy array, small ``bytes``).
      Anything else is wrapped; if its pickle holds no large buffer (a dict of
      strings), it is pickled in-band.
    - ``bytes``, ``bytearray`` and ``memoryview`` of at least the threshold are refused
      with ``TypeError``: pickle copies bytes into the message whatever their size (and
      can't pickle a memoryview), so nothing would be shared. To share raw bytes, send
      ``numpy.frombuffer(data, numpy.uint8)``: the receiver gets a read-only ``uint8``
      array mapped from the segment.

    Every pickling of the wrapper makes a new segment: send it once. The wrapper is not
    a *obj* (it is typed as one so that typed channels take it): use it only to send.

    On Windows the object is pickled in-band, as without ``shared()``.

    :raises TypeError: *obj* is ``bytes``, ``bytearray`` or a ``memoryview`` of at
        least :data:`SHARED_THRESHOLD` bytes.

    Pickling raises :class:`SharedMemoryError` when the segment finds no room (a full
    ``/dev/shm``), or on a connection to another machine (``connect()``, ``serve()``).
    """
    kind: type[object] = type(obj)
    if kind in _NOTHING_TO_SHARE:
        return obj
    if kind in _IN_BAND_BUFFERS:
        _refuse_if_large(obj)
    if _small_exporter(obj):
        return obj  # nothing of it would go into shared memory: no wrapper, no extra cost
    return Shared(obj)  # type: ignore[return-value]


#: Types of objects that hold no buffer to share: shared() returns them as they are.
_NOTHING_TO_SHARE = frozenset({type(None), bool, int, float, complex, str})
#: Buffers that pickle copies into the pickle whatever their size (a memoryview: can't
#: pickle at all), which shared() refuses when they are large.
_IN_BAND_BUFFERS = frozenset({bytes, bytearray, memoryview})


def _refuse_if_large(data: Any) -> None:
    """Raise ``TypeError`` if *data* (bytes, a bytearray or a memoryview) is large enough
    that the caller of ``shared()`` surely meant it to go into shared memory."""
    with memoryview(data) as view:
        size = view.nbytes
    if size < SHARED_THRESHOLD:
        return
    how = "can't pickle a memoryview" if type(data) is memoryview else "copies them in-band"
    raise TypeError(
        f"shared() can't share a {type(data).__name__} of {size} bytes: pickle {how}, so"
        " nothing would go into shared memory; send numpy.frombuffer(data, numpy.uint8),"
        " which arrives as a uint8 array mapped from shared memory, or send the data"
        " without shared()"
    )


# -- the sender's side --------------------------------------------------------------------


def reduce_shared(obj: Any) -> tuple[Any, ...]:
    """The reduction of ``shared(obj)``: in-band, or a reference to a new segment."""
    reason = _refusal.get()
    if reason is not None:
        raise SharedMemoryError(reason)
    if SHM is None:
        return (_same, (obj,))  # pickled in-band by the outer pickler
    if _small_exporter(obj):
        # The outer pickler pickles it, as without shared(): no trial pickling, and no
        # pickle nested in the pickle.
        return (_same, (obj,))
    big: list[memoryview] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        try:
            raw = buffer.raw()
        except BufferError:  # not contiguous: pickle knows how to keep it in-band
            return True
        if raw.nbytes < SHARED_THRESHOLD:
            raw.release()
            return True
        big.append(raw)
        return False

    data = pickle.dumps(obj, protocol=5, buffer_callback=out_of_band)
    if not big:
        return (_loads, (data,))
    try:
        layout: list[tuple[int, int, bool]] = []
        size = 0
        for raw in big:
            size = -(-size // _ALIGN) * _ALIGN
            layout.append((size, raw.nbytes, raw.readonly))
            size += raw.nbytes
        name = _create_segment(big, layout, size)
    finally:
        for raw in big:
            raw.release()
    return (_rebuild, (name, size, tuple(layout), resource_tracker_id(), data))


def _small_exporter(obj: Any) -> bool:
    """Whether *obj* exports a buffer (a numpy array, bytes...) smaller than the threshold.

    Its pickle then holds no buffer worth a segment (the buffers an object hands pickle
    are its own memory, or parts of it).
    """
    try:
        view = memoryview(obj)
    except (TypeError, ValueError, BufferError):  # no buffer, or one memoryview can't show
        return False
    with view:
        return view.nbytes < SHARED_THRESHOLD


def _same(obj: T) -> T:
    return obj


def _loads(data: bytes) -> Any:
    return pickle.loads(data)


def _register(name: str) -> None:
    from multiprocessing import resource_tracker

    resource_tracker.register(name, "shared_memory")


def _unregister(name: str) -> None:
    from multiprocessing import resource_tracker

    resource_tracker.unregister(name, "shared_memory")


def program_tag() -> str:
    """Six hex digits that every process of this program shares: they name its segments.

    They come from the identity of multiprocessing's resource tracker (started here if it
    isn't running: the segment is registered with it next anyway), which the processes of
    one program share and another program doesn't.
    """
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    return f"{zlib.crc32(repr(resource_tracker_id()).encode()) & 0xFFFFFF:06x}"


def _create_segment(
    buffers: list[memoryview], layout: list[tuple[int, int, bool]], size: int
) -> str:
    """A new segment of *size* bytes holding *buffers* where *layout* says; its name.

    The name is registered with the resource tracker first, so a sender killed from
    here on leaves nothing the tracker won't unlink.
    """
    assert SHM is not None
    shm_open, shm_unlink = SHM
    name = f"/{NAME_PREFIX}{program_tag()}-{secrets.token_hex(6)}"
    _register(name)
    try:
        fd = shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except BaseException:
        _unregister(name)
        raise
    try:
        try:
            _fill(fd, buffers, layout, size)
        finally:
            os.close(fd)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            shm_unlink(name)
        _unregister(name)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise SharedMemoryError(
                f"no room for a shared memory segment of {size} bytes ({exc.strerror}): "
                "/dev/shm is full or too small (containers often give it 64 MiB: raise it, "
                "e.g. docker run --shm-size=2g), or send without shared()"
            ) from exc
        raise
    recording = _recording.segments
    if recording is not None:
        recording.append((name, size))
    return name


def _fill(
    fd: int, buffers: list[memoryview], layout: list[tuple[int, int, bool]], size: int
) -> None:
    if FILL_BY_WRITE and sys.platform != "win32":  # (no pwrite on Windows)
        for raw, (offset, nbytes, _) in zip(buffers, layout, strict=True):
            done = 0
            while done < nbytes:
                done += os.pwrite(fd, raw[done : done + _MAX_WRITE], offset + done)
        os.ftruncate(fd, size)  # a last buffer already ends there; this sets nothing else
        return
    os.ftruncate(fd, size)
    with mmap.mmap(fd, size) as mapping:
        for raw, (offset, nbytes, _) in zip(buffers, layout, strict=True):
            mapping[offset : offset + nbytes] = raw  # raw() is bytes (format "B")


# -- the receiver's side ------------------------------------------------------------------


def _check_reference(name: object, size: object, layout: object) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise SharedMemoryError(f"{name!r} is not the name of an asyncmp shared memory segment")
    if type(size) is not int or size <= 0:
        raise SharedMemoryError(f"shared memory reference with invalid size {size!r}")
    if not isinstance(layout, tuple) or not layout:
        raise SharedMemoryError("shared memory reference without buffers")
    for entry in layout:
        if (
            not isinstance(entry, tuple)
            or len(entry) != 3
            or type(entry[0]) is not int
            or type(entry[1]) is not int
            or not isinstance(entry[2], bool)
            or entry[0] < 0
            or entry[1] < 0
            or entry[0] + entry[1] > size
        ):
            raise SharedMemoryError(
                f"shared memory reference with a buffer {entry!r} outside its {size} bytes"
            )


def _map(name: str, size: int) -> mmap.mmap:
    """Map segment *name*, *size* bytes of it (copy-on-write where :data:`MAP_COPY`),
    then unlink the name."""
    assert SHM is not None
    shm_open, shm_unlink = SHM
    try:
        fd = shm_open(name, os.O_RDWR, 0o600)
    except FileNotFoundError:
        raise SharedMemoryError(
            f"shared memory segment {name} does not exist: it was received already, or the "
            "message comes from another machine (shared memory only works between processes "
            "on one machine)"
        ) from None
    try:
        actual = os.fstat(fd).st_size
        if actual < size:
            raise SharedMemoryError(
                f"shared memory segment {name} holds {actual} bytes, fewer than the "
                f"{size} its reference claims"
            )
        # ACCESS_COPY is MAP_PRIVATE with PROT_READ | PROT_WRITE; ACCESS_WRITE MAP_SHARED.
        access = mmap.ACCESS_COPY if MAP_COPY else mmap.ACCESS_WRITE
        if sys.version_info >= (3, 13):
            # Without a descriptor of its own: the mapping alone keeps the segment.
            mapping = mmap.mmap(fd, size, access=access, trackfd=False)
        else:  # the mmap keeps a duplicate of fd until it is garbage-collected
            mapping = mmap.mmap(fd, size, access=access)
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        shm_unlink(name)
    return mapping


def _rebuild(
    name: str, size: int, layout: tuple[tuple[int, int, bool], ...], tracker: Any, data: bytes
) -> Any:
    """Unpickle what ``shared(obj)`` pickled: *obj*, its buffers views of the segment."""
    reason = _refusal.get()
    if reason is not None:
        raise SharedMemoryError(reason)
    if SHM is None:
        raise SharedMemoryError("this platform has no POSIX shared memory")
    _check_reference(name, size, layout)
    mapping = _map(name, size)
    if tracker is not None and tracker == resource_tracker_id():
        _unregister(name)
    whole = memoryview(mapping)
    buffers = [
        whole[offset : offset + nbytes].toreadonly()
        if readonly
        else whole[offset : offset + nbytes]
        for offset, nbytes, readonly in layout
    ]
    whole.release()
    # From here the mapping lives as long as a view of it does: the object's buffers.
    return pickle.loads(data, buffers=buffers)


# -- one resource tracker for the whole program, and forks ----------------------------------
#
# Two things make a fork hazardous for shared memory, and the hooks below deal with both:
#
# * A child forked before any tracker runs would start one of its own at its first send,
#   which ends with the child and unlinks what it sent before the parent has received it.
#   So the tracker is started before the fork.
# * The tracker's lock. ``ensure_running()`` takes it on every register and unregister, so
#   a thread of the parent that sends or receives a shared object (a Queue's feeder thread
#   pickling one) holds it often. A child forked at such a moment inherits it locked, and
#   no thread of the child will ever unlock it: the child's first register or unregister
#   (receiving its pool call's shared argument) hangs for good. So the forking thread takes
#   the lock before the fork, waiting for whoever holds it to finish (a probe of the
#   tracker's pipe, at most the start of the tracker), and lets it go after: in the parent
#   it releases it; in the child, the only thread left, it gives the lock a fresh state
#   (``_at_fork_reinit``, which is what CPython does with its own locks after a fork; a
#   release could meet the lock's internal mutex locked by another thread of the parent
#   at the moment of the fork), held as many times as the forking thread held it itself.
#   CPython (3.10 to 3.13, read) does nothing of the kind: the lock is a ``Lock`` on
#   3.10 and an ``RLock`` from 3.11, and no fork hook resets it.
#
# A thread that forks while it holds the lock itself (a signal handler or a finalizer
# that forks from inside ``ensure_running``) takes an ``RLock`` once more, and the child
# holds it as that thread did. 3.10's plain ``Lock`` can't be taken twice: such a fork
# deadlocks there, as it always could in ``_start_tracker_before_fork`` when no tracker
# ran yet.

#: The threads that hold the tracker's lock for a fork under way: thread id -> lock.
_held_for_fork: dict[int, Any] = {}


def _start_tracker_before_fork() -> None:
    """Start the resource tracker before a fork if none runs, so that the child reports
    to this process's tracker rather than starting one of its own, which would end with
    it and unlink what it sent before the parent has received it."""
    if SHM is None or resource_tracker_id() is not None:
        return
    from multiprocessing import resource_tracker

    with contextlib.suppress(Exception):
        resource_tracker.ensure_running()


def _before_fork() -> None:
    _start_tracker_before_fork()
    lock = resource_tracker_lock()
    if lock is None:
        return
    lock.acquire()  # waits for another thread's register, unregister or start to end
    _held_for_fork[threading.get_ident()] = lock


def _after_fork_in_parent() -> None:
    lock = _held_for_fork.pop(threading.get_ident(), None)
    if lock is not None:
        lock.release()


def _after_fork_in_child() -> None:
    # The child's one thread is the one that forked, under the same id.
    lock = _held_for_fork.pop(threading.get_ident(), None)
    if lock is None:
        return
    reinit = getattr(lock, "_at_fork_reinit", None)
    if reinit is None:
        lock.release()
        return
    count = getattr(lock, "_recursion_count", lambda: 1)()  # an RLock: ours, and any before
    reinit()
    for _ in range(count - 1):
        lock.acquire()


if sys.platform != "win32":
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
