"""Child-process targets and helpers for the shared-memory tests (``asyncmp.shared``).

:class:`Blob` stands in for a numpy array (most tests need no numpy): it hands pickle
protocol 5 its buffer out-of-band, as a ``pickle.PickleBuffer``, and is rebuilt around
whatever buffer the unpickler gives it, so a test can see whether that buffer is a view
of shared memory (:func:`mapped`) or a copy.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import pickle
import signal
import sys
from typing import TYPE_CHECKING, Any

import asyncmp
from asyncmp._shared import shared as _shared

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

#: Where Linux keeps POSIX shared memory segments, by name.
SHM_DIR = "/dev/shm"
BIG = 1024 * 1024  # the threshold: the smallest buffer that goes into shared memory


class Blob:
    """A buffer pickled out-of-band under protocol 5 (and copied under older ones)."""

    def __init__(self, buf: Any, label: str = "") -> None:
        self.buf = buf
        self.label = label

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        if protocol >= 5:
            return (Blob, (pickle.PickleBuffer(self.buf), self.label))
        return (Blob, (bytes(self.buf), self.label))

    def digest(self) -> str:
        return hashlib.sha256(self.buf).hexdigest()


def make_blob(size: int = BIG, seed: int = 7) -> Blob:
    """A blob of *size* bytes whose contents depend on *seed*."""
    pattern = bytes((seed * 31 + i) % 251 for i in range(251))
    data = bytearray(pattern * (size // len(pattern) + 1))[:size]
    return Blob(data, label=f"seed {seed}")


def mapped(buf: Any) -> bool:
    """True if *buf* is a view of a memory mapping (shared memory), not a copy."""
    return isinstance(buf, memoryview) and isinstance(buf.obj, mmap.mmap)


def segments(*, every_program: bool = False) -> set[str]:
    """This program's asyncmp segments that exist now (by name, in ``/dev/shm``); with
    *every_program*, those of every program (another test run on the machine, a program
    a test runs)."""
    prefix = "asyncmp-" if every_program else f"asyncmp-{_shared.program_tag()}-"
    return {n for n in os.listdir(SHM_DIR) if n.startswith(prefix)}


def mapping_modes() -> dict[str, str]:
    """The permissions of this process's mappings of asyncmp segments, by name, as
    ``/proc/self/maps`` shows them: ``rw-p`` is private (copy-on-write), ``rw-s`` shared."""
    found = {}
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "/asyncmp-" in line:
                name = "asyncmp-" + line.split("/asyncmp-")[1].split()[0]
                found[name] = line.split()[1]
    return found


def mapped_segments() -> set[str]:
    """asyncmp segments this process has mapped now (unlinked ones included)."""
    found = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "/asyncmp-" in line:
                found.add("asyncmp-" + line.split("/asyncmp-")[1].split()[0])
    return found


# -- child targets -----------------------------------------------------------------------


def send_shared(conn: Connection, size: int, seed: int) -> None:
    """Send ``shared(make_blob(size, seed))`` on *conn*, then close it."""
    with conn:
        conn.send(asyncmp.shared(make_blob(size, seed)))


def put_shared(q: Any, size: int, seed: int) -> None:
    """Put ``shared(make_blob(size, seed))`` on *q* (the feeder thread pickles it)."""
    q.put(asyncmp.shared(make_blob(size, seed)))
    close = getattr(q, "close", None)
    if close is not None:  # a Queue: flush the feeder before the process ends
        close()
        q.join_thread()


def send_then_wait_to_die(conn: Connection, size: int, seed: int) -> None:
    """Send a shared blob, say so, then wait to be killed."""
    conn.send(asyncmp.shared(make_blob(size, seed)))
    conn.send("sent")
    signal.pause()


def receive_and_report(conn: Connection) -> None:
    """Receive one message; send back its digest, whether its buffer is mapped, and the
    segments that still exist by name."""
    with conn:
        blob = conn.recv()
        conn.send((blob.digest(), mapped(blob.buf), sorted(segments())))


def receive_and_hold(conn: Connection) -> None:
    """Receive a shared blob, report that it is mapped, then hold it until killed."""
    blob = conn.recv()
    conn.send((blob.digest(), mapped(blob.buf), sorted(mapped_segments())))
    signal.pause()


def forward_from_queue(q: Any, reply: Connection) -> None:
    """Take one blob with a plain ``get()``; send back its digest and whether it is mapped."""
    with reply:
        blob = q.get()
        reply.send((blob.digest(), mapped(blob.buf)))


def receive_then_send_shared(data: bytes, conn: Connection) -> None:
    """Receive the shared blob pickled in *data* (the resource tracker told it was received),
    send back its digest, then a shared blob of seed 16 (the tracker told of a new one)."""
    with conn:
        blob = pickle.loads(data)
        conn.send(blob.digest())
        conn.send(asyncmp.shared(make_blob(BIG, 16)))


def report_tracker_lock(conn: Connection) -> None:
    """Send how many times this process's thread holds the resource tracker's lock."""
    from multiprocessing import resource_tracker

    with conn:
        conn.send(resource_tracker._resource_tracker._lock._recursion_count())  # type: ignore[attr-defined]


def write_then_look_again(arr: Any, conn: Connection, parent_end: Connection) -> None:
    """In a forked child: write ``arr[0] = 999`` and send what this process reads there;
    then, told to look, send what it reads at ``arr[1]`` (its parent has written there).
    *parent_end* (the copy of the parent's end that the fork gave it) is closed first, so
    that the parent closing its end ends the wait."""
    parent_end.close()
    with conn:
        arr[0] = 999
        conn.send(int(arr[0]))
        conn.recv()
        conn.send(int(arr[1]))


def array_head(arr: Any) -> tuple[float, bool]:
    """For a pool: an array argument's first element, and whether it arrived mapped."""
    return float(arr[0]), not arr.flags.owndata


def blob_digest(blob: Blob) -> tuple[str, bool]:
    """For a pool: the digest of an argument, and whether it arrived mapped."""
    return blob.digest(), mapped(blob.buf)


def make_shared_blob(size: int, seed: int) -> Blob:
    """For a pool: a result that travels through shared memory."""
    return asyncmp.shared(make_blob(size, seed))


def shared_blob_or_lock(seed: int) -> Any:
    """For a pool's map: a shared blob of 2 MiB, or, for seed 6, a result that can't be
    pickled; small ints (seeds below 0) come back as they are."""
    import threading

    if seed < 0:
        return seed
    if seed == 6:
        return threading.Lock()
    return asyncmp.shared(make_blob(2 * BIG, seed))


_blobs: dict[int, Blob] = {}


def shared_4mib_blob(seed: int) -> Blob:
    """For a pool's map: a result of 4 MiB that travels through shared memory, quickly
    made (the blob is made once per worker and seed modulo 4; each pickle copies it into
    a new segment)."""
    blob = _blobs.get(seed % 4)
    if blob is None:
        blob = _blobs[seed % 4] = make_blob(4 * BIG, seed % 4)
    return asyncmp.shared(blob)


def digest_or_echo(item: Any) -> Any:
    """For a pool's map: a blob's digest (see :func:`blob_digest`), or the item itself."""
    return blob_digest(item) if isinstance(item, Blob) else item


_gate: tuple[Connection, Any, Any] | None = None


def install_gate(conn: Connection, release: Any, release_second: Any) -> None:
    """A pool's initializer: keep the test's pipe end and semaphores for :func:`gated`."""
    global _gate
    _gate = (conn, release, release_second)


def gated(item: Any, second: bool = False) -> Any:
    """For a pool: say ``("started", pid)`` on the test's pipe, wait for the test's
    release (on the second semaphore if *second*), then return what
    :func:`digest_or_echo` returns."""
    assert _gate is not None
    conn, release, release_second = _gate
    conn.send(("started", os.getpid()))
    if not (release_second if second else release).acquire(timeout=60):
        raise TimeoutError("the test never released the call")
    return digest_or_echo(item)


def _descendants(root: int) -> set[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(parents.get(pid, ()))
    return found


def live_segment_bytes() -> int:
    """The bytes of this program's shared memory segments that exist now: those in
    ``/dev/shm`` by name (not received yet) and those that this process or one of its
    descendants (pool workers) has mapped, counted once each."""
    sizes: dict[str, int] = {}
    prefix = f"asyncmp-{_shared.program_tag()}-"
    for name in os.listdir(SHM_DIR):
        if name.startswith(prefix):
            try:
                sizes[name] = os.stat(os.path.join(SHM_DIR, name)).st_size
            except FileNotFoundError:  # received meanwhile: then it is mapped
                pass
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/maps") as maps:
                lines = maps.read().splitlines()
        except OSError:
            continue
        for line in lines:
            if "/" + prefix not in line:
                continue
            name = prefix + line.split("/" + prefix)[1].split()[0]
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            sizes[name] = max(sizes.get(name, 0), end - start)
    return sum(sizes.values())


# A whole program, run with ``python -m tests.support.shared_workers ...``: workers send shared
# messages that nobody reads, then it ends; the test checks that nothing is left.
def _unread_program(start_method: str) -> None:
    import multiprocessing

    ctx: Any = multiprocessing.get_context(start_method)
    a, b = ctx.Pipe()
    q = ctx.Queue()
    sq = ctx.SimpleQueue()
    procs = [
        ctx.Process(target=send_shared, args=(b, BIG, 1)),
        ctx.Process(target=put_shared, args=(q, BIG, 2)),
        ctx.Process(target=put_shared, args=(sq, BIG, 3)),
    ]
    for p in procs:
        p.start()
    b.close()
    for p in procs:
        p.join()
    print(" ".join(sorted(segments())), flush=True)
    a.close()
    q.close()
    q.join_thread()


def send_tracker_then_shared(conn: Connection, size: int, seed: int) -> None:
    """Send the identity of this process's resource tracker, then a shared blob; exit."""
    from asyncmp._core.mpinternals import resource_tracker_id

    with conn:
        blob = asyncmp.shared(make_blob(size, seed))
        data = pickle.dumps(blob)  # the tracker runs once a segment was registered
        conn.send(resource_tracker_id())
        conn.send_bytes(data)


# A forked worker sends and exits before its parent, which never used the resource
# tracker, receives: the worker must report to its parent's tracker (started before the
# fork), not to one of its own that would unlink the segment when the worker ends.
def _late_receive_program() -> None:
    import multiprocessing

    from asyncmp._core.mpinternals import resource_tracker_id

    ctx: Any = multiprocessing.get_context("fork")
    r, w = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=send_tracker_then_shared, args=(w, BIG, 4))
    proc.start()
    w.close()
    proc.join()
    child_tracker = r.recv()
    blob = pickle.loads(r.recv_bytes())
    r.close()
    same = child_tracker is not None and child_tracker == resource_tracker_id()
    print("same-tracker", same, "mapped", mapped(blob.buf), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "late":
        _late_receive_program()
    else:
        _unread_program(sys.argv[1])
