"""Sharded scoring on Ray (python/examples/ray_eval.py) against one in-process run: exact equality.

Select with ``pytest -k ray``. Ray is required: a missing ``ray`` fails this module (CI installs it).
Everything runs on the CPU path, where per-row values are bit-identical across processes, so the
merged summary must equal the one-run summary to the last bit of its exact sums.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray  # not importorskip: CI installs ray, and this test must fail without it
import xent

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ray_eval.py"
SHARDS, ROWS, VOCAB = 8, 256, 1000
EXACT = ("tokens", "ignored", "correct", "nan", "infinite", "sum_nll_fixed", "sum_nll_sq_fixed")


def _load_example():
    spec = importlib.util.spec_from_file_location("ray_eval", EXAMPLE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ray_eval"] = mod  # the example ships its task to workers by value, which needs this
    spec.loader.exec_module(mod)
    return mod


ray_eval = _load_example()


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU cluster for the whole module; yields its address for other drivers."""
    ctx = ray.init(num_cpus=2, include_dashboard=False)
    try:
        yield ctx.address_info["gcs_address"]
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """8 shards of [256, 1000] f32 logits with int64 targets, about 10% ignored (-100)."""
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(20240611)
    for i in range(SHARDS):
        logits = (rng.standard_normal((ROWS, VOCAB), dtype=np.float32) * 2.0).astype(np.float32)
        targets = rng.integers(0, VOCAB, size=ROWS, dtype=np.int64)
        # Make some rows right (accuracy > 0) and some confident-wrong.
        hit = rng.random(ROWS) < 0.3
        logits[np.arange(ROWS)[hit], targets[hit]] += 6.0
        targets[rng.random(ROWS) < 0.1] = -100
        np.save(d / f"shard-{i:03d}.npy", logits)
        np.save(d / f"shard-{i:03d}-targets.npy", targets)
    return d


def _files(d: Path) -> tuple[list[str], list[str]]:
    logits = sorted(str(p) for p in d.glob("shard-???.npy"))
    targets = sorted(str(p) for p in d.glob("shard-???-targets.npy"))
    assert len(logits) == len(targets) == SHARDS
    return logits, targets


def _exact(d: dict | str) -> dict:
    obj = json.loads(d) if isinstance(d, str) else d
    return {k: obj[k] for k in EXACT}


