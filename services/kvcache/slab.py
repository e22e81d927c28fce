"""Size-class (slab) allocator for a kvcache node's DRAM arena.

Pure bookkeeping: it hands out offsets inside one preallocated arena of `arena_bytes` (the arena
itself is a `kvtier.transport.base.Region` created elsewhere) and never touches the memory.

Layout. The arena is cut into fixed pages of `page_bytes` (64 MiB by default). A free page is
assigned to a size class on the first allocation that needs it, is carved into equal slots of
that class, and goes back to the free page pool the moment its last slot is freed, so another
class can reuse it.

Hot path. `alloc` and `free` are O(1): a class keeps a doubly linked list (index arrays) of its
pages that still have a free slot, a page keeps a stack of freed slot numbers plus a bump index
for never-used slots (so assigning a page costs O(1), not O(slots)), and a per-page array of
requested sizes (0 = free) catches double frees and foreign extents. The per-page arrays are
grown only when a page is assigned to a class with more slots than it ever had, then reused.

Not thread-safe: the node owns one allocator and calls it from its event loop.
"""

from __future__ import annotations

import array
import dataclasses

#: Every block capacity and offset is a multiple of this (O_DIRECT, RDMA and huge-page friendly).
BLOCK_ALIGN_BYTES = 4096
#: The largest block the allocator serves (when pages are at least this large).
MAX_BLOCK_BYTES = 64 << 20
#: Default page size: one page holds one 64 MiB block.
DEFAULT_PAGE_BYTES = 64 << 20

# Size classes: 4, 8, 12, 16 KiB, then four classes per doubling, 2^k * {1.25, 1.5, 1.75, 2}
# (jemalloc's spacing). Why: a block wastes less than one class step, which is under 4 KiB up to
# 16 KiB and under 20 % of its capacity above (capacity < 1.25 x request), for 52 classes from
# 4 KiB to 64 MiB. Powers of two alone would waste up to 50 % (a 33 MiB prompt in 64 MiB); eight
# steps per doubling would halve the waste but double the classes, and each class strands up to
# one partly used page, so more classes means more external fragmentation in a small arena.
_LINEAR_LIMIT_BYTES = 4 * BLOCK_ALIGN_BYTES
_LINEAR_LIMIT_LOG2 = _LINEAR_LIMIT_BYTES.bit_length() - 1
_STEPS_PER_DOUBLING = 4
_NO_PAGE = -1


def _class_index(nbytes: int) -> int:
    """Index of the smallest class holding `nbytes` (>= 1), by arithmetic: O(1), no search."""
    if nbytes <= _LINEAR_LIMIT_BYTES:
        return (nbytes + BLOCK_ALIGN_BYTES - 1) // BLOCK_ALIGN_BYTES - 1
    log2 = (nbytes - 1).bit_length() - 1  # 2**log2 < nbytes <= 2**(log2 + 1)
    steps = ((nbytes - 1) >> (log2 - 2)) + 1  # ceil(nbytes / step), in 5..8
    return 4 + _STEPS_PER_DOUBLING * (log2 - _LINEAR_LIMIT_LOG2) + steps - 5


def class_sizes(max_block_bytes: int = MAX_BLOCK_BYTES) -> tuple[int, ...]:
    """Capacities of all size classes up to `max_block_bytes`, ascending."""
    sizes = [units * BLOCK_ALIGN_BYTES for units in range(1, 5)]
    log2 = _LINEAR_LIMIT_LOG2
    while True:
        for steps in range(5, 9):
            size = steps << (log2 - 2)
            if size > max_block_bytes:
                return tuple(s for s in sizes if s <= max_block_bytes)
            sizes.append(size)
        log2 += 1


@dataclasses.dataclass(frozen=True, slots=True)
class Extent:
    """A block handed out by `SlabAllocator.alloc`.

    `offset` is relative to the arena start; `capacity` is the slot size of `size_class` (an index
    into `SlabAllocator.class_sizes`); `requested` is what the caller asked for (<= capacity).
    """

    offset: int
    capacity: int
    size_class: int
    requested: int


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SlabStats:
    """A snapshot of the arena.

    Page accounting: `used_bytes + free_bytes == arena_bytes`, and `free_bytes` splits into
    `free_page_bytes` (whole pages in the pool, usable by any class), `stranded_bytes` (free
    slots in pages assigned to a class, usable only by that class) and `tail_bytes` (the end of
    a page that is too short for one more slot of its class).
    """

    arena_bytes: int
    page_bytes: int
    used_bytes: int
    requested_bytes: int
    free_bytes: int
    free_page_bytes: int
    stranded_bytes: int
    tail_bytes: int
    live_extents: int
    #: 1 - requested/used: slack inside handed-out slots (0 when nothing is in use).
    internal_fragmentation: float
    #: (stranded + tail) / free: share of free memory that a new class cannot use (0 when full).
    external_fragmentation: float
    #: Slot capacity -> pages assigned to that class (classes with no page are left out).
    pages_per_class: dict[int, int]


