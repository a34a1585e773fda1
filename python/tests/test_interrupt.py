"""Ctrl-C stops score_files and kld_files between chunks, as KeyboardInterrupt, and leaves the
package usable. The interrupt is a real SIGINT sent to this process by another one while the
call runs with the GIL released. Python's own SIGINT handler is installed for the test: a
process started in the background by a non-interactive shell (`cmd &`) inherits SIGINT
ignored, and Python then leaves it ignored — Ctrl-C would do nothing there at all."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

import xent

from conftest import need_device

ROWS, VOCAB = 128, 8192  # 4 MiB of f32 logits per shard
REPEAT = 4000  # the same shard 4000 times: 16 GiB of work, seconds on any machine


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    d = tmp_path_factory.mktemp("interrupt")
    rng = np.random.default_rng(0)
    np.save(d / "logits.npy", rng.standard_normal((ROWS, VOCAB), dtype=np.float32))
    np.save(d / "targets.npy", rng.integers(0, VOCAB, ROWS))
    return str(d / "logits.npy"), str(d / "targets.npy")


@pytest.fixture
def python_sigint_handler():
    """Python's default SIGINT handler (KeyboardInterrupt) for the test, whatever was inherited."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def interrupt_after(seconds: float) -> subprocess.Popen:
    """SIGINT to this process after `seconds`, as Ctrl-C in a terminal sends it, from another process."""
    return subprocess.Popen(["sh", "-c", f"sleep {seconds}; kill -INT {os.getpid()}"])


@pytest.mark.parametrize("fn", ["score_files", "kld_files"])
def test_ctrl_c_stops_between_chunks(shard, fn, python_sigint_handler):
    logits, targets = shard
    call = getattr(xent, fn)
    t0 = time.perf_counter()
    sender = interrupt_after(0.3)
    try:
        with pytest.raises(KeyboardInterrupt):
            call([logits] * REPEAT, [targets if fn == "score_files" else logits] * REPEAT, device="cpu", chunk_mib=1)
        elapsed = time.perf_counter() - t0
    finally:
        # Should the call end first, no SIGINT may arrive later in the session.
        if sender.poll() is None:
            sender.kill()
        sender.wait()
    # Stopped soon after the interrupt, not at the end of 8 GiB of work.
    # (A check that never ran would still raise KeyboardInterrupt, at the end: the time tells.)
    one = time.perf_counter()
    call([logits] * 100, [targets if fn == "score_files" else logits] * 100, device="cpu", chunk_mib=1)
    full = REPEAT * (time.perf_counter() - one) / 100
    assert elapsed < 0.3 + 0.3 * full, f"interrupted after {elapsed:.2f} s of a {full:.2f} s run"
    # And the package still works afterwards.
    s = xent.score_files(logits, targets, device="cpu")
    assert s.tokens == ROWS


@pytest.mark.parametrize("fn", ["score", "score_files"])
def test_gil_is_released_while_computing(shard, fn):
    if fn == "score":
        need_device("gpu")
    # A Python thread notes the time, again and again, while one long call runs. Were the GIL
    # held through the call, no note could fall inside it (beyond one switch interval, 5 ms, at
    # its start, which the margin below leaves out).
    logits, targets = shard
    x, t = np.tile(np.load(logits), (64, 1)), np.tile(np.load(targets), 64)  # 256 MiB
    notes: list[float] = []
    stop = threading.Event()

    def note():
        while not stop.is_set():
            notes.append(time.perf_counter())

    thread = threading.Thread(target=note, daemon=True)
    thread.start()
    time.sleep(0.05)
    t0 = time.perf_counter()
    if fn == "score":
        xent.score(x, t, device="gpu")  # one call; on lavapipe 256 MiB take a good part of a second
    else:
        xent.score_files([logits] * 400, [targets] * 400, device="cpu")
    t1 = time.perf_counter()
    stop.set()
    thread.join()
    inside = [n for n in notes if t0 + 0.02 < n < t1 - 0.005]
    assert t1 - t0 > 0.1, f"the call took {t1 - t0:.3f} s: too short to tell"
    assert len(inside) > 1000, f"{len(inside)} notes during a {t1 - t0:.3f} s call"
