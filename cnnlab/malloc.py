"""The C allocator's memory arenas: how much freed memory a training process keeps.

glibc's malloc gives each thread that allocates its own arena, up to 8 per core, and keeps the
memory freed into an arena for that arena's next allocations. XLA's CPU runtime allocates each
step's buffers on whichever of its threads runs the step, so over the first hundred steps every
thread's arena ends up holding a step's worth of freed buffers, and the compiler's freed memory
stays in the arenas it used. Fewer arenas let the threads reuse the same freed memory.

Fewer arenas lower a LeNet-5 process's peak memory by about a tenth; one arena saves a little
more but makes XLA's threads wait for each other's allocations (many more futex calls, slower
steps), so the default is 2 (the figures: docs/performance.md, Memory). The arena count changes
no value that is computed.

The setting is process-wide, so cnnlab's programs apply it at their start (`malloc_arenas` in
the config); the library never does on import. `MALLOC_ARENA_MAX` in the environment, read by
glibc when the process starts, wins.
"""

import ctypes
import ctypes.util
import functools
import os

DEFAULT_ARENAS = 2  # the config's default (cnnlab.config.Config.malloc_arenas)
_M_ARENA_MAX = -8  # mallopt's parameter number for the arena limit, from glibc's malloc.h


def limit_arenas(arenas: int | None) -> bool:
    """Let this process's C allocator use at most `arenas` arenas from now on (None: glibc's
    default). Call it before the first computation: threads that already have an arena keep it.
    True where it was applied; False without glibc (macOS, musl), where `MALLOC_ARENA_MAX` is
    set, or for None."""
    if arenas is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    mallopt = _mallopt()
    return mallopt is not None and mallopt(_M_ARENA_MAX, arenas) == 1


@functools.cache
def _mallopt():
    """glibc's `int mallopt(int param, int value)`, or None where the C library lacks it."""
    if not hasattr(os, "confstr") or "glibc" not in _libc_version():
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def _libc_version() -> str:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):  # not a name this platform's confstr knows
        return ""
