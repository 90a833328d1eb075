"""Fetch the common model tests of the installed transformers: `python -m tests.conformance.prepare DEST`.

Downloads the source distribution of exactly the installed version with pip and unpacks its `tests/` folder as the
package `DEST/transformers_tests`, so that `tests/conformance/common.py` can import `ModelTesterMixin` next to the
project's own `tests` package. The sdist ships the top-level mixins (`test_modeling_common.py`, ...) but not
`tests/generation/` nor `tests/exporters/`, whose `GenerationTesterMixin` and `ExportTesterMixin` the common tests
inherit: each missing one becomes an empty stand-in (named in `stand_ins.txt`), so those families of tests do not run
(the default suite tests generation on MatGPT2 itself). Idempotent: a DEST already prepared for this version is kept.
"""

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers


PACKAGE = "transformers_tests"
STAND_INS = {  # module inside the tests package -> the mixin that test_modeling_common.py imports from it
    "generation/test_utils.py": "GenerationTesterMixin",
    "exporters/test_export.py": "ExportTesterMixin",
}


def prepare(dest: Path) -> Path:
    """`dest/transformers_tests` holding the installed transformers' tests; returns it."""
    version = transformers.__version__
    package = dest / PACKAGE
    stamp = package / "VERSION"
    if stamp.is_file() and stamp.read_text().strip() == version:
        return package
    with tempfile.TemporaryDirectory() as download:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"transformers=={version}", "--dest", download],
            check=True,
        )  # fmt: skip
        (sdist,) = Path(download).glob("transformers-*.tar.gz")
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if m.name.split("/")[1:2] == ["tests"] and m.isfile()]
            archive.extractall(download, members=members, filter="data")
        shutil.rmtree(package, ignore_errors=True)
        shutil.copytree(Path(download) / f"transformers-{version}" / "tests", package)
    stood_in = []
    for module, mixin in STAND_INS.items():
        path = package / module
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(
                f'"""Stand-in: transformers {version}\'s source distribution does not ship {module}."""\n\n\n'
                f"class {mixin}:\n    pass\n"
            )
            stood_in.append(f"{module} ({mixin})")
    for folder in [package, *(p for p in package.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    (package / "stand_ins.txt").write_text("".join(f"{line}\n" for line in stood_in))
    stamp.write_text(version + "\n")
    return package


if __name__ == "__main__":
    prepared = prepare(Path(sys.argv[1]))
    stand_ins = (prepared / "stand_ins.txt").read_text().splitlines()
    print(f"transformers {transformers.__version__}'s tests in {prepared}; stand-ins: {', '.join(stand_ins) or 'none'}")
