"""pytest plugin: timm's own model tests run against this package's CrossViT.

``make test-timm`` runs timm's ``tests/test_models.py`` (fetched from timm's source distribution by
``fetch_tests.py``, never stored in this repository) restricted to the CrossViT tests, with this
plugin loaded (``-p tests.timm_compat.plugin``). ``--crossvit-impl`` (default: the environment
variable ``CROSSVIT_IMPL``, else ``timm``) chooses what the tests build:

``timm``     timm's models, the test file as released: the baseline;
``patched``  ``crossvit_kernels.patch_timm(<timm's model>)`` for every crossvit model;
``ours``     ``crossvit_kernels.create_model(<the same name and arguments>)`` for every crossvit model.

Only the model factory changes: test_models.py imports timm's ``create_model`` as a module global
and every model it builds comes from that name, so the plugin replaces that global for the duration
of each test (other models still come from timm). Test bodies, helpers and assertions run unchanged.
The run stops with an error if the test file reaches timm's factory another way, which the
replacement would not cover.

Expected failures: ``xfail_timm.txt`` in this folder lists the tests that fail with timm itself
(expected to fail in every mode); ``xfail_patched.txt`` and ``xfail_ours.txt`` list the further
failures of those modes. One test per line, ``<test name> <reason>`` (the name as pytest prints it
after ``::``, e.g. ``test_model_forward[1-crossvit_9_240]``); blank lines and ``#`` comments are
ignored. Listed tests are marked ``xfail(strict=True)``: a listed test that passes fails the run
until its line is removed, and any failure not listed fails it too.
"""
import inspect
import os
import re
import time

import pytest

IMPLS = ("timm", "patched", "ours")
ENV_VAR = "CROSSVIT_IMPL"
HERE = os.path.dirname(os.path.abspath(__file__))

# calls that would build a model without going through the test module's ``create_model`` global
_BYPASS = re.compile(r"\btimm\.(?:models\.)?(?:_factory\.)?create_model\b")

_impl_key = pytest.StashKey[str]()
_expected_key = pytest.StashKey[dict]()
_start_key = pytest.StashKey[float]()


def pytest_addoption(parser):
    group = parser.getgroup("crossvit-timm-compat", "timm's model tests on crossvit_kernels")
    group.addoption("--crossvit-impl", default=None, metavar="IMPL",
                    help=f"the CrossViT the tests build: one of {', '.join(IMPLS)} "
                         f"(default: ${ENV_VAR}, else timm)")
    group.addoption("--crossvit-summary", default=None, metavar="FILE",
                    help="append the run's one-line result (mode, counts, wall time) to FILE")


def read_expected_failures(path):
    """{test name: reason} of one expected-failure list."""
    entries = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, _, reason = line.partition(" ")
            reason = reason.strip()
            if not reason:
                raise pytest.UsageError(f"{path}:{lineno}: {name} has no reason; write '<test name> <reason>'")
            if name in entries:
                raise pytest.UsageError(f"{path}:{lineno}: {name} is listed twice")
            entries[name] = reason
    return entries


def expected_failures(impl):
    """{test name: reason} of every test expected to fail in mode ``impl``."""
    expected = {}
    for mode in dict.fromkeys(("timm", impl)):
        path = os.path.join(HERE, f"xfail_{mode}.txt")
        for name, reason in read_expected_failures(path).items():
            if name in expected:
                raise pytest.UsageError(f"{path}: {name} is also in xfail_timm.txt (it fails with timm itself); "
                                        f"list it there only")
            expected[name] = reason if mode == impl else f"fails with timm too: {reason}"
    return expected


def pytest_configure(config):
    impl = config.getoption("crossvit_impl") or os.environ.get(ENV_VAR) or "timm"
    if impl not in IMPLS:
        raise pytest.UsageError(f"--crossvit-impl / {ENV_VAR}: {impl!r} is not one of {', '.join(IMPLS)}")
    config.stash[_impl_key] = impl
    config.stash[_expected_key] = expected_failures(impl)
    # timm's test file uses markers that only timm's own pytest configuration registers
    config.addinivalue_line("filterwarnings", "ignore::pytest.PytestUnknownMarkWarning")


def pytest_report_header(config):
    return f"crossvit-impl: {config.stash[_impl_key]}"


def pytest_sessionstart(session):
    session.config.stash[_start_key] = time.monotonic()


@pytest.hookimpl(tryfirst=True)  # before -k / -m deselection: the lists are checked against every test
def pytest_collection_modifyitems(config, items):
    impl = config.stash[_impl_key]
    if impl != "timm":
        for module in {item.module for item in items if isinstance(item, pytest.Function)}:
            found = _BYPASS.search(inspect.getsource(module))
            if found:
                raise pytest.UsageError(f"{module.__file__} calls {found.group(0)}, which the --crossvit-impl={impl} "
                                        f"substitution does not replace: the plugin needs updating")
    expected = config.stash[_expected_key]
    names = {item.name for item in items}
    unknown = sorted(set(expected) - names)
    # a run narrowed to node ids collects only those tests: the other entries cannot be checked
    if unknown and not any("::" in arg for arg in config.args):
        raise pytest.UsageError(f"expected-failure lists name tests that the test file does not have (renamed or "
                                f"removed? delete or fix those lines): {', '.join(unknown)}")
    for item in items:
        if item.name in expected:
            item.add_marker(pytest.mark.xfail(strict=True, reason=expected[item.name]))


def _factory(impl):
    """The test module's ``create_model`` in mode ``impl``: crossvit models from this package."""
    import timm

    import crossvit_kernels

    timm_create_model = timm.create_model

    def create_model(model_name, *args, **kwargs):
        if not (isinstance(model_name, str) and model_name.startswith("crossvit_")):
            return timm_create_model(model_name, *args, **kwargs)
        if impl == "patched":
            return crossvit_kernels.patch_timm(timm_create_model(model_name, *args, **kwargs))
        return crossvit_kernels.create_model(model_name, *args, **kwargs)

    return create_model


@pytest.fixture(autouse=True)
def _crossvit_impl(request, monkeypatch):
    impl = request.config.stash[_impl_key]
    if impl != "timm":
        import timm

        module = request.module
        if getattr(module, "create_model", None) is not timm.create_model:
            raise RuntimeError(f"{module.__file__} has no global create_model bound to timm.create_model: "
                               f"the --crossvit-impl={impl} substitution needs updating")
        monkeypatch.setattr(module, "create_model", _factory(impl))
    yield


def pytest_terminal_summary(terminalreporter, config):
    stats = terminalreporter.stats
    keys = ("passed", "failed", "xfailed", "skipped", "error")
    counts = ", ".join(f"{len(stats.get(key, []))} {key}" for key in keys)
    line = (f"timm tests, crossvit-impl={config.stash[_impl_key]}: {counts} "
            f"in {time.monotonic() - config.stash[_start_key]:.0f}s")
    terminalreporter.write_line(line, bold=True)
    path = config.getoption("crossvit_summary")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")
