"""The tests test this source tree's code, whichever way the package was installed.

With an editable install (`pip install -e .`), ``seq2seq`` is imported from ``src/``. With a
regular one (`pip install ".[test]"`, as the README and CI do), it is imported from
site-packages: then its files must be those of the source tree, or the suite would pass or
fail on a stale copy. And the distribution's metadata must give the source's version.
"""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import seq2seq

SOURCE = Path(__file__).resolve().parents[1] / "src" / "seq2seq"


def package_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def test_the_imported_package_is_the_source_tree_or_an_exact_copy():
    imported = Path(seq2seq.__file__).resolve().parent
    if imported == SOURCE.resolve():
        return  # an editable install or PYTHONPATH=src: the source itself
    installed, source = package_files(imported), package_files(SOURCE)
    # Every module, and every data file that was installed (package data), as in the source.
    stale = sorted(name for name in source if (name.endswith(".py") or name in installed)
                   and installed.get(name) != source[name])
    assert not stale, (f"seq2seq is imported from {imported}, whose files differ from {SOURCE}: "
                       f"{stale[:10]}; reinstall (pip install '.[test]')")


def test_the_installed_metadata_has_the_source_version():
    source_version = re.search(r'^__version__ = "([^"]+)"', (SOURCE / "__init__.py").read_text(), re.M)
    assert source_version and version("seq2seq-rnn") == source_version.group(1) == seq2seq.__version__
