"""Why a C++ exception raised inside the compiled CPU extension can kill the process.

    python benchmarks/diag_ext_exceptions.py --out report.txt [--budget-s 240] [--jobs N] [--keep]

On one machine every TORCH_CHECK failure in ``crossvit_kernels._C_cpu`` ended in SIGSEGV instead of
a RuntimeError, and the same source raised correctly elsewhere. This script answers "why" in one
run, without touching the repository's build/ or the installed extension:

1. the toolchain: interpreter (how it was built, what it links, whether it exports the C++
   unwinder / exception symbols itself), compiler, torch and the pybind11 it bundles, which
   libstdc++ / libgcc_s the libraries resolve to;
2. a bisection, from the bottom up: a plain C++ program and a plain C++ library loaded through
   ctypes (no pybind11; with and without torch imported), torch's own errors, the installed
   extension when there is one, then small and real extension variants, each built in a
   temporary directory (in parallel) and called in a fresh subprocess (a crash must not end the
   diagnosis): a good call, a call that must raise, and a good call again;
3. for the first variant that crashes: a native backtrace (a tiny preloaded signal handler, and
   gdb when it is installed) and the dynamic linker's bindings of the unwinder, personality,
   __cxa_throw and exception typeinfo symbols;
4. a summary table, variant -> OK / CRASH / BUILD FAILED, with what the pattern points at.

The report is written as it goes (to --out and stdout), so a run stopped by a time limit still
says what it found. Standard library and torch only; no network.
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_SOURCE = os.path.join(REPO, "csrc", "crossvit_cpu.cpp")
# what setup.py passes when it cannot be read (kept in step with setup.py by hand)
FALLBACK_REPO_FLAGS = ["-O3", "-g0", "-fopenmp", "-ffp-contract=fast", "-fvisibility=hidden", "-Wno-psabi"]
# symbols whose provider decides how a C++ exception is thrown, unwound and matched to its catch
EXCEPTION_SYMBOLS = re.compile(r"^(_Unwind_\w+|__gxx_personality_v0|__gcc_personality_v0|__cxa_\w+|"
                               r"__(de)?register_frame\w*|_ZTIN3c105ErrorE|_ZTISt9exception|"
                               r"_ZTISt13runtime_error)$")
TEST_TIMEOUT_S = 90        # importing torch with its CUDA libraries is slow on a cold machine
MIN_BUILD_S = 40           # no build is started with less of the budget left (one takes 20-35 s)
BUILD_MARGIN_S = 15        # a build is stopped this long before the budget ends, to leave time to test

# ------------------------------------------------------------------------------------------------
# the extension written by this script: the smallest thing that raises from C++ through pybind11
# ------------------------------------------------------------------------------------------------
MINIMAL_SOURCE = r"""
// Written by benchmarks/diag_ext_exceptions.py. One source, variants chosen by -D flags:
// DIAG_THROW_STD throws std::runtime_error instead of TORCH_CHECK's c10::Error, DIAG_CLONES puts
// the check in a target_clones function (as the real CPU kernels are built).
#include <torch/extension.h>
#include <stdexcept>
#include <string>

#if defined(DIAG_THROW_STD)
#define DIAG_CHECK(cond, msg) do { if (!(cond)) throw std::runtime_error(msg); } while (0)
#else
#define DIAG_CHECK(cond, msg) TORCH_CHECK(cond, msg)
#endif

