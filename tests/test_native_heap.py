"""glibc's adaptive mmap threshold is turned off by `sferp run` (sferp/native_heap.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from sferp import native_heap

pytestmark = pytest.mark.skipif(native_heap._libc() is None, reason="glibc only")

# After an 8 MiB block (mapped) is freed, is a 1 MiB block still given its own mapping?
_PROBE = textwrap.dedent(
    """
    import ctypes, sys
    from sferp.native_heap import fix_malloc_thresholds

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    fixed = fix_malloc_thresholds() if sys.argv[1] == "fix" else None
    big = bytearray(8 << 20)
    del big
    before = libc.mallinfo2().hblks
    block = bytearray(1 << 20)
    print(fixed, libc.mallinfo2().hblks - before)
    """
)


def _probe(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if k not in native_heap._USER_TUNABLES}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0], int(out[1])


def test_large_blocks_keep_their_own_mapping_after_a_larger_one_was_freed():
    assert _probe("fix") == ("True", 1)


def test_without_it_glibc_raises_the_threshold_and_serves_them_from_the_heap():
    # The behaviour the setting exists for; if glibc stops adapting, this fails and
    # the setting can go.
    assert _probe("none") == ("None", 0)


def test_tunables_from_the_environment_are_left_as_they_are():
    fixed, mapped = _probe("fix", MALLOC_ARENA_MAX="2")
    assert fixed == "False"
    assert mapped == 0


@pytest.mark.parametrize("setting, called", [(True, True), (False, False)])
def test_the_flow_runner_sets_it_first_unless_turned_off(monkeypatch, setting, called):
    from sferp import runner
    from sferp.config import Settings

    class Called(Exception):
        pass

    class NotCalled(Exception):
        pass

    def fix() -> bool:
        raise Called

    def preflight(*_a, **_k):  # the next thing run_flow does
        raise NotCalled

    import sferp.connectors.kafka as kafka_connector

    monkeypatch.setattr(native_heap, "fix_malloc_thresholds", fix)
    monkeypatch.setattr(kafka_connector, "list_partitions", preflight)
    settings = Settings.model_validate({"flow": {"return_freed_memory": setting}})
    with pytest.raises(Called if called else NotCalled):
        runner.run_flow(settings, runner.RunOptions(preflight=True))
