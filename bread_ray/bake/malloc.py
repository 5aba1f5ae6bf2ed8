"""The C allocator's settings for a bake's process: no imports beyond the standard library, so that
a bench can give another trainer's process the same."""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial threshold, held fixed


def return_freed_blocks_to_the_os() -> None:
    """Keep glibc's malloc from holding on to the memory of freed activations.

    glibc raises its mmap threshold to the size of each large block freed (up to 32 MB); from then
    on blocks of that size come from the heap, and a freed one stays in the process. A bake's
    activations are such blocks, of new sizes every step, so the process's peak grows with what the
    heap keeps. A threshold set explicitly stays where it is: larger blocks are mapped apart and
    unmapped when freed. Nothing to do off glibc. (bench/peers.py runs TRL with and without it.)
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