#if defined(DIAG_CLONES) && defined(__x86_64__)
__attribute__((noinline, target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
__attribute__((noinline))
#endif
void check_rank(int64_t dim) { DIAG_CHECK(dim == 2, "bad"); }

at::Tensor check_2d(const at::Tensor& x) {
#if defined(DIAG_CLONES)
  check_rank(x.dim());
#else
  DIAG_CHECK(x.dim() == 2, "bad");
#endif
  return x;
}

// The same throw, caught before it leaves the extension: tells a broken throw/unwind apart from a
// failure where the exception crosses into pybind11's dispatcher.
std::string caught_in_cpp() {
  try {
    check_rank(3);
  } catch (const std::exception& e) {
    return std::string("caught: ") + std::string(e.what()).substr(0, 80);
  }
  return "nothing was thrown";
}

// What this module was compiled with, and which pybind11 internals the interpreter holds: two
// internals ids mean the extension and torch._C do not share exception translators.
pybind11::dict info() {
  pybind11::dict d;
  d["pybind11_compiled"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." + std::to_string(PYBIND11_VERSION_MINOR) +
                           "." + std::to_string(PYBIND11_VERSION_MICRO);
  d["internals_id"] = PYBIND11_INTERNALS_ID;
  d["compiler"] = __VERSION__;
#if defined(__GLIBCXX__)
  d["glibcxx"] = __GLIBCXX__;
#endif
#if defined(_GLIBCXX_USE_CXX11_ABI)
  d["cxx11_abi"] = _GLIBCXX_USE_CXX11_ABI;
#endif
  // pybind11 takes other code paths to its internals on some Pythons (3.12+: subinterpreters)
  d["py_version_hex"] = PY_VERSION_HEX;
#if defined(PYBIND11_HAS_SUBINTERPRETER_SUPPORT)
  d["subinterpreter_support"] = 1;
#else
  d["subinterpreter_support"] = 0;
#endif
#if defined(Py_GIL_DISABLED)
  d["gil_disabled"] = 1;
#endif
  pybind11::list keys;
#if PY_VERSION_HEX >= 0x03090000
  PyObject* state = PyInterpreterState_GetDict(PyInterpreterState_Get());
  if (state != nullptr) {
    for (auto item : pybind11::reinterpret_borrow<pybind11::dict>(state)) {
      std::string key = pybind11::str(item.first);
      if (key.find("pybind11") != std::string::npos) keys.append(key);
    }
  }
#endif
  d["interpreter_state_keys"] = keys;
  return d;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("check_2d", &check_2d);
  m.def("caught_in_cpp", &caught_in_cpp);
  m.def("info", &info);
}
"""

# The same throw with neither torch nor pybind11: as a program (does this compiler's C++ runtime
# unwind at all?) and as a plain library called through ctypes (does this interpreter, or
# something torch loads into it, break unwinding?). The program speaks the child's protocol below.
PLAIN_SOURCE = r"""
// Written by benchmarks/diag_ext_exceptions.py.
#include <cstdio>
#include <stdexcept>

#if defined(DIAG_CLONES) && defined(__x86_64__)
__attribute__((noinline, target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
__attribute__((noinline))
#endif
long check_rank(long dim) {
  if (dim != 2) throw std::runtime_error("bad");
  return dim;
}

#if defined(DIAG_LIBRARY)
extern "C" long cvk_diag_caught(long dim) {  // -1: the exception was thrown and caught
  try {
    return check_rank(dim);
  } catch (const std::runtime_error&) {
    return -1;
  }
}
#else
static void attempt(const char* label, volatile long dim) {
  std::printf("BEGIN %s\n", label);
  std::fflush(stdout);
  try {
    long r = check_rank(dim);
    std::printf("RETURNED %s %ld\n", label, r);
  } catch (const std::runtime_error& e) {
    std::printf("RAISED %s std::runtime_error: %s\n", label, e.what());
  }
  std::fflush(stdout);
}

int main() {
  attempt("good", 2);
  attempt("bad", 3);
  attempt("good_after", 2);
  std::puts("END");
  return 0;
}
#endif
"""

# ------------------------------------------------------------------------------------------------
# the child: one fresh interpreter per test, printing each step before and after it, so the last
# "BEGIN" without an answer names the call that killed it
# ------------------------------------------------------------------------------------------------
CHILD_SOURCE = r'''
import json, re, sys
P = json.load(open(sys.argv[1]))
if P.get("faulthandler", True):
    import faulthandler
    faulthandler.enable()

def say(msg):
    print(msg, flush=True)

def describe(r):
    if hasattr(r, "shape") and hasattr(r, "dtype"):
        return "Tensor%s" % (tuple(r.shape),)
    if isinstance(r, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in r) + ")"
    if isinstance(r, dict):
        return json.dumps({str(k): (v if isinstance(v, (int, str)) else [str(i) for i in v]) for k, v in r.items()})
    return repr(r)[:200]

say("BEGIN import")
import importlib.util
if P["kind"] != "ctypes" or P.get("import_torch"):
    import torch
ext = None
if P["kind"] == "ctypes":
    import ctypes
    plain = ctypes.CDLL(P["path"])
    plain.cvk_diag_caught.argtypes, plain.cvk_diag_caught.restype = [ctypes.c_long], ctypes.c_long

    def caught(dim):
        r = plain.cvk_diag_caught(dim)
        if r == -1:
            raise RuntimeError("thrown and caught inside the C++ library")
        return r
elif P["kind"] in ("minimal", "real"):
    spec = importlib.util.spec_from_file_location(P["module"], P["path"])
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
say("RETURNED import ok")
with open("/proc/self/maps") as f:
    runtime = sorted({l.split()[-1] for l in f if re.search(r"lib(stdc\+\+|gcc_s|unwind|gomp|iomp5|c\+\+|c\+\+abi)[.-]", l)})
for lib in runtime:
    say("MAPS " + lib)

kind = P["kind"]
if kind == "ctypes":
    calls = [("good", lambda: caught(2)), ("bad", lambda: caught(3)), ("good_after", lambda: caught(2))]
else:
    x_cls, x_tokens, w = torch.randn(2, 8), torch.randn(2, 5, 8), torch.randn(2, 2, 8)
if kind == "minimal" and P.get("caught_only"):
    calls = [("caught_in_cpp", ext.caught_in_cpp)]
elif kind == "minimal":
    calls = [("info", ext.info), ("good", lambda: ext.check_2d(torch.zeros(2, 3))),
             ("bad", lambda: ext.check_2d(torch.zeros(3))), ("good_after", lambda: ext.check_2d(torch.zeros(2, 3)))]
elif kind == "real":
    calls = [("good", lambda: ext.cross_attention_core_forward(x_cls, x_tokens, w, 1e-6)),
             ("bad", lambda: ext.cross_attention_core_forward(x_cls[0], x_tokens, w, 1e-6)),
             ("good_after", lambda: ext.cross_attention_core_forward(x_cls, x_tokens, w, 1e-6))]
elif kind == "torch":  # c10::Error thrown in libtorch, translated by torch's own handlers
    calls = [("good", lambda: torch.zeros(2).sum()), ("bad", lambda: torch.empty(-1)),
             ("good_after", lambda: torch.zeros(2).sum())]
elif kind == "torch_pybind":  # c10::Error thrown under a pybind11-bound function of torch._C
    fn = getattr(torch._C, "_dispatch_find_schema_or_throw", None)
    if fn is None:
        say("SKIP torch._C._dispatch_find_schema_or_throw does not exist in this torch")
        sys.exit(0)
    calls = [("good", lambda: fn("aten::add", "Tensor")), ("bad", lambda: fn("aten::cvk_no_such_op", "")),
             ("good_after", lambda: fn("aten::add", "Tensor"))]
for label, call in calls:
    say("BEGIN " + label)
    try:
        r = call()
    except Exception as e:
        text = str(e).strip()
        say("RAISED %s %s: %s" % (label, type(e).__name__, text.splitlines()[0][:200] if text else ""))
    else:
        say("RETURNED %s %s" % (label, describe(r)))
say("END")
'''

# The native backtrace when gdb is missing: a handler installed before Python starts (LD_PRELOAD).
# Plain C so that preloading it does not pull a second C++ runtime into the process.
HANDLER_SOURCE = r"""
#define _GNU_SOURCE
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>
#include <unistd.h>

static void on_fatal(int sig, siginfo_t* info, void* uctx) {
  char line[160];
  unsigned long long ip = 0;
#if defined(__x86_64__)
  ip = (unsigned long long)((ucontext_t*)uctx)->uc_mcontext.gregs[REG_RIP];
#endif
  int n = snprintf(line, sizeof line, "\n==== native backtrace: signal %d, fault address %p, ip 0x%llx ====\n",
                   sig, info->si_addr, ip);
  write(2, line, (size_t)n);
  void* frames[64];
  int depth = backtrace(frames, 64);
  backtrace_symbols_fd(frames, depth, 2);
  write(2, "==== end of native backtrace ====\n", 34);
  signal(sig, SIG_DFL);  /* keep the exit status of the original signal */
  raise(sig);
}

__attribute__((constructor)) static void install(void) {
  /* the first backtrace() loads the unwinder; do it now rather than inside the handler */
  void* warm[2];
  backtrace(warm, 2);
  static char altstack[1 << 16];  /* a fault from runaway recursion leaves no stack to run on */
  stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack, .ss_flags = 0};
  sigaltstack(&ss, NULL);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_fatal;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESETHAND;
  int sigs[] = {SIGSEGV, SIGBUS, SIGABRT, SIGILL, SIGFPE};
  for (unsigned i = 0; i < sizeof sigs / sizeof sigs[0]; ++i) sigaction(sigs[i], &sa, NULL);
}
"""


# ------------------------------------------------------------------------------------------------
# variants and their outcome
# ------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    key: str
    title: str
    kind: str                     # program | ctypes | minimal | real | setup | torch | torch_pybind | installed
    cflags: list = field(default_factory=list)
    path: str | None = None       # the built (or installed) module
    module: str | None = None
    # filled in as it runs
    status: str = "NOT RUN"
    detail: str = ""
    build_s: float = 0.0
    stdout: str = ""
    stderr: str = ""
    notes: list = field(default_factory=list)
    caught: str = ""              # minimal variants: the throw+catch-inside child's verdict


def repo_flags(setup_py: str = os.path.join(REPO, "setup.py")) -> tuple[list, str]:
    """The C++ flags setup.py gives the CPU extension (its first ``cxx_flags = [...]``)."""
    try:
        with open(setup_py) as f:
            m = re.search(r"cxx_flags\s*=\s*(\[[^\]]*\])", f.read())
        if m:
            return list(ast.literal_eval(m.group(1))), "read from setup.py"
    except (OSError, ValueError, SyntaxError):
        pass
    return list(FALLBACK_REPO_FLAGS), "setup.py unreadable: built-in copy of its flags"


def make_variants(flags: list) -> list:
    without = lambda drop: [f for f in flags if f != drop]  # noqa: E731
    clones_note = "" if platform.machine() == "x86_64" else " (not x86-64: no clones)"
    return [
        Variant("cxx-1", "plain C++ program throws and catches (no Python, no torch)", "program"),
        Variant("cxx-2", "plain C++ program, throw inside a target_clones function" + clones_note, "program",
                ["-DDIAG_CLONES"]),
        Variant("py-1", "plain C++ library via ctypes, throws and catches inside (torch not imported)", "ctypes"),
        Variant("py-2", "the same library, torch imported first", "ctypes"),
        Variant("ctl-1", "control: torch raises itself (torch.empty(-1))", "torch"),
        Variant("ctl-2", "control: torch raises under pybind11 (torch._C._dispatch_find_schema_or_throw)",
                "torch_pybind"),
        Variant("inst", "the installed crossvit_kernels._C_cpu, as is", "installed"),
        Variant("a", "minimal, TORCH_CHECK, default flags", "minimal", []),
        Variant("b", "minimal, TORCH_CHECK, -fvisibility=hidden", "minimal", ["-fvisibility=hidden"]),
        Variant("c", "minimal, throw std::runtime_error", "minimal", ["-DDIAG_THROW_STD"]),
        # GCC compiles a call to a target_clones function as one that cannot throw (see cxx-2), so
        # this one is expected to abort wherever cxx-2 does
        Variant("d", "minimal, TORCH_CHECK in a target_clones function" + clones_note, "minimal", ["-DDIAG_CLONES"]),
        Variant("e", "real source, setup.py flags", "real", flags),
        Variant("f", "real source, without -fvisibility=hidden", "real", without("-fvisibility=hidden")),
        Variant("g", "real source, -DCVK_NO_CLONES", "real", flags + ["-DCVK_NO_CLONES"]),
        Variant("h", "real source, without -fopenmp", "real", without("-fopenmp")),
        Variant("s", "real source built by `setup.py build_ext` (the install path)", "setup"),
    ]


def parse_child(stdout: str) -> tuple[dict, list, list]:
    """Outcome of each call ({label: ("RETURNED"|"RAISED", text)}), the labels begun in order, and
    the SKIP reasons, from the child's progress lines."""
    events, begun, skips = {}, [], []
    for line in stdout.splitlines():
        if line.startswith("BEGIN "):
            begun.append(line[6:].strip())
        elif line.startswith(("RETURNED ", "RAISED ")):
            what, _, rest = line.partition(" ")
            label, _, text = rest.partition(" ")
            events[label] = (what, text)
        elif line.startswith("SKIP "):
            skips.append(line[5:])
    return events, begun, skips


def signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def classify(returncode, stdout: str, stderr: str = "", expected: str = "RuntimeError") -> tuple[str, str]:
    """(status, detail) of one child run. returncode None = it did not finish in time; negative =
    killed by that signal (subprocess's convention). `expected`: the exception type the call that
    must fail should end in."""
    events, begun, skips = parse_child(stdout)
    pending = [b for b in begun if b not in events]
    where = f" during the {pending[-1]!r} call" if pending else ""
    if returncode is None:
        return "TIMEOUT", "no answer within the time limit" + where
    if returncode < 0:
        why = ""
        if -returncode == signal.SIGABRT and "terminate called" in stderr:
            why = " (std::terminate: the exception found no handler)"
        return "CRASH", signal_name(-returncode) + why + where
    if skips and "bad" not in events:
        return "N/A", skips[0]
    if returncode != 0:
        last = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        return "ERROR", f"exit {returncode}{where}" + (f": {last[-1][:200]}" if last else "")
    bad = events.get("bad")
    if bad is None:
        return "ERROR", "the call that must raise never ran"
    if bad[0] == "RETURNED":
        return "NO ERROR", "the call that must raise returned " + bad[1][:120]
    exc_type, _, message = bad[1].partition(": ")
    if exc_type != expected:
        return "WRONG EXCEPTION", bad[1][:160]
    for label in ("good", "good_after"):
        if label in events and events[label][0] != "RETURNED":
            return "ERROR", f"the {label!r} call raised: {events[label][1][:160]}"
    return "OK", f"{exc_type} raised: {message.strip()[:100]}"


def caught_verdict(returncode, stdout: str, stderr: str) -> str:
    """The outcome of the child that only throws and catches inside the extension."""
    events, _, _ = parse_child(stdout)
    if returncode is None:
        return "TIMEOUT"
    if returncode < 0:
        return "CRASH " + signal_name(-returncode) + (" (std::terminate)" if "terminate called" in stderr else "")
    outcome = events.get("caught_in_cpp")
    if outcome and outcome[0] == "RETURNED" and "caught" in outcome[1]:
        return "OK"
    return f"ERROR (exit {returncode}: {outcome[1][:100] if outcome else 'no answer'})"


def first_compiler_error(text: str) -> str:
    """The first line that says what the compiler (or linker) rejected."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for pattern in (r"(fatal )?error:", r"undefined reference|cannot find -l|No such file", r"error"):
        for ln in lines:
            if re.search(pattern, ln, re.IGNORECASE) and not ln.startswith(("Traceback", "RuntimeError: Error building")):
                return ln[:300]
    lines = [ln for ln in lines if not re.match(r"W\d{4} ", ln)]  # torch's logged warnings say nothing here
    return lines[-1][:300] if lines else "(no output)"


# ------------------------------------------------------------------------------------------------
# running things
# ------------------------------------------------------------------------------------------------
class Report:
    """Every line goes to stdout and to the report file at once: a run cut short keeps its findings."""

    def __init__(self, path: str | None):
        self.lock = threading.Lock()
        self.file = open(path, "w", buffering=1) if path else None
        self.t0 = time.monotonic()

    def __call__(self, text: str = "") -> None:
        with self.lock:
            print(text, flush=True)
            if self.file:
                self.file.write(text + "\n")

    def progress(self, text: str) -> None:
        self(f"[+{time.monotonic() - self.t0:5.0f}s] {text}")

    def section(self, title: str) -> None:
        self("")
        self(f"==== {title} " + "=" * max(0, 90 - len(title)))


LIVE: set = set()       # child processes of ours still running, killed if we are stopped
LIVE_LOCK = threading.Lock()
STOPPING = threading.Event()


def run_capture(cmd, timeout, env=None, cwd=None):
    """(returncode or None on timeout, stdout, stderr). The child gets its own process group so
    that on a timeout its compilers go with it."""
    with LIVE_LOCK:
        if STOPPING.is_set():
            return None, "", "(not started: the diagnosis was stopped)"
        try:
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                                 env=env, cwd=cwd, start_new_session=True)
        except OSError as exc:  # a missing compiler or debugger is a finding, not a reason to stop
            return 127, "", f"{cmd[0]}: {exc}"
        LIVE.add(p)
    try:
        out, err = p.communicate(timeout=max(1.0, timeout))
        return p.returncode, out, err
    except subprocess.TimeoutExpired:
        kill_group(p)
        out, err = p.communicate()
        return None, out, err
    finally:
        with LIVE_LOCK:
            LIVE.discard(p)


def kill_group(p, grace_s: float = 3.0) -> None:
    """Stop a child of ours and its process group. SIGTERM first: ninja puts each compiler in a
    group of its own and only passes the stop on to them when it is asked politely."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            p.wait(grace_s)
            if sig == signal.SIGTERM:
                time.sleep(0.2)  # let ninja's compilers see its SIGINT before the group goes
        except subprocess.TimeoutExpired:
            pass


def tool_output(cmd, timeout=30) -> str:
    if shutil.which(cmd[0]) is None:
        return f"({cmd[0]} is not installed)"
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout)
        return (p.stdout + p.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"({' '.join(cmd)} failed: {exc})"


def tail(text: str, n_chars: int) -> str:
    text = text.strip()
    return text if len(text) <= n_chars else "..." + text[-n_chars:]


def exported_symbols(path: str) -> tuple[list | None, str]:
    """Exception-related symbols that `path` defines in its dynamic symbol table: where one of them
    is defined decides which copy every other library uses."""
    tools = [t for t in ("nm", "readelf") if shutil.which(t)]
    if not tools:
        return None, "neither nm nor readelf is installed: skipped"
    if "nm" in tools:
        p = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True, errors="replace")
        if p.returncode == 0:
            names = {ln.split()[-1].split("@")[0] for ln in p.stdout.splitlines() if len(ln.split()) >= 3}
            return sorted(n for n in names if EXCEPTION_SYMBOLS.match(n)), "nm -D"
    if "readelf" in tools:
        p = subprocess.run(["readelf", "--dyn-syms", "--wide", path], capture_output=True, text=True, errors="replace")
        if p.returncode == 0:
            names = set()
            for ln in p.stdout.splitlines():
                cols = ln.split()
                # Num: Value Size Type Bind Vis Ndx Name
                if len(cols) >= 8 and cols[0].endswith(":") and cols[6] != "UND":
                    names.add(cols[7].split("@")[0])
            return sorted(n for n in names if EXCEPTION_SYMBOLS.match(n)), "readelf --dyn-syms"
    return None, f"{' and '.join(tools)} could not read it"


def runtime_note(path: str) -> str:
    """One line: the C++ runtime a built library links, and the exception symbols it exports."""
    lines = [re.sub(r"\s*\(0x[0-9a-f]+\)", "", ln.strip()) for ln in tool_output(["ldd", path]).splitlines()
             if re.search(r"libstdc\+\+|libgcc_s|libgomp|libunwind|libc\+\+|not found", ln)]
    names, how = exported_symbols(path)
    exports = how if names is None else (", ".join(names) or "none")
    return f"ldd: {'; '.join(lines) or '(no C++ runtime)'} | exports: {exports}"


# ------------------------------------------------------------------------------------------------
# 1. the toolchain
# ------------------------------------------------------------------------------------------------
def toolchain(rep: Report, torch) -> dict:
    rep.section("1. toolchain")
    facts = {}
    exe = os.path.realpath(sys.executable)
    rep(f"date          : {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  host {platform.node()}")
    rep(f"platform      : {platform.platform()}  machine {platform.machine()}  cpus {os.cpu_count()}")
    try:
        with open("/etc/os-release") as f:
            rep("os            : " + next((ln.split("=", 1)[1].strip().strip('"') for ln in f
                                            if ln.startswith("PRETTY_NAME=")), "?"))
    except OSError:
        pass
    rep(f"glibc         : {'-'.join(platform.libc_ver())}")
    rep(f"sys.version   : {sys.version.splitlines()[0]}" + (" " + " ".join(sys.version.splitlines()[1:])))
    rep(f"executable    : {sys.executable} -> {exe}")
    rep(f"prefix        : {sys.prefix} (base {sys.base_prefix})")
    for var in ("CC", "CXX", "LDSHARED", "LDCXXSHARED", "CFLAGS", "LDFLAGS", "Py_ENABLE_SHARED", "LDLIBRARY",
                "LIBDIR", "EXT_SUFFIX", "CONFIG_ARGS"):
        value = sysconfig.get_config_var(var)
        if value is not None:
            rep(f"sysconfig {var:<12}: {tail(str(value), 600) if var == 'CONFIG_ARGS' else value}")
    env = [f"{k}={os.environ[k]!r}" for k in ("CC", "CXX", "CFLAGS", "CXXFLAGS", "LDFLAGS", "CPATH",
                                               "CPLUS_INCLUDE_PATH", "LIBRARY_PATH", "LD_LIBRARY_PATH", "LD_PRELOAD",
                                               "MAX_JOBS", "TORCH_SHOW_CPP_STACKTRACES", "PYTHONPATH")
           if k in os.environ]
    rep("environment   : " + (", ".join(env) or "(none of the compiler/loader variables is set)"))

    rep("")
    rep(f"ldd {exe}:")
    rep("    " + "\n    ".join(ln.strip() for ln in tool_output(["ldd", exe]).splitlines()))
    libpython = None
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and sysconfig.get_config_var("LDLIBRARY"):
        cand = os.path.join(sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("LDLIBRARY"))
        libpython = cand if os.path.exists(cand) else None

    rep("")
    for name in ("c++", "g++", "gcc", "cc"):
        path = shutil.which(name)
        if path:
            rep(f"{name:<4}: {path} -> {os.path.realpath(path)}: {tool_output([name, '--version']).splitlines()[0]}")
        else:
            rep(f"{name:<4}: not installed")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx):
        for lib in ("libstdc++.so", "libgcc_s.so.1"):
            rep(f"{cxx} -print-file-name={lib}: {tool_output([cxx, '-print-file-name=' + lib])}")

    rep("")
    torch_dir = os.path.dirname(torch.__file__)
    rep(f"torch         : {torch.__version__} at {torch_dir}; cuda {torch.version.cuda}; "
        f"cxx11 abi {torch.compiled_with_cxx11_abi()}")
    built_with = [ln.strip() for ln in torch.__config__.show().splitlines() if re.match(r"\s*- (GCC|Clang|C\+\+)", ln)]
    m = re.search(r"CXX_COMPILER=([^,]+)", torch.__config__.show())
    rep(f"torch built   : {'; '.join(built_with)}" + (f"; CXX_COMPILER={m.group(1)}" if m else ""))
    common_h = os.path.join(torch_dir, "include", "pybind11", "detail", "common.h")
    try:
        with open(common_h) as f:
            parts = dict(re.findall(r"#define PYBIND11_VERSION_(MAJOR|MINOR|MICRO|PATCH)\s+(\S+)", f.read()))
        facts["torch_pybind11"] = ".".join(parts.get(k, "?") for k in ("MAJOR", "MINOR", "MICRO" if "MICRO" in parts
                                                                         else "PATCH"))
    except OSError:
        facts["torch_pybind11"] = "(no bundled pybind11 headers)"
    rep(f"pybind11 bundled with torch: {facts['torch_pybind11']} ({common_h})")
    for attr in ("_PYBIND11_COMPILER_TYPE", "_PYBIND11_STDLIB", "_PYBIND11_BUILD_ABI", "_GLIBCXX_USE_CXX11_ABI"):
        rep(f"torch._C.{attr}: {getattr(torch._C, attr, '(absent)')!r}")
    try:
        import pybind11  # a separately installed copy could shadow torch's headers
        rep(f"pip pybind11  : {pybind11.__version__} (includes {pybind11.get_include()})")
    except ImportError:
        rep("pip pybind11  : not installed")

    lib_dir = os.path.join(torch_dir, "lib")
    facts["torch_libs"] = [os.path.join(lib_dir, n) for n in ("libc10.so", "libtorch_python.so")
                           if os.path.exists(os.path.join(lib_dir, n))]
    for lib in facts["torch_libs"]:
        rep("")
        rep(f"ldd {lib} (C/C++ runtime lines):")
        lines = [ln.strip() for ln in tool_output(["ldd", lib]).splitlines()
                 if re.search(r"libstdc\+\+|libgcc_s|libgomp|libunwind|libc\+\+|libpython|libc\.so|not found", ln)]
        rep("    " + "\n    ".join(lines or ["(nothing)"]))

    rep("")
    rep("exception-related symbols each file EXPORTS (defines) -- normally only libgcc_s / libstdc++ / "
        "libc10 (c10::Error typeinfo) do:")
    scan = [exe] + ([libpython] if libpython else []) + facts["torch_libs"]
    if os.path.isdir(lib_dir):
        scan += [os.path.join(lib_dir, n) for n in sorted(os.listdir(lib_dir))
                 if re.match(r"lib(gomp|torch|shm)\b.*\.so", n) and os.path.isfile(os.path.join(lib_dir, n))]
    libs_dir = torch_dir + ".libs"  # the libraries a manylinux wheel carries with it
    if os.path.isdir(libs_dir):
        scan += [os.path.join(libs_dir, n) for n in sorted(os.listdir(libs_dir))
                 if ".so" in n and os.path.isfile(os.path.join(libs_dir, n))]
    for path in dict.fromkeys(scan):
        names, how = exported_symbols(path)
        shown = "skipped: " + how if names is None else (", ".join(names) if names else "none")
        rep(f"    {path}: {shown}")
    facts["interpreter_exports"] = exported_symbols(exe)[0]
    return facts


# ------------------------------------------------------------------------------------------------
# 2. building and calling the variants
# ------------------------------------------------------------------------------------------------
BUILDER_SOURCE = r'''
import json, sys
P = json.load(open(sys.argv[1]))
from torch.utils.cpp_extension import load
m = load(name=P["module"], sources=P["sources"], extra_cflags=P["cflags"], build_directory=P["build_dir"],
         verbose=False)
print("BUILT " + m.__file__)
'''


class Runner:
    def __init__(self, rep: Report, work: str, deadline: float, py: str):
        self.rep, self.work, self.deadline, self.py = rep, work, deadline, py
        self.child = os.path.join(work, "child.py")
        with open(self.child, "w") as f:
            f.write(CHILD_SOURCE)
        self.minimal = os.path.join(work, "diag_minimal.cpp")
        with open(self.minimal, "w") as f:
            f.write(MINIMAL_SOURCE)
        self.builder = os.path.join(work, "builder.py")
        with open(self.builder, "w") as f:
            f.write(BUILDER_SOURCE)

    def build_plain(self, variants: list) -> None:
        """The program and ctypes variants: one plain C++ file, compiled in about a second each, so
        before the pool (both ctypes variants share one library)."""
        cxx = os.environ.get("CXX", "c++")  # what torch.utils.cpp_extension compiles with
        src = os.path.join(self.work, "diag_plain.cpp")
        with open(src, "w") as f:
            f.write(PLAIN_SOURCE)
        built = {}
        for v in variants:
            if v.kind not in ("program", "ctypes"):
                continue
            out = os.path.join(self.work, "diag_plain.so" if v.kind == "ctypes" else f"diag_prog_{v.key}")
            if out not in built:
                cmd = [cxx, "-O2", "-o", out, src] + v.cflags
                if v.kind == "ctypes":
                    cmd += ["-shared", "-fPIC", "-DDIAG_LIBRARY"]
                t0 = time.monotonic()
                rc, o, e = run_capture(cmd, 60)
                built[out] = (rc == 0 and os.path.exists(out), first_compiler_error(o + e) if rc != 0 else "")
                v.build_s = time.monotonic() - t0
                v.notes.append(" ".join(cmd))
            ok, err = built[out]
            if ok:
                v.path = out
            else:
                v.status, v.detail = "BUILD FAILED", err

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def params(self, v: Variant, **extra) -> str:
        path = os.path.join(self.work, f"params_{v.key}.json")
        kind = "real" if v.kind in ("setup", "installed") else v.kind
        with open(path, "w") as f:
            json.dump({"kind": kind, "module": v.module, "path": v.path, **extra}, f)
        return path

    def child_cmd(self, v: Variant, **extra) -> list:
        if v.kind == "program":
            return [v.path]
        if v.key == "py-2":
            extra["import_torch"] = True
        return [self.py, self.child, self.params(v, **extra)]

    # -- building ---------------------------------------------------------------------------
    def build(self, v: Variant) -> bool:
        if v.kind in ("torch", "torch_pybind"):
            return True
        if v.kind in ("program", "ctypes"):
            return v.path is not None
        if v.kind == "installed":
            return self.find_installed(v)
        if self.left() < MIN_BUILD_S:
            v.status, v.detail = "SKIPPED", "the time budget ran out before its build"
            return False
        t0 = time.monotonic()
        build_dir = os.path.join(self.work, f"build_{v.key}")
        os.makedirs(build_dir, exist_ok=True)
        if v.kind == "setup":
            ok, out = self.build_with_setup(v, build_dir)
        else:
            v.module = f"cvk_diag_{v.key}"
            src = self.minimal if v.kind == "minimal" else CPU_SOURCE
            with open(os.path.join(build_dir, "params.json"), "w") as f:
                json.dump({"module": v.module, "sources": [src], "cflags": v.cflags, "build_dir": build_dir}, f)
            rc, out, err = run_capture([self.py, self.builder, os.path.join(build_dir, "params.json")],
                                       self.left() - BUILD_MARGIN_S)
            out = out + "\n" + err
            built = re.search(r"^BUILT (.+)$", out, re.MULTILINE)
            so = os.path.join(build_dir, v.module + ".so")
            if built:
                v.path = built.group(1).strip()
            elif os.path.exists(so):  # built, but loading it in the builder failed
                v.path = so
                v.notes.append(f"built, but importing it in the builder failed (rc {rc}): {tail(out, 300)}")
            ok = v.path is not None
            if rc is None:
                out += "\n(build stopped: time budget)"
            ninja = os.path.join(build_dir, "build.ninja")
            if os.path.exists(ninja):
                with open(ninja) as f:
                    v.notes += [ln.strip() for ln in f if re.match(r"\s*(cflags|post_cflags|ldflags)\s*=", ln)]
        v.build_s = time.monotonic() - t0
        if not ok:
            v.status, v.detail = "BUILD FAILED", first_compiler_error(out)
            v.stderr = out
        return ok

    def build_with_setup(self, v: Variant, build_dir: str) -> tuple[bool, str]:
        """The real source compiled the way `pip install -e .` compiles it (setuptools picks the
        interpreter's own sysconfig flags), from a copy of the files setup.py reads."""
        tree = os.path.join(build_dir, "tree")
        os.makedirs(os.path.join(tree, "crossvit_kernels"), exist_ok=True)
        shutil.copy(os.path.join(REPO, "setup.py"), tree)
        shutil.copytree(os.path.join(REPO, "csrc"), os.path.join(tree, "csrc"), dirs_exist_ok=True)
        shutil.copy(os.path.join(REPO, "crossvit_kernels", "_version.py"), os.path.join(tree, "crossvit_kernels"))
        env = dict(os.environ, CROSSVIT_KERNELS_NO_CUDA="1", MAX_JOBS="1")
        rc, out, err = run_capture([self.py, "setup.py", "build_ext", "--build-lib", "lib", "--build-temp", "tmp"],
                                   self.left() - BUILD_MARGIN_S, env=env, cwd=tree)
        out = out + "\n" + err
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        so = os.path.join(tree, "lib", "crossvit_kernels", "_C_cpu" + suffix)
        # the commands setuptools ran: their flags are what this path adds to the plain build
        v.notes += [tail(ln.strip(), 700) for ln in out.splitlines()
                    if "crossvit_cpu" in ln and re.search(r"(\+\+|gcc|cc)\s", ln)][:4]
        v.notes += [tail(ln.strip(), 700) for ln in out.splitlines() if " -shared" in ln][:2]
        ninja = os.path.join(tree, "tmp", "build.ninja")
        if os.path.exists(ninja):
            with open(ninja) as f:
                v.notes += [ln.strip() for ln in f if re.match(r"\s*(cflags|post_cflags|ldflags)\s*=", ln)]
        if os.path.exists(so):
            v.path, v.module = so, "crossvit_kernels._C_cpu"
            return True, out
        return False, out + f"\n(setup.py exited {rc} without producing {so})"

    def find_installed(self, v: Variant) -> bool:
        """The extension as installed in place (pip -e) or in site-packages, found by file name so
        that the package itself (and what it imports) is not loaded."""
        import site
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        roots = [REPO] + (site.getsitepackages() if hasattr(site, "getsitepackages") else [])
        for root in roots:
            cand = os.path.join(root, "crossvit_kernels", "_C_cpu" + suffix)
            if os.path.exists(cand):
                v.path, v.module = cand, "crossvit_kernels._C_cpu"
                v.notes.append(f"found {cand}")
                return True
        v.status = "N/A"
        v.detail = f"no crossvit_kernels/_C_cpu{suffix} in {roots} (run the install step first to test it)"
        return False

    # -- calling ----------------------------------------------------------------------------
    def test(self, v: Variant) -> None:
        rc, out, err = run_capture(self.child_cmd(v), min(TEST_TIMEOUT_S, max(5.0, self.left())))
        v.stdout, v.stderr = out, err
        v.status, v.detail = classify(rc, out, err, "std::runtime_error" if v.kind == "program" else "RuntimeError")
        if v.kind == "minimal":
            # in a process of its own: whether the exception can be thrown and caught without ever
            # leaving the extension, whatever the call above did
            rc, out, err = run_capture(self.child_cmd(v, caught_only=True), min(TEST_TIMEOUT_S, max(5.0, self.left())))
            v.caught = caught_verdict(rc, out, err)
            v.detail += f"; throw+catch inside the extension: {v.caught}"
            if not v.caught.startswith("OK"):
                v.stderr += "\n--- the throw+catch child ---\n" + tail(err, 1500)

    def run(self, v: Variant) -> Variant:
        try:
            if self.build(v):
                if v.build_s and v.kind not in ("program", "ctypes"):
                    self.rep.progress(f"built {v.key} ({v.build_s:.0f}s): {v.path}")
                if v.path:
                    v.notes.append(runtime_note(v.path))
                self.test(v)
        except Exception as exc:  # a bug here must not lose the other variants
            v.status, v.detail = "ERROR", f"diagnosis script failed: {type(exc).__name__}: {exc}"
        if STOPPING.is_set() and v.status not in ("OK", "CRASH"):
            v.status, v.detail = "STOPPED", "the diagnosis was stopped while this ran"
            return v
        self.rep.progress(f"{v.key:<5} {v.status:<13} {v.detail}")
        return v


def report_variants(rep: Report, variants: list) -> bool:
    runtime_seen = None
    for v in variants:
        maps = sorted(ln[5:] for ln in v.stdout.splitlines() if ln.startswith("MAPS "))
        if maps and maps != runtime_seen:
            v.notes.append("C++ runtime mapped in the child: " + ", ".join(maps))
            runtime_seen = maps
        report_variant(rep, v)
    return True


def report_variant(rep: Report, v: Variant) -> None:
    rep("")
    rep(f"-- {v.key}: {v.title}")
    if v.cflags:
        rep(f"   extra flags : {' '.join(v.cflags)}")
    rep(f"   result      : {v.status}  {v.detail}")
    if v.build_s:
        rep(f"   build       : {v.build_s:.0f}s -> {v.path}")
    for note in dict.fromkeys(v.notes):
        rep(f"   note        : {note}")
    if v.stdout.strip():
        lines = [ln for ln in v.stdout.strip().splitlines() if not ln.startswith("MAPS ")]
        rep("   child stdout: " + "\n                 ".join(lines[-14:]))
    if v.stderr.strip() and v.status not in ("OK", "N/A"):
        rep("   child stderr: " + tail(v.stderr, 1800).replace("\n", "\n                 "))


# ------------------------------------------------------------------------------------------------
# 3. the backtrace of the first crash
# ------------------------------------------------------------------------------------------------
def backtrace_of(rep: Report, runner: Runner, v: Variant) -> None:
    rep.section(f"3. native backtrace of the first crash: {v.key} ({v.title})")
    compiler = shutil.which("gcc") or shutil.which("cc")
    handler_so = os.path.join(runner.work, "diag_sighandler.so")
    if compiler is None:
        rep("preloaded signal handler: skipped (no C compiler: gcc / cc)")
    elif runner.left() < 15:
        rep("preloaded signal handler: skipped (time budget)")
    else:
        src = os.path.join(runner.work, "diag_sighandler.c")
        with open(src, "w") as f:
            f.write(HANDLER_SOURCE)
        p = subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", handler_so, src], capture_output=True, text=True)
        if p.returncode != 0:
            rep(f"preloaded signal handler: could not be compiled: {first_compiler_error(p.stderr)}")
        else:
            env = dict(os.environ, LD_PRELOAD=handler_so)
            rc, out, err = run_capture(runner.child_cmd(v, faulthandler=False), min(60, runner.left()), env=env)
            rep(f"preloaded signal handler (LD_PRELOAD, faulthandler off): exit {rc}")
            rep("    " + "\n    ".join([ln for ln in out.strip().splitlines() if not ln.startswith("MAPS ")][-6:]))
            rep("    " + tail(err, 6000).replace("\n", "\n    "))

    rep("")
    gdb = shutil.which("gdb")
    if gdb is None:
        rep("gdb: not installed (the backtrace above is the native one)")
    elif runner.left() < 20:
        rep("gdb: skipped (time budget)")
    else:
        env = {k: val for k, val in os.environ.items() if k != "DEBUGINFOD_URLS"}  # never reach the network
        cmd = [gdb, "-nx", "-batch", "-iex", "set debuginfod enabled off", "-iex", "set auto-load python-scripts off",
               "-ex", "set pagination off",
               "-ex", "set startup-with-shell off", "-ex", "set disable-randomization off",
               "-ex", "set print thread-events off", "-ex", "run", "-ex", "bt 40", "-ex", "info registers rip",
               "-ex", "x/6i $pc", "-ex", "info sharedlibrary", "--args"] + runner.child_cmd(v, faulthandler=False)
        rc, out, err = run_capture(cmd, min(150, runner.left() - 5), env=env)
        lines = [ln for ln in (out + "\n" + err).splitlines()
                 if ln.strip() and not re.match(r"\[(New Thread|Thread debugging|Detaching|Inferior)|Using host libthread",
                                                ln) and not ln.startswith("MAPS ")]
        rep(f"gdb -batch -ex run -ex bt ... (exit {rc}{', stopped: time budget' if rc is None else ''}):")
        rep("    " + "\n    ".join(lines[:250]) + (f"\n    ... {len(lines) - 250} more lines" if len(lines) > 250 else ""))

    rep("")
    if runner.left() < 10:
        rep("LD_DEBUG=bindings: skipped (time budget)")
        return
    ld_debug_bindings(rep, runner, v)


LD_INTERESTING = re.compile(r"_Unwind_|__cxa_throw|__gxx_personality|__cxa_begin_catch|_ZTI")
LD_BINDING = re.compile(r"binding file (\S+) \[\d+\] to (\S+) \[\d+\]: (?:normal|protected|indirect)? ?symbol `([^']+)'")
# the libraries whose own bindings matter for a throw from the extension (the rest of torch's
# dependencies repeat the same story hundreds of times)
LD_CORE = re.compile(r"(^|/)python[\d.]*\s|libpython|libstdc\+\+|libgcc_s|libunwind|libc10\.so|libtorch_python|"
                     r"/_C\.cpython")


THROWN_TYPES = ("_ZTIN3c105ErrorE", "_ZTISt9exception", "_ZTISt13runtime_error")  # c10::Error and its bases


def expected_provider(sym: str) -> str | None:
    """The library that normally defines `sym` (None: no opinion)."""
    if sym.startswith("_Unwind_"):
        return "libgcc_s"
    if sym == "_ZTIN3c105ErrorE":
        return "libc10"
    if sym.startswith(("__cxa_", "__gxx_personality")) or sym in THROWN_TYPES:
        return "libstdc++"
    return None


def ld_debug_bindings(rep: Report, runner: Runner, v: Variant, cap: int = 200) -> None:
    """Which library provides the unwinder, the personality routine, __cxa_throw and the typeinfo
    of the thrown type to which library, in the process that crashes. The loader's log of a torch
    import is large, so it is filtered as it streams."""
    env = dict(os.environ, LD_DEBUG="bindings")
    p = subprocess.Popen(runner.child_cmd(v), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         errors="replace", env=env, start_new_session=True)
    with LIVE_LOCK:
        LIVE.add(p)
    timer = threading.Timer(min(90, runner.left()), kill_group, (p,))
    timer.start()
    ext_name = os.path.basename(v.path or "") or "\0"
    providers: dict = {}     # (symbol, provider) -> consumers
    own, other = [], []      # raw lines: those of the extension itself first
    try:
        for line in p.stderr:
            if not LD_INTERESTING.search(line):
                continue
            m = LD_BINDING.search(line)
            if not m:
                continue
            consumer, provider, sym = m.groups()
            if sym.startswith("_ZTI") and (consumer == provider or ext_name not in line and sym not in THROWN_TYPES):
                continue  # typeinfo bindings of all of torch: only those of the extension and the thrown types
            providers.setdefault((sym, provider), set()).add(os.path.basename(consumer))
            if ext_name in line:
                own.append(line.strip())
            elif LD_CORE.search(consumer + " "):
                other.append(line.strip())
        stdout = p.stdout.read()
        p.wait()
    finally:
        timer.cancel()
        with LIVE_LOCK:
            LIVE.discard(p)
    steps = [ln for ln in stdout.splitlines() if ln.startswith(("BEGIN", "RAISED", "RETURNED"))]
    rep(f"LD_DEBUG=bindings (exit {p.returncode}; last steps: {' | '.join(s[:60] for s in steps[-3:])}):")
    rep("  who provides what (symbol <- provider: consumers):")
    for (sym, provider), consumers in sorted(providers.items()):
        names = sorted(consumers)
        usual = expected_provider(sym)
        # a library resolving to itself is its own business, and a program's copy of a typeinfo is
        # how copy relocations work; anything else away from the usual library is worth a look
        foreign = set(names) - {os.path.basename(provider)}
        copy_reloc = sym.startswith("_ZTI") and ".so" not in os.path.basename(provider)
        flag = "   <-- UNUSUAL provider" if usual and usual not in os.path.basename(provider) and foreign \
            and not copy_reloc else ""
        rep(f"    {sym} <- {provider}: {', '.join(names[:6])}" + (f" (+{len(names) - 6})" if len(names) > 6 else "")
            + flag)
    raw = own + other
    rep(f"  raw bindings ({len(own)} of the extension, then those of the interpreter, libstdc++, libgcc_s, "
        f"libc10, libtorch_python; at most {cap}):")
    rep("    " + "\n    ".join(raw[:cap]) if raw else "    (none seen)")


# ------------------------------------------------------------------------------------------------
# 4. summary
# ------------------------------------------------------------------------------------------------
def observations(by_key: dict, torch_pybind11: str) -> list:
    """What the pattern of results points at. Hints for the reader, not verdicts."""
    st = {k: v.status for k, v in by_key.items()}
    crash = lambda k: st.get(k) == "CRASH"  # noqa: E731
    ok = lambda k: st.get(k) == "OK"  # noqa: E731
    aborts = lambda k: crash(k) and "std::terminate" in by_key[k].detail  # noqa: E731
    out = []
    extensions = [k for k, v in by_key.items() if v.kind not in ("program", "ctypes")]
    if extensions and not any(crash(k) for k in extensions):
        out.append("No extension crashed: every C++ exception raised inside one reached Python as RuntimeError here.")
    if crash("cxx-1"):
        out.append("Even a plain C++ program cannot throw and catch: the compiler's C++ runtime is broken here.")
    if ok("cxx-1") and crash("py-1"):
        out.append("A plain C++ library loaded into this interpreter (no torch) cannot throw and catch: the "
                   "interpreter breaks unwinding; see the symbols it exports and the LD_DEBUG providers.")
    if ok("py-1") and crash("py-2"):
        out.append("Throw-and-catch works until torch is imported: a library torch loads takes over the unwinder "
                   "or the C++ runtime; see the LD_DEBUG providers.")
    if crash("ctl-1") or crash("ctl-2"):
        out.append("torch's OWN C++ errors crash this interpreter: the cause is not in our source or build.")
    d = by_key.get("d")
    d_aborts = d is not None and "std::terminate" in d.caught
    if aborts("cxx-2") or d_aborts:
        out.append("This GCC compiles a call to a target_clones function as if it could not throw: a try/catch "
                   "around such a call is dropped and the exception ends in std::terminate ("
                   + ", ".join(k for k, hit in (("cxx-2", aborts("cxx-2")), ("d's throw+catch child", d_aborts)) if hit)
                   + "); an exception leaving through pybind11's own handler is still caught. Not the SIGSEGV "
                   "under study, but no check may ever throw from inside a CVK_HOT (target_clones) kernel.")
    a = by_key.get("a")
    if a is not None and a.status == "CRASH" and not aborts("a"):
        if a.caught.startswith("CRASH"):
            out.append("The minimal extension crashes even when it catches its own exception: throwing/unwinding "
                       "itself is broken (C++ runtime or unwinder), pybind11's translation is not involved.")
        elif ok("c"):
            out.append("c10::Error crashes, std::runtime_error does not: suspect what c10::Error does beyond a "
                       "plain exception (it records a C++ backtrace when it is built) or its typeinfo.")
        elif crash("c"):
            out.append("Any exception leaving a freshly built minimal extension for Python crashes, while "
                       "throw-and-catch inside it works: suspect where the exception crosses into pybind11's "
                       "dispatcher and its exception translators.")
    if ok("a") and crash("e"):
        fixes = [k for k in ("f", "g", "h") if ok(k)]
        out.append("The minimal extension raises correctly but the real source crashes"
                   + (f"; it raises again in variant(s) {', '.join(fixes)}: that flag/feature is the trigger."
                      if fixes else "; none of f/g/h alone fixes it."))
    if crash("s") and ok("e"):
        out.append("Only the setup.py build crashes: the difference is in the flags setuptools adds "
                   "(see the commands in variant s).")
    if st.get("inst") in ("CRASH", "ERROR", "WRONG EXCEPTION", "NO ERROR") and ok("s"):
        out.append(f"The installed extension fails ({st['inst']}) but a fresh setup.py build works: the installed "
                   "file is stale or was built against another torch or toolchain; rebuild it.")
    info = next((v for v in by_key.values() if v.kind == "minimal" and "RETURNED info" in v.stdout), None)
    if info is not None:
        line = next(ln for ln in info.stdout.splitlines() if ln.startswith("RETURNED info"))
        try:
            data = json.loads(line.split(" ", 2)[2])
            if data.get("pybind11_compiled") != torch_pybind11:
                out.append(f"The extension was compiled against pybind11 {data.get('pybind11_compiled')}, torch "
                           f"bundles {torch_pybind11}: another pybind11 is on the include path.")
            keys = data.get("interpreter_state_keys") or []
            if len([k for k in keys if "internals" in k]) > 1:
                out.append(f"Several pybind11 internals live in this interpreter ({keys}): the extension and torch "
                           "do not share exception translators.")
        except (ValueError, IndexError):
            pass
    return out


def summary(rep: Report, variants: list, facts: dict, total_s: float) -> None:
    rep.section("4. summary")
    rep(f"{'variant':<7} {'result':<15} what")
    for v in variants:
        rep(f"{v.key:<7} {v.status:<15} {v.title}")
        if v.status != "OK" or (v.caught and v.caught != "OK"):
            rep(f"{'':<23}-> {v.detail}")
    rep("")
    for line in observations({v.key: v for v in variants}, facts.get("torch_pybind11", "?")):
        rep("* " + line)
    exports = facts.get("interpreter_exports")
    if exports:
        rep(f"* The interpreter itself exports {', '.join(exports)}: these copies take precedence over "
            "libgcc_s / libstdc++ for every library in the process.")
    rep(f"total {total_s:.0f}s")


# ------------------------------------------------------------------------------------------------
# Which crash gets the backtrace: a signal other than an std::terminate abort first (that is the
# failure under study; an abort here is a C++ program's own verdict), then the extension variants
# that tell most, the controls last.
BACKTRACE_PREFERENCE = ["a", "e", "inst", "s", "b", "c", "f", "g", "h", "d", "py-2", "py-1", "ctl-1", "ctl-2",
                        "cxx-1", "cxx-2"]


def first_crash(variants: list):
    crashed = [v for v in variants if v.status == "CRASH"]
    rank = {k: i for i, k in enumerate(BACKTRACE_PREFERENCE)}
    crashed.sort(key=lambda v: ("std::terminate" in v.detail, rank.get(v.key, len(rank))))
    return crashed[0] if crashed else None


class Stopped(Exception):
    pass


def _on_term(signum, frame):
    # `timeout` signals both its child and the child's process group: act on the first signal only
    if not STOPPING.is_set():
        STOPPING.set()
        raise Stopped(signal_name(signum))


def stop_children(pool) -> None:
    """No new work, and every child of ours stopped (several at once: each gets a grace period)."""
    STOPPING.set()
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)
    with LIVE_LOCK:
        live = list(LIVE)
    stoppers = [threading.Thread(target=kill_group, args=(p,)) for p in live]
    for t in stoppers:
        t.start()
    for t in stoppers:
        t.join()


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="report file (also printed to stdout)")
    ap.add_argument("--budget-s", type=float, default=240.0,
                    help="stop starting work after this many seconds (default 240); the report is always written")
    ap.add_argument("--jobs", type=int, default=0,
                    help="variants built at once (default: MAX_JOBS, else the CPU count)")
    ap.add_argument("--only", help="comma list of variant keys to run (default all: cxx-1,cxx-2,py-1,py-2,ctl-1,"
                                   "ctl-2,inst,a,b,c,d,e,f,g,h,s)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary build directory")
    args = ap.parse_args(argv)

    start = time.monotonic()
    rep = Report(args.out)
    rep(f"diag_ext_exceptions: {' '.join([sys.executable] + sys.argv)}")
    signal.signal(signal.SIGTERM, _on_term)
    work = tempfile.mkdtemp(prefix="cvk-diag-ext-")
    variants, facts, reported, pool, status = [], {}, False, None, 0
    try:
        import torch
        facts = toolchain(rep, torch)

        flags, how = repo_flags()
        variants = make_variants(flags)
        if args.only:
            keep = set(args.only.split(","))
            unknown = keep - {v.key for v in variants}
            if unknown:
                rep(f"unknown variant(s) in --only: {', '.join(sorted(unknown))}")
            variants = [v for v in variants if v.key in keep]
        jobs = args.jobs or int(os.environ.get("MAX_JOBS") or 0) or usable_cpus()
        jobs = max(1, min(jobs, usable_cpus(), len(variants) or 1))
        rep.section("2. bisection")
        rep(f"repository flags ({how}): {' '.join(flags)}")
        rep(f"work directory {work}; {jobs} build(s) at once; budget {args.budget_s:.0f}s")
        runner = Runner(rep, work, start + args.budget_s, sys.executable)
        runner.build_plain(variants)
        # the quick answers first (they may settle the question on their own), then the slow builds
        # before the quicker ones, so that on few cores the quick ones fill the gaps at the end
        order = sorted(variants, key=lambda v: {"program": 0, "ctypes": 0, "real": 1, "setup": 1, "minimal": 2}
                       .get(v.kind, 3))
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs)
        for fut in concurrent.futures.as_completed([pool.submit(runner.run, v) for v in order]):
            fut.result()
        pool.shutdown()
        reported = report_variants(rep, variants)

        first = first_crash(variants)
        if first is None:
            rep.section("3. native backtrace")
            rep("nothing crashed: no backtrace to take")
        else:
            backtrace_of(rep, runner, first)
    except (Stopped, KeyboardInterrupt) as exc:
        rep("")
        rep(f"!!! stopped ({exc or 'interrupted'}) after {time.monotonic() - start:.0f}s: "
            "the summary covers what finished")
        stop_children(pool)
        status = 2
    except Exception:  # report what broke and still write the summary of what finished
        rep("")
        rep("!!! the diagnosis script itself failed:\n" + traceback.format_exc())
        stop_children(pool)
        status = 1
    finally:
        if not reported:
            report_variants(rep, [v for v in variants if v.status != "NOT RUN"])
        summary(rep, variants, facts, time.monotonic() - start)
        if args.keep:
            rep(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return status  # a crash found is a result, not a failure of this script


if __name__ == "__main__":
    sys.exit(main())
