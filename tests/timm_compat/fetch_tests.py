"""Fetch timm's model test file for ``make test-timm``; prints the path of the extracted file.

    python tests/timm_compat/fetch_tests.py VERSION CACHE_DIR

downloads timm's source distribution of release VERSION from PyPI into CACHE_DIR (``pip download
--no-deps --no-binary :all:``) and extracts its ``tests/test_models.py`` to
``CACHE_DIR/timm-VERSION/test_models.py``. A file already there is reused without any network
access. The test file is never part of this repository: it is fetched at test time only.
test_models.py imports nothing from its own folder (only timm, torch, torchvision), so it is the
one file extracted.
"""
import os
import subprocess
import sys
import tarfile
import tempfile

MEMBER = "tests/test_models.py"


def fetch(version: str, cache: str) -> str:
    dest_dir = os.path.join(cache, f"timm-{version}")
    dest = os.path.join(dest_dir, os.path.basename(MEMBER))
    if os.path.isfile(dest):
        return dest
    sdist = os.path.join(cache, f"timm-{version}.tar.gz")
    if not os.path.isfile(sdist):
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               f"timm=={version}", "-d", cache]
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"error: could not download timm {version}'s source distribution from PyPI "
                             f"({' '.join(cmd)})")
        if not os.path.isfile(sdist):
            raise SystemExit(f"error: pip downloaded timm {version} but {sdist} is missing: its source "
                             f"distribution has another name, found: {sorted(os.listdir(cache))}")
    name = f"timm-{version}/{MEMBER}"
    with tarfile.open(sdist) as tar:
        try:
            member = tar.getmember(name)
        except KeyError:
            raise SystemExit(f"error: {sdist} has no {name}: this timm release does not ship its tests in "
                             f"the source distribution") from None
        data = tar.extractfile(member).read()
    os.makedirs(dest_dir, exist_ok=True)
    # write then rename: an interrupted extraction never leaves a partial file that would be reused
    fd, tmp = tempfile.mkstemp(dir=dest_dir, suffix=".part")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)
    return dest


def main(argv):
    if len(argv) != 2:
        raise SystemExit(f"usage: {os.path.basename(__file__)} VERSION CACHE_DIR")
    print(fetch(*argv))


if __name__ == "__main__":
    main(sys.argv[1:])
