"""The exception-diagnosis kit (benchmarks/diag_ext_exceptions.py) without running it: its command
line and the logic that turns a child's exit status and progress lines into a verdict. Nothing here
compiles an extension or imports one (the kit itself runs on the GPU machine, see gpu_run.sh)."""
import importlib.util
import os
import signal
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "diag_ext_exceptions.py")


@pytest.fixture(scope="module")
def diag():
    spec = importlib.util.spec_from_file_location("diag_ext_exceptions", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass looks its module up while the class is built
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def child_output(*steps):
    """Progress lines as the child prints them: ("bad", "RAISED", "RuntimeError: bad") or ("bad", None)
    for a call that began and never answered."""
    lines = ["BEGIN import", "RETURNED import ok"]
    for label, what, *text in steps:
        lines.append(f"BEGIN {label}")
        if what:
            lines.append(f"{what} {label} {text[0] if text else ''}".rstrip())
    return "\n".join(lines) + "\n"


def test_help_runs_without_building_anything():
    proc = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for option in ("--out", "--budget-s", "--jobs", "--only", "--keep"):
        assert option in proc.stdout


GOOD = ("good", "RETURNED", "Tensor(2, 3)")
GOOD_AFTER = ("good_after", "RETURNED", "Tensor(2, 3)")


def test_classify_ok(diag):
    out = child_output(GOOD, ("bad", "RAISED", "RuntimeError: x_cls must have shape (B, C)"), GOOD_AFTER) + "END\n"
    status, detail = diag.classify(0, out)
    assert status == "OK"
    assert "x_cls must have shape" in detail


def test_classify_segfault_names_the_call(diag):
    out = child_output(GOOD, ("bad", None))
    status, detail = diag.classify(-signal.SIGSEGV, out, "Fatal Python error: Segmentation fault")
    assert status == "CRASH"
    assert "SIGSEGV" in detail and "'bad'" in detail


def test_classify_abort_from_terminate(diag):
    out = child_output(GOOD, ("caught_in_cpp", None))
    status, detail = diag.classify(-signal.SIGABRT, out, "terminate called after throwing an instance of 'c10::Error'")
    assert status == "CRASH"
    assert "std::terminate" in detail and "'caught_in_cpp'" in detail


@pytest.mark.parametrize("returncode, steps, stderr, expected", [
    (None, [GOOD, ("bad", None)], "", "TIMEOUT"),
    (0, [GOOD, ("bad", "RETURNED", "Tensor(3)"), GOOD_AFTER], "", "NO ERROR"),
    (0, [GOOD, ("bad", "RAISED", "ValueError: nope"), GOOD_AFTER], "", "WRONG EXCEPTION"),
    (0, [GOOD, ("bad", "RAISED", "RuntimeError: bad"), ("good_after", "RAISED", "RuntimeError: broken")], "",
     "ERROR"),
    (1, [], "ImportError: undefined symbol: _ZN3c10", "ERROR"),
])
def test_classify_other_outcomes(diag, returncode, steps, stderr, expected):
    status, _ = diag.classify(returncode, child_output(*steps), stderr)
    assert status == expected


def test_classify_skip_and_program_exception_type(diag):
    status, detail = diag.classify(0, "BEGIN import\nRETURNED import ok\nSKIP no such function\n")
    assert (status, detail) == ("N/A", "no such function")
    program = "BEGIN good\nRETURNED good 2\nBEGIN bad\nRAISED bad std::runtime_error: bad\n" \
              "BEGIN good_after\nRETURNED good_after 2\nEND\n"
    assert diag.classify(0, program, expected="std::runtime_error")[0] == "OK"
    assert diag.classify(0, program)[0] == "WRONG EXCEPTION"


def test_first_compiler_error(diag):
    log = ("[1/2] c++ -MMD -c x.cpp -o x.o\n"
           "W1125 17:17:21 torch/utils/cpp_extension.py:183] No CUDA runtime is found\n"
           "x.cpp:3:10: fatal error: torch/extension.h: No such file or directory\n"
           "compilation terminated.\n")
    assert diag.first_compiler_error(log).startswith("x.cpp:3:10: fatal error")


def test_variants_and_repo_flags(diag):
    flags, how = diag.repo_flags()
    assert "read from setup.py" in how
    assert {"-fvisibility=hidden", "-fopenmp"} <= set(flags)
    variants = diag.make_variants(flags)
    keys = [v.key for v in variants]
    assert len(keys) == len(set(keys))
    assert set("abcdefgh") <= set(keys)
    by_key = {v.key: v for v in variants}
    assert "-fvisibility=hidden" not in by_key["f"].cflags and "-fopenmp" not in by_key["h"].cflags
    assert "-DCVK_NO_CLONES" in by_key["g"].cflags


def test_backtrace_goes_to_a_segfault_before_an_abort(diag):
    variants = diag.make_variants(diag.FALLBACK_REPO_FLAGS)
    by_key = {v.key: v for v in variants}
    by_key["d"].status, by_key["d"].detail = "CRASH", "SIGABRT (std::terminate: ...) during the 'bad' call"
    by_key["e"].status, by_key["e"].detail = "CRASH", "SIGSEGV during the 'bad' call"
    assert diag.first_crash(variants).key == "e"
    by_key["e"].status = "OK"
    assert diag.first_crash(variants).key == "d"