class SlabAllocator:
    """Hands out block extents inside an arena of `arena_bytes`, cut into `page_bytes` pages.

    Blocks range from 1 B up to `max_block_bytes` (64 MiB, or less when pages are smaller).
    Raises ValueError when the geometry is invalid: `page_bytes` must be a positive multiple of
    4 KiB and `arena_bytes` a positive multiple of `page_bytes`.
    """

    def __init__(self, arena_bytes: int, *, page_bytes: int = DEFAULT_PAGE_BYTES) -> None:
        if page_bytes < BLOCK_ALIGN_BYTES or page_bytes % BLOCK_ALIGN_BYTES:
            raise ValueError(f"page_bytes must be a positive multiple of 4 KiB, got {page_bytes}")
        if arena_bytes < page_bytes or arena_bytes % page_bytes:
            raise ValueError(
                f"arena_bytes ({arena_bytes}) must be a positive multiple of page_bytes "
                f"({page_bytes})"
            )
        self.arena_bytes = arena_bytes
        self.page_bytes = page_bytes
        self.class_sizes = class_sizes(min(page_bytes, MAX_BLOCK_BYTES))
        self.max_block_bytes = self.class_sizes[-1]
        nclasses = len(self.class_sizes)
        npages = arena_bytes // page_bytes
        self._slots_per_page = [page_bytes // size for size in self.class_sizes]
        # Per class: head of the list of its pages with a free slot, pages owned, slots in use.
        self._class_head = array.array("q", [_NO_PAGE] * nclasses)
        self._class_pages = array.array("q", [0] * nclasses)
        self._class_used = array.array("q", [0] * nclasses)
        # Per page: owning class (-1 = in the pool), list links, slots in use, bump index.
        self._page_class = array.array("q", [_NO_PAGE] * npages)
        self._page_next = array.array("q", [_NO_PAGE] * npages)
        self._page_prev = array.array("q", [_NO_PAGE] * npages)
        self._page_used = array.array("q", [0] * npages)
        self._page_bump = array.array("q", [0] * npages)
        self._page_freed: list[array.array[int]] = [array.array("q") for _ in range(npages)]
        # Requested bytes per slot, 0 = free; every entry is 0 whenever the page is in the pool.
        # "I" (4 bytes) holds up to 4 GiB > MAX_BLOCK_BYTES: 0.1 % of a page of 4 KiB slots.
        self._page_requested: list[array.array[int]] = [array.array("I") for _ in range(npages)]
        # Free page pool, a stack; popped from the end, so page 0 goes out first.
        self._free_pages = array.array("q", range(npages - 1, -1, -1))
        self._requested_bytes = 0

    def size_class(self, nbytes: int) -> int:
        """Index of the class that serves `nbytes`; ValueError outside 1..max_block_bytes."""
        if not 1 <= nbytes <= self.max_block_bytes:
            raise ValueError(f"block size must be 1..{self.max_block_bytes} bytes, got {nbytes}")
        return _class_index(nbytes)

    def would_fit(self, nbytes: int) -> bool:
        """Whether `alloc(nbytes)` would succeed now; ValueError like `size_class`."""
        cls = self.size_class(nbytes)
        return self._class_head[cls] != _NO_PAGE or len(self._free_pages) > 0

    def alloc(self, nbytes: int) -> Extent | None:
        """A free block of at least `nbytes`, or None when there is no room (evict and retry).

        Raises ValueError when `nbytes` is outside 1..max_block_bytes: no eviction could help.
        """
        cls = self.size_class(nbytes)
        page = self._class_head[cls]
        if page == _NO_PAGE:
            if not self._free_pages:
                return None
            page = self._assign_page(cls)
        freed = self._page_freed[page]
        if freed:
            slot = freed.pop()
        else:
            slot = self._page_bump[page]
            self._page_bump[page] = slot + 1
        self._page_requested[page][slot] = nbytes
        used = self._page_used[page] + 1
        self._page_used[page] = used
        if used == self._slots_per_page[cls]:
            self._unlink(page, cls)
        self._class_used[cls] += 1
        self._requested_bytes += nbytes
        size = self.class_sizes[cls]
        return Extent(page * self.page_bytes + slot * size, size, cls, nbytes)

    def free(self, extent: Extent) -> None:
        """Return `extent` to its class; an emptied page goes back to the pool.

        Raises ValueError for a double free or an extent this allocator did not hand out.
        """
        page, slot = self._locate(extent)
        cls = extent.size_class
        requested = self._page_requested[page]
        if requested[slot] != extent.requested:
            state = "already free" if requested[slot] == 0 else "not handed out as such"
            raise ValueError(f"cannot free {extent}: {state}")
        requested[slot] = 0
        self._requested_bytes -= extent.requested
        self._class_used[cls] -= 1
        used = self._page_used[page] - 1
        self._page_used[page] = used
        if used == 0:
            self._release_page(page, cls)
            return
        self._page_freed[page].append(slot)
        if used == self._slots_per_page[cls] - 1:  # was full, so it was not on the list
            self._link(page, cls)

    def stats(self) -> SlabStats:
        """A consistent snapshot of usage and fragmentation; O(number of classes)."""
        used = stranded = tail = 0
        pages_per_class: dict[int, int] = {}
        for cls, size in enumerate(self.class_sizes):
            pages = self._class_pages[cls]
            if not pages:
                continue
            slots = self._slots_per_page[cls]
            pages_per_class[size] = pages
            used += self._class_used[cls] * size
            stranded += (pages * slots - self._class_used[cls]) * size
            tail += pages * (self.page_bytes - slots * size)
        free = self.arena_bytes - used
        return SlabStats(
            arena_bytes=self.arena_bytes,
            page_bytes=self.page_bytes,
            used_bytes=used,
            requested_bytes=self._requested_bytes,
            free_bytes=free,
            free_page_bytes=len(self._free_pages) * self.page_bytes,
            stranded_bytes=stranded,
            tail_bytes=tail,
            live_extents=sum(self._class_used),
            internal_fragmentation=1 - self._requested_bytes / used if used else 0.0,
            external_fragmentation=(stranded + tail) / free if free else 0.0,
            pages_per_class=pages_per_class,
        )

    def _locate(self, extent: Extent) -> tuple[int, int]:
        """(page, slot) of a plausible extent of ours; ValueError when it cannot be one."""
        offset, cls = extent.offset, extent.size_class
        if not 0 <= offset < self.arena_bytes or not 0 <= cls < len(self.class_sizes):
            raise ValueError(f"cannot free {extent}: outside this arena")
        page, within = divmod(offset, self.page_bytes)
        size = self.class_sizes[cls]
        slot, misaligned = divmod(within, size)
        if (
            self._page_class[page] != cls
            or extent.capacity != size
            or misaligned
            or slot >= self._slots_per_page[cls]
        ):
            raise ValueError(f"cannot free {extent}: not a block of this allocator")
        return page, slot

    def _assign_page(self, cls: int) -> int:
        """Take a page from the pool for `cls` and put it at the head of the class list."""
        page = self._free_pages.pop()
        slots = self._slots_per_page[cls]
        requested = self._page_requested[page]
        if len(requested) < slots:  # grow once; later assignments reuse it (all zeros)
            requested.frombytes(bytes((slots - len(requested)) * requested.itemsize))
        self._page_class[page] = cls
        self._page_used[page] = 0
        self._page_bump[page] = 0
        self._class_pages[cls] += 1
        self._link(page, cls)
        return page

    def _release_page(self, page: int, cls: int) -> None:
        """Return an empty page to the pool (its requested array is all zeros again)."""
        if self._slots_per_page[cls] > 1:  # a one-slot page is never on the list when used
            self._unlink(page, cls)
        del self._page_freed[page][:]
        self._page_class[page] = _NO_PAGE
        self._class_pages[cls] -= 1
        self._free_pages.append(page)

    def _link(self, page: int, cls: int) -> None:
        head = self._class_head[cls]
        self._page_prev[page] = _NO_PAGE
        self._page_next[page] = head
        if head != _NO_PAGE:
            self._page_prev[head] = page
        self._class_head[cls] = page

    def _unlink(self, page: int, cls: int) -> None:
        prev, nxt = self._page_prev[page], self._page_next[page]
        if prev == _NO_PAGE:
            self._class_head[cls] = nxt
        else:
            self._page_next[prev] = nxt
        if nxt != _NO_PAGE:
            self._page_prev[nxt] = prev
        self._page_prev[page] = self._page_next[page] = _NO_PAGE