def test_ray_merged_equals_one_run(ray_cluster, shard_dir, tmp_path, capsys):
    logits, targets = _files(shard_dir)
    one = xent.score_files(logits, targets, device="cpu")
    assert one.tokens > 0 and one.ignored > 0 and one.correct > 0

    # The library path: run() over the paired shards.
    shards = ray_eval.pair_shards([str(shard_dir / "*.npy")], [str(shard_dir / "*-targets.npy")])
    assert [os.path.basename(lg) for _, lg, _ in shards] == [os.path.basename(p) for p in logits]
    result = ray_eval.run(shards, device="cpu", retries=1)
    assert result.complete and not result.failed and len(result.covered) == SHARDS
    assert result.summary == one
    assert _exact(result.summary.to_json()) == _exact(one.to_json())
    # Per shard too: each task's summary is that shard scored alone.
    by_name = {c["name"]: c["summary"] for c in result.covered}
    assert by_name["shard-003.npy"] == xent.score_files(logits[3], targets[3], device="cpu")
    # The causal-LM shift is per shard too (sequences never span files): still exact.
    shifted = ray_eval.run(shards, device="cpu", shift=True, ignore_index=-100)
    assert shifted.complete and shifted.summary == xent.score_files(logits, targets, device="cpu", shift=True)
    assert shifted.summary != one

    # The CLI path: main() with --json and --summary-out, inside this (already connected) process.
    out = tmp_path / "merged.json"
    capsys.readouterr()
    rc = ray_eval.main(
        ["--logits", str(shard_dir / "*.npy"), "--targets", str(shard_dir / "*-targets.npy"),
         "--device", "cpu", "--json", "--summary-out", str(out)]
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    report = json.loads(cap.out)
    assert report["shards_total"] == SHARDS and report["shards_covered"] == SHARDS and report["missing"] == []
    assert _exact(report) == _exact(one.to_json())
    assert f"[{SHARDS}/{SHARDS}]" in cap.err and f"covered {SHARDS} of {SHARDS} shards" in cap.err
    assert "shard-007.npy: " in cap.err and " tokens, ppl " in cap.err
    # The text is what `xent merge` prints: the numbers lines are the one run's, to the digit.
    merged_text = cap.err[cap.err.index("xent: ") :].splitlines()
    assert merged_text[0].startswith(f"xent: {one.tokens} tokens scored, {one.ignored} ignored, on the merged summaries in ")
    assert merged_text[1:4] == str(one).splitlines()[1:4]
    # The summary file is the CLI's summary (mergeable) plus the coverage.
    written = json.loads(out.read_text())
    assert _exact(written) == _exact(one.to_json())
    assert written["shards_covered"] == SHARDS and written["missing"] == []
    assert xent.Summary.from_json(out.read_text()) == one


def test_ray_corrupt_shard_is_reported_and_partial(ray_cluster, shard_dir, tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    for p in shard_dir.iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    bad = d / "shard-005.npy"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # a valid header, half the rows: a truncated copy
    logits, targets = _files(d)
    good = [i for i in range(SHARDS) if i != 5]
    seven = xent.score_files([logits[i] for i in good], [targets[i] for i in good], device="cpu")
    with pytest.raises((ValueError, OSError), match="shard-005.npy"):
        xent.score_files(str(bad), targets[5], device="cpu")

    # The real script, as a separate driver connected to the running cluster.
    out = tmp_path / "merged.json"
    cmd = [sys.executable, str(EXAMPLE), "--address", ray_cluster, "--device", "cpu", "--retries", "1",
           "--logits", str(d / "*.npy"), "--targets", str(d / "*-targets.npy"), "--json", "--summary-out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stderr
    assert "shard-005.npy: FAILED" in proc.stderr, proc.stderr
    assert "covered 7 of 8 shards; missing: shard-005.npy" in proc.stderr
    report = json.loads(proc.stdout)
    assert report["shards_total"] == 8 and report["shards_covered"] == 7 and report["missing"] == ["shard-005.npy"]
    assert "shard-005.npy" in report["errors"]["shard-005.npy"]  # xent's message names the file
    assert _exact(report) == _exact(seven.to_json())
    assert not out.exists(), "a partial result must not be written as if whole without --allow-partial"

    # --allow-partial: exit 0, and the summary file says what it covers. (In-process, human output.)
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()) as err:
        rc = ray_eval.main(
            ["--device", "cpu", "--retries", "0", "--allow-partial", "--summary-out", str(out),
             "--logits", *logits, "--targets", *targets]
        )
    assert rc == 0, err.getvalue()
    text = stdout.getvalue()
    assert text.startswith(f"xent: {seven.tokens} tokens scored, {seven.ignored} ignored, on the merged summaries")
    assert text.rstrip().endswith("covered 7 of 8 shards; missing: shard-005.npy")
    written = json.loads(out.read_text())
    assert written["shards_covered"] == 7 and written["missing"] == ["shard-005.npy"]
    assert _exact(written) == _exact(seven.to_json())


def test_gpu_tasks_pin_the_adapter_ray_assigned(monkeypatch):
    """A GPU task points xent at its own GPU (XENT_ADAPTER = Ray's one numeric GPU id); ids it
    cannot map (none, several, UUIDs) leave the variable alone."""
    monkeypatch.delenv("XENT_ADAPTER", raising=False)
    for ids in ([], [0, 1], ["GPU-5f0c9a1e"]):
        ray_eval.pin_adapter(ids)
        assert "XENT_ADAPTER" not in os.environ, ids
    ray_eval.pin_adapter([3])
    assert os.environ["XENT_ADAPTER"] == "3"
    ray_eval.pin_adapter(["1"])
    assert os.environ["XENT_ADAPTER"] == "1"
