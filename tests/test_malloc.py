"""cnnlab.malloc: the arena limit takes effect in a fresh process, and the config checks it."""

import os
import subprocess
import sys
import textwrap

import pytest

from cnnlab import malloc
from cnnlab.config import Config
from cnnlab.errors import ConfigError
from cnnlab.validate import validate

glibc = pytest.mark.skipif(malloc._mallopt() is None, reason="glibc's mallopt only")

# Four threads each allocate and free, then glibc's malloc_info(3) reports its arenas as
# <heap nr="..."> elements; the script prints how many there are.
ARENAS_SCRIPT = textwrap.dedent(
    """
    import ctypes, sys, tempfile, threading
    from cnnlab import malloc
    print(malloc.limit_arenas(int(sys.argv[1])) if sys.argv[1] != "none" else None)
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.fopen.restype = ctypes.c_void_p
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    barrier = threading.Barrier(4)
    def work():
        barrier.wait()  # all four allocate at once, so each needs an arena of its own
        blocks = [libc.malloc(1000) for _ in range(1000)]
        barrier.wait()
        for b in blocks:
            libc.free(b)
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with tempfile.NamedTemporaryFile(suffix=".xml") as f:
        stream = libc.fopen(f.name.encode(), b"w")
        libc.malloc_info(0, stream)
        libc.fclose(stream)
        print(open(f.name).read().count("<heap nr="))
    """
)


def arenas_after_threads(limit: str, env: dict | None = None) -> tuple[str, int]:
    """(what limit_arenas returned, the number of arenas) in a fresh Python process."""
    done = subprocess.run(
        [sys.executable, "-c", ARENAS_SCRIPT, limit], capture_output=True, text=True, check=True,
        env={k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | (env or {}),
    )  # fmt: skip
    applied, count = done.stdout.split()
    return applied, int(count)


@glibc
def test_one_arena_serves_every_thread():
    assert arenas_after_threads("1") == ("True", 1)
    assert arenas_after_threads("2") == ("True", 2)
    applied, default = arenas_after_threads("none")
    assert applied == "None" and default > 1  # the threads got arenas of their own


@glibc
def test_the_environment_wins():
    applied, count = arenas_after_threads("1", {"MALLOC_ARENA_MAX": "3"})
    assert applied == "False" and count > 1


def test_none_leaves_glibc_alone():
    assert malloc.limit_arenas(None) is False


@pytest.mark.parametrize("arenas", [0, -2])
def test_config_rejects_a_count_below_one(arenas):
    with pytest.raises(ConfigError, match="malloc_arenas"):
        validate(Config(malloc_arenas=arenas))


def test_the_default_is_two_arenas_and_not_hashed():
    from cnnlab.config import config_hash

    assert Config().malloc_arenas == malloc.DEFAULT_ARENAS == 2
    assert config_hash(Config(malloc_arenas=None)) == config_hash(Config())
