"""The project's one timer (crossvit_kernels.timing) and the machine record (info.environment)."""
import time

import pytest
import torch

from crossvit_kernels import info
from crossvit_kernels.timing import Timer, clock, summarize


def test_summarize_quartiles_and_extremes():
    s = summarize([4.0, 1.0, 3.0, 2.0, 5.0], cpu_ms=[1.0, 2.0, 3.0])
    assert s == {"median_ms": 3.0, "q25_ms": 2.0, "q75_ms": 4.0, "min_ms": 1.0, "max_ms": 5.0, "reps": 5,
                 "cpu_ms": 2.0}
    assert summarize([2.0])["q75_ms"] == 2.0
    with pytest.raises(ValueError):
        summarize([])


def test_group_interleaves_variants_and_reverses_the_order():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    res = Timer("cpu", warmup=1, min_reps=3, max_reps=3, budget_s=0.0).group(fns)
    assert calls == list("abc") + list("abc") + list("cba") + list("abc")   # warm-up, then rounds
    assert set(res) == set("abc") and all(r["reps"] == 3 for r in res.values())


def test_repeats_follow_min_max_and_budget():
    res = Timer("cpu", warmup=0, min_reps=2, max_reps=1000, budget_s=0.05)(lambda: time.sleep(0.01))
    assert 2 <= res["reps"] < 1000
    assert res["median_ms"] >= 9.0
    assert Timer("cpu", warmup=0, min_reps=4, max_reps=4, budget_s=10)(lambda: None)["reps"] == 4


def test_a_failing_variant_is_reported_and_the_others_are_timed():
    n = {"calls": 0}

    def flaky():
        n["calls"] += 1
        if n["calls"] > 2:
            raise RuntimeError("broken backend\nsecond line")
    res = Timer("cpu", warmup=1, min_reps=5, max_reps=5, budget_s=0).group({"ok": lambda: None, "flaky": flaky},
                                                                           keep_samples=True)
    assert res["flaky"] == {"error": "RuntimeError: broken backend"}
    assert res["ok"]["reps"] == 5 and len(res["ok"]["samples_ms"]) == 5
    n["calls"] = 0
    with pytest.raises(RuntimeError, match="broken backend"):
        Timer("cpu", warmup=0, min_reps=5, max_reps=5).group({"flaky": flaky}, catch=False)


def test_progress_and_arguments():
    seen = []
    Timer("cpu", warmup=2, min_reps=3, max_reps=3, budget_s=0).group(
        {"a": lambda: None}, progress=lambda stage, i, n: seen.append((stage, i, n)))
    assert seen == [("warm-up", 1, 2), ("warm-up", 2, 2), ("round", 1, 3), ("round", 2, 3), ("round", 3, 3)]
    with pytest.raises(ValueError, match="CUDA"):
        Timer("cpu").group({"a": lambda: None}, graph=True)
    with pytest.raises(ValueError, match="min_reps"):
        Timer("cpu", min_reps=5, max_reps=2)
    assert clock() <= clock()


def test_environment_records_the_machine():
    env = info.environment("cpu")
    assert env["device_type"] == "cpu" and env["threads"] == torch.get_num_threads() and env["cpu_count"]
    assert env["versions"]["torch"] == torch.__version__ and env["versions"]["crossvit_kernels"]
    assert "commit" in env and "load_average" in env
    assert info.device_tag("cpu").startswith("cpu-") and info.device_tag("cpu").endswith(f"-{torch.get_num_threads()}t")
