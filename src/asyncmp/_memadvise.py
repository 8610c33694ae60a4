"""Memory advice for the buffer of a large message: transparent huge pages on Linux.

A body of :data:`asyncmp._wire.WHOLE_BODY_MIN` bytes or more is received into memory the
allocator has just mapped from the system, and the system hands out such memory a page
at a time, zeroed, on first write. With 4 KiB pages that is one page fault per 4 KiB:
for 64 MiB, 16,384 of them, which cost more than the copy out of the pipe itself.
Advising the range ``MADV_HUGEPAGE`` lets Linux back it with 2 MiB pages where its
transparent huge pages are set to ``madvise`` or ``always`` (most distributions): 32
faults for 64 MiB. A claimed size still costs nothing until it is written: a huge page is
committed only when the first byte of it arrives, so at most 2 MiB ahead of the bytes
received.

The advice belongs to this process's own mapping of its own memory: no other process
sees it, and it ends when the memory is freed. Where it can't be given (another system,
no ``ctypes``, a kernel without transparent huge pages), :func:`advise_huge_pages` does
nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ("HugePages", "advise_huge_pages")

#: Where a view's huge pages begin, and their size: ``(offset of the first huge page
#: boundary in the view, huge page size)``. Boundaries are a huge page size apart.
HugePages = tuple[int, int]


def _nothing(view: memoryview) -> HugePages | None:
    del view
    return None


def _huge_page_size() -> int:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 << 20  # x86-64's, and ARM's with 4 KiB pages


def _linux_advice() -> Callable[[memoryview], HugePages | None]:
    try:
        import ctypes
        import mmap

        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (ImportError, OSError, AttributeError):
        return _nothing
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    hugepage = getattr(mmap, "MADV_HUGEPAGE", 14)
    page = mmap.PAGESIZE
    address_of = ctypes.addressof
    char_at = ctypes.c_char.from_buffer

    huge = _huge_page_size()

    def advise(view: memoryview) -> HugePages | None:
        anchor = char_at(view)  # holds an export of *view* until it is deleted
        address = address_of(anchor)
        del anchor
        # Only the whole pages inside the view: the memory around it is not ours.
        start = -(-address // page) * page
        end = (address + view.nbytes) // page * page
        if end <= start or madvise(start, end - start, hugepage) != 0:
            return None
        return -address % huge, huge

    return advise


_advise: Callable[[memoryview], HugePages | None] | None = None


def advise_huge_pages(view: memoryview) -> HugePages | None:
    """Advise that the writable *view*'s memory be backed by huge pages. Best effort.

    Returns where the view's huge pages begin and their size (:data:`HugePages`), or
    None if no advice was given. A reader that writes into
    at most one huge page per read bounds what one read costs: the system zeroes a whole
    huge page when its first byte is written, and on a virtual machine whose host has not
    backed that memory yet, that takes milliseconds.

    The first call loads ``ctypes`` (not every program receives a large message).
    """
    global _advise
    if _advise is None:
        _advise = _linux_advice() if sys.platform == "linux" else _nothing
    return _advise(view)
