"""The fd route of an AsyncQueue's gets (POSIX ``Queue``, ``JoinableQueue``, ``SimpleQueue``).

1. Wait until the pipe is readable, through the helper descriptor of ``_core.readiness`` (never
   touching the pipe's flags, which every worker shares).
2. Take the reader lock (:mod:`.rlock`): without blocking, or, once contended,
   queued in the kernel from a kept thread.
3. Read *exactly* one frame (the frame engine's ``ExactReader``): ``FIONREAD`` says what
   is there, the decoder says what the frame still needs, and nothing past it is read,
   because the next frame belongs to whoever takes the lock next. Once the first byte of
   a frame is consumed, the frame must be finished before the lock is let go, or the next
   reader would start mid-frame. A get waits for the rest, each wait bounded by
   ``stall_timeout`` without progress (a producer that died mid-put). If it is cancelled
   meanwhile it returns at once, and a kept thread finishes the frame in the background
   (the same bound), lets go of the lock as soon as the frame is whole, and leaves the
   frame for the next ``get`` (or for :meth:`AsyncQueue.aclose` to put back).
4. Let go of the lock, release the item semaphore (as ``Queue.get`` does), and unpickle
   outside the lock (the facade does).
"""

from __future__ import annotations

import pickle
import queue
import sys
from collections import deque
from typing import TYPE_CHECKING, Any, NoReturn

import anyio
from anyio.lowlevel import checkpoint

from .._core.frames import ExactReader, exact_reader, stalled
from .._core.loop import FairLock, fast_checkpoint
from .._core.mpinternals import QueueParts
from .._core.threads import BlockingCall, KeptThread, run_blocking
from .rlock import ReaderLock
from .state import QueueState

if TYPE_CHECKING or sys.platform != "win32":
    from .._core.readiness import ReadinessWaiter, poller
    from .._core.transport import FdTransport, open_transport

__all__ = ("FdGetter", "finish_in_thread", "unpickle_frame")

#: A frame's payload back into the object put (what ``Queue.get`` does after reading).
unpickle_frame = pickle.loads


class FdGetter:
    """The gets of the fd route: raw frames, read exactly, under the reader lock.

    ``kept`` holds frames taken whole but not handed out yet (a ``get_many``'s after one
    that failed to unpickle), for the next gets. ``_finishing`` is the background read of
    the frame a cancelled get left half read: while it runs, the reader and the reader
    lock are its thread's, and the next get waits for its frame (after ``kept``).
    """

    uses_threads = False

    def __init__(self, parts: QueueParts, state: QueueState) -> None:
        self._state = state
        self._sem = parts.sem
        #: Serialises this adapter's gets, first come, first served.
        self.get_lock = FairLock()
        self.kept: deque[bytes] = deque()
        self._fd = parts.reader.fileno()
        #: The pipe's byte mover: this adapter's, closed with it.
        self.transport: FdTransport = open_transport(self._fd)
        #: The frame engine's exact reader: never past the frame in progress.
        self.reader = exact_reader(self.transport)
        self.rlock = ReaderLock(parts.rlock, self._in_use)
        self._waiter: ReadinessWaiter | None = None
        #: get() may try take_whole_frame(): open and not broken.
        self.fast = True
        #: Finishes, in the background, the frame a cancelled get left half read.
        self._finishing: BlockingCall[bytes] | None = None
        self._finisher = KeptThread("asyncmp-queue-finish")

    def _in_use(self) -> bool:
        finishing = self._finishing is not None
        return finishing or self.get_lock.locked() or not self.reader.at_boundary

    def held(self) -> int:
        """Items taken from the queue that the next gets return first."""
        call = self._finishing  # finished, not collected: the loop may not have heard yet
        finished = call is not None and call.finished and call.error is None
        return len(self.kept) + finished

    # -- the fast path ------------------------------------------------------------------

    def may_take_fast(self) -> bool:
        """Whether ``get()`` may try :meth:`take_whole_frame` before anything else: open,
        not broken, and the reader lock not kept for a get in progress (won in a queue
        against other consumers: the loop's turn the fast path may take would let it go,
        a deferred release, and the consumers queued in the kernel would take it back
        every time)."""
        return self.fast and not self.rlock.held

    def take_whole_frame(self) -> bytes | None:
        """An item's frame if one is here whole, else None.

        Never waits. It takes the item only when no other task of this adapter is in a
        ``get`` (they come first), the reader lock is free, and the whole frame is in the
        pipe (the exact reader's :meth:`~ExactReader.take_whole`: two reads of the pipe's
        own read end, else ``FIONREAD`` first). Anything else (a partial frame, a long
        header, contention) is left to the full path.
        """
        if self.get_lock.locked():
            return None
        if self.kept:
            return self.kept.popleft()
        rlock = self.rlock
        if not rlock.take_nowait():
            return None
        reader = self.reader
        body = reader.take_whole()
        if body is not None:
            return self._took(body)
        if reader.at_boundary and not rlock.contended:  # nothing read
            rlock.release()
        # else: the lock stays ours, mid-frame (or queued for, as contended consumers
        # keep it while they wait): the full path goes on from here.
        return None

    def _took(self, frame: bytes) -> bytes:
        """A whole item was read: let go of the lock and count it, as ``Queue.get`` does."""
        self.rlock.item_done()
        if self._sem is not None:
            self._sem.release()
        return frame

    # -- the full path ------------------------------------------------------------------

    async def get(self) -> Any:
        """The next item, waiting for it. Called with the get lock held."""
        return unpickle_frame(await self.get_frame())

    def after_get(self) -> None:
        """A get ended (its get lock released). The reader lock is kept past a get only
        until the loop's next turn: a deferred release that found this get (or any get)
        in progress left the lock to it; if it ends without reading (cancelled while
        queued on the get lock, say), the release is due again now.

        A get that ended in the middle of a frame (cancelled) leaves the rest of it to a
        thread, unless another get of this adapter goes on with it now."""
        if self._finishing is not None or not self.rlock.held:
            return
        if self.reader.at_boundary:
            self.rlock.release_soon()
        elif not self.get_lock.locked() and not self._state.closed:
            self._finish_in_background()

    def _finish_in_background(self) -> None:
        """Hand the frame in progress, and the reader lock, to a kept thread that reads
        the rest (each wait for more bytes bounded by ``stall_timeout``) and lets go of the
        lock as soon as the frame is whole, or given up on: whether or not this adapter
        ever gets again, and even if the event loop has ended by then. The frame waits
        for :meth:`_collect`. Never waits: for a get on its way out of a cancellation."""
        reader, lock, sem = self.reader, self.rlock.lock, self._sem
        readable = poller(self._fd, writable=False)
        stall = self._state.stall_timeout

        def finish(call: BlockingCall[bytes]) -> bytes:
            try:
                frame = reader.read_blocking(readable, stall)
            except BaseException:
                reader.reset()  # given up on, as a get does: the queue is broken
                lock.release()
                raise
            lock.release()
            if sem is not None:
                sem.release()  # as Queue.get does once it has read an item
            return frame

        # Kept in the adapter's calls: aclose() waits for it.
        self._finishing = self._state.calls.start_now(
            finish, name="asyncmp-queue-finish", worker=self._finisher
        )

    def _collect(self, *, closing: bool = False) -> bool:
        """Take the background read's outcome once it has finished: its frame goes to
        ``kept``; a producer that stopped mid-item breaks the queue. Outside a loop too.
        Once the adapter is closed, only aclose() collects it (*closing*), to put it back.
        Returns False while the read is still to be collected."""
        call = self._finishing
        if call is None:
            return True
        if not call.finished or (self._state.closed and not closing):
            return False
        self._finishing = None
        self._state.calls.forget(call)
        self.rlock.released_elsewhere()
        try:
            frame = call.result()
        except anyio.BrokenResourceError as exc:
            self.fast = False
            self._state.broken = str(exc)
            return True
        self.kept.append(frame)
        return True

    async def _await_finishing(self) -> None:
        """Wait for the background read (if cancelled, it goes on), then collect it.

        :raises anyio.BrokenResourceError: its producer stopped mid-item."""
        call = self._finishing
        if call is not None and not call.finished:
            await call.wait()
        self._state.check_open()  # closed meanwhile: aclose() puts the item back
        self._collect()
        self._state.check_open()

    async def get_frame(self) -> bytes:
        """The next frame, waiting for it. Called with the get lock held."""
        await fast_checkpoint()
        if self.kept:
            return self.kept.popleft()
        if self._finishing is not None:
            await self._await_finishing()
            if self.kept:
                return self.kept.popleft()
        rlock = self.rlock
        reader = self.reader
        while True:
            self._state.check_open()
            if not rlock.held:
                if not rlock.contended and reader.available() == 0:
                    await self._wait_readable()
                    self._state.check_open()  # closed as it woke: the transport's fd is -1
                    if reader.available() == 0:
                        # Readable, yet empty: another consumer took the item first.
                        # That is contention too; from now on queue for the lock.
                        rlock.contended = True
                    continue
                if not rlock.take_nowait():
                    # Another consumer holds the lock: queue for it in the kernel, as a
                    # sync consumer does. Waiting for data first would lose every item
                    # to a sync consumer that waits for data while holding the lock.
                    await rlock.take_contended(self._state)
            frame = self._read_available()
            if frame is not None:
                return frame
            if not reader.at_boundary:
                return await self._finish_frame()
            if rlock.contended:
                # Our turn, won in a queue: keep the lock and wait for the item, as the
                # sync consumer behind us would.
                try:
                    await self._wait_readable()
                except BaseException:
                    rlock.release()
                    raise
                continue
            # Somebody else took the item between readiness and the lock.
            rlock.release()

    def _read_available(self) -> bytes | None:
        """With the lock held: read no further than one frame; return it if whole."""
        try:
            frame = self.reader.read_available()
        except anyio.BrokenResourceError as exc:
            self._fail(str(exc))
        return None if frame is None else self._took(frame)

    async def _finish_frame(self) -> bytes:
        """Part of a frame is read and the lock is held: read the rest as it comes, each
        wait bounded by ``stall_timeout``. If cancelled, the part read stays in the reader,
        with the lock, and :meth:`after_get` leaves the rest to a thread."""
        stall_timeout = self._state.stall_timeout
        while True:
            with anyio.move_on_after(stall_timeout):
                await self._wait_readable()
                frame = self._read_available()
                if frame is not None:
                    return frame
                await checkpoint()  # the read budget is spent: the loop's turn
                continue
            self._fail(str(stalled(stall_timeout, self.reader.decoder.buffered)))

    async def _wait_readable(self) -> None:
        if self._waiter is None:
            self._waiter = ReadinessWaiter(self._fd)
        await self._waiter.wait()

    def _fail(self, reason: str) -> NoReturn:
        self.fast = False
        self.rlock.release()
        self._state.fail(reason)

    # -- without waiting ----------------------------------------------------------------

    def get_nowait(self) -> Any:
        """The next item if one is here whole now (see :meth:`get_frame_nowait`), unless
        another get of this adapter waits (it comes first).

        :raises queue.Empty: none is, or a get waits."""
        if self.get_lock.locked():
            raise queue.Empty
        return unpickle_frame(self.get_frame_nowait())

    def get_more(self, items: list[Any], limit: int) -> None:
        """``get_many``: append up to *limit* items that are here whole, never waiting. If
        one fails to unpickle, it and those after it are kept; the next get raises."""
        frames = self.take_whole_frames(limit)
        for i, frame in enumerate(frames):
            try:
                items.append(unpickle_frame(frame))
            except Exception:
                self.kept.extendleft(reversed(frames[i:]))
                break

    def get_frame_nowait(self) -> bytes:
        """The next frame if one is here whole now. Outside a running loop too.

        :raises queue.Empty: none is, or the reader lock is held elsewhere.
        :raises anyio.BrokenResourceError: the background read of a cancelled get's item
            found that its producer stopped mid-item.
        """
        if self.kept:
            return self.kept.popleft()
        if self._finishing is not None:
            if not self._collect():
                raise queue.Empty  # the rest of the item is still to come
            self._state.check_open()
            if self.kept:
                return self.kept.popleft()
        rlock = self.rlock
        if not rlock.held and (self.reader.available() == 0 or not rlock.take_nowait()):
            raise queue.Empty
        frame = self._read_available()
        if frame is None:
            if self.reader.at_boundary:
                rlock.release()
            # else: a producer is mid-write; the lock and the partial item stay with
            # this adapter and the next get() finishes them.
            raise queue.Empty
        return frame

    def take_whole_frames(self, limit: int) -> list[bytes]:
        """Up to *limit* frames that are already in the pipe whole, under one hold of the
        reader lock, with one ``FIONREAD`` (never waits)."""
        frames: list[bytes] = []
        kept = self.kept
        self._collect()
        while kept and len(frames) < limit:
            frames.append(kept.popleft())
        state, rlock, reader = self._state, self.rlock, self.reader
        if len(frames) == limit or state.closed or state.broken is not None:
            return frames
        if self._finishing is not None:
            return frames  # the next item is a cancelled get's, still being read
        if self.get_lock.locked() or not reader.at_boundary:
            return frames  # other getters come first / a partial item is the next get's
        if not rlock.held and not rlock.take_nowait():
            return frames
        avail = reader.available()
        taken = 0
        while len(frames) < limit:
            body = reader.read_whole(avail)
            if body is None:
                break  # a partial item stays with the lock, for the next get()
            avail -= 4 + len(body)
            frames.append(body)
            taken += 1
        if reader.at_boundary:
            rlock.item_done()
        if self._sem is not None:
            for _ in range(taken):
                self._sem.release()
        return frames

    # -- closing ------------------------------------------------------------------------

    def stop(self) -> None:
        """First step of closing: no more fast path, no more waiting for readiness."""
        self.fast = False
        if self._waiter is not None:
            self._waiter.close()

    async def aclose(self) -> bytes | None:
        """Once the calls have returned: end the kept threads, finish an item begun
        under the reader lock (see :meth:`_finish_partial`), and let go of the lock and
        the transport. Returns the item's frame to put back, if any."""
        for thread in (self.rlock.close(), self._finisher.close()):
            if thread is not None:
                thread.join()  # its calls have returned: it is on its way out
        frame = await self._finish_partial()
        self.rlock.release()
        self.transport.close()
        return frame

    async def _finish_partial(self) -> bytes | None:
        """If this adapter holds the reader lock in the middle of a frame (a get_many() or
        get_nowait() read into an item a producer is still writing), finish it in a
        thread and return it; then let go of the lock (see ``finish_in_thread``).

        The item a cancelled get left to the background read (finished by now: the calls
        have returned), which no get took, is returned too. Either is taken as a get takes
        an item, its slot let go; the put-back takes a slot again."""
        call = self._finishing
        if call is not None:
            await call.wait()
            kept = len(self.kept)
            self._collect(closing=True)
            if len(self.kept) == kept:
                return None  # its producer stopped mid-item: lost, and the queue broken
            return self.kept.pop()  # (its slot was let go once it was whole)
        if self.reader.at_boundary or not self.rlock.held:
            return None
        frame = await finish_in_thread(self.reader, self._fd, self._state)
        self.rlock.release()
        if frame is not None and self._sem is not None:
            self._sem.release()  # taken whole, as Queue.get counts it
        return frame


async def finish_in_thread(reader: ExactReader, fd: int, state: QueueState) -> bytes | None:
    """Finish *reader*'s frame in a thread (each wait for more bytes bounded by
    ``stall_timeout``) and return it; None if it did not come, and the queue is broken.
    The reader is at a frame boundary again either way. Not cancellable: for aclose()."""
    stall = state.stall_timeout
    readable = poller(fd, writable=False)
    call = await run_blocking(
        lambda c: reader.read_blocking(readable, stall), name="asyncmp-queue-finish"
    )
    reader.reset()
    try:
        return call.result()
    except anyio.BrokenResourceError as exc:
        state.broken = str(exc)
        return None
