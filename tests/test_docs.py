"""The README tells the truth about the tree and the measurements.

Every number in the README's "At a glance" section is in the current figures of
benchmarks/RESULTS.md, every path the README names exists, and its layout section lists every
folder of the package, one line a folder.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"

# A number as the documents write them: 7,539  35.76  2026  0.68. Digits inside a word
# (fp32, a017828, 2M's M aside) are not numbers.
NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*(?!\d)")


def section(text: str, heading: str) -> str:
    """The text under a `## heading`, up to the next heading of that level."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"no '## {heading}' section"
    return match.group(1)


def numbers(text: str) -> set[str]:
    return {n.rstrip(".,") for n in NUMBER.findall(text)}


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, re.M | re.S)


def test_numbers_tokenized_as_written():
    assert numbers("7,539 tokens/s, BLEU 35.76 (fp32, a017828), 2M / 20M pairs, beam 5.") == {
        "7,539", "35.76", "2", "20", "5"}


def test_every_number_at_a_glance_is_in_the_current_figures_of_results():
    at_a_glance = section(README.read_text(encoding="utf-8"), "At a glance")
    current = numbers(section(RESULTS.read_text(encoding="utf-8"), "Current figures"))
    found = numbers(at_a_glance)
    assert len(found) > 20, "the At a glance section lost its figures"
    missing = sorted(found - current)
    assert not missing, f"README's At a glance has numbers that RESULTS.md's current figures lack: {missing}"


def test_the_readme_drops_the_claims_no_entry_printed():
    text = README.read_text(encoding="utf-8")
    for claim in ["1.4x", "1.7x", "1.15x", "1.2x the beam", "99.8%", "99.9%", "done in 32 s",
                  "a fifth", "±10%", "within 0.03"]:
        assert claim not in text, f"README still says {claim!r}, which no RESULTS.md entry prints"


# Paths the README names: src/..., tests/..., benchmarks/..., examples/..., scripts/..., docs/...
PATH = re.compile(r"(?<![\w/.-])((?:src/seq2seq|tests|benchmarks|examples|scripts|docs)/[\w./-]*[\w/])")


def test_every_path_the_readme_names_exists():
    text = README.read_text(encoding="utf-8")
    paths = {m.split("::")[0].split("#")[0] for m in PATH.findall(text)}
    assert "src/seq2seq/kernels/policy.py" in paths or "src/seq2seq/kernels/" in paths
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"README names paths that do not exist: {missing}"


def layout_block() -> str:
    blocks = [b for b in code_blocks(section(README.read_text(encoding="utf-8"), "Layout"))]
    assert len(blocks) == 1, "the Layout section holds one tree"
    return blocks[0]


def test_the_layout_is_the_tree_one_line_a_folder():
    lines = [line for line in layout_block().splitlines() if line.strip()]
    parents: list[str] = []
    listed = []
    for line in lines:
        indent = (len(line) - len(line.lstrip())) // 2
        name = line.split()[0]
        assert name.endswith("/"), f"layout line is not a folder: {line!r}"
        parents = parents[:indent] + [name]
        folder = "".join(parents)
        assert (ROOT / folder).is_dir(), f"layout names {folder}, which is not a folder"
        listed.append(folder.rstrip("/"))
    inits = (ROOT / "src" / "seq2seq").rglob("__init__.py")
    packages = sorted(str(init.parent.relative_to(ROOT)) for init in inits)
    unlisted = [p for p in packages if p not in listed]
    assert not unlisted, f"package folders missing from the README's layout: {unlisted}"


@pytest.mark.parametrize("document", ["README.md", "CHANGELOG.md", "RELIABILITY.md"])
def test_no_document_names_a_module_of_the_old_flat_layout(document):
    text = (ROOT / document).read_text(encoding="utf-8")
    if document == "CHANGELOG.md":   # its table of moves names the old modules on purpose
        text = re.sub(r"^\| `seq2seq\.\w+`.*$", "", text, flags=re.M)
        text = text.split("## [0.1.0]")[0]
    old = ["fastpath.py", "binarize.py", "corpus.py", "run_setup.py", "simple.py", "rest.py",
           "batching.py", "page.py", "datasets.py", "seq2seq/serve.py", "seq2seq/train.py",
           "checkpoint.atomic_write_bytes", "checkpoint.check_output", "seq2seq.ops."]
    stale = [name for name in old if re.search(rf"(?<!\w){re.escape(name)}", text)]
    assert not stale, f"{document} names modules that moved: {stale}"


def test_the_changelog_entry_of_this_version_matches_the_install_instructions():
    from importlib.metadata import PackageNotFoundError, version

    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    source = re.search(r'^__version__ = "([^"]+)"', (ROOT / "src/seq2seq/__init__.py").read_text(), re.M)
    assert source and f"## [{source.group(1)}]" in changelog
    try:
        assert version("seq2seq-rnn") == source.group(1), "the installed distribution is stale: reinstall"
    except PackageNotFoundError:
        pass
    readme = README.read_text(encoding="utf-8")
    assert "not on PyPI" in readme
    # Nothing tells users to install from PyPI while the README says it is not there.
    for document in (changelog, readme):
        for line in document.splitlines():
            if "pip install seq2seq-rnn" in line or 'pip install "seq2seq-rnn' in line:
                assert "once" in line or "not on PyPI" in line, f"an install from PyPI: {line!r}"


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors: explicit <a id="..."> tags, and each heading's slug."""
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', text))
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return anchors


def test_every_link_into_results_finds_its_entry():
    anchors = heading_anchors(RESULTS.read_text(encoding="utf-8"))
    for document in ("README.md", "RELIABILITY.md", "CHANGELOG.md"):
        text = (ROOT / document).read_text(encoding="utf-8")
        links = re.findall(r"\(benchmarks/RESULTS\.md#([^)]+)\)", text)
        missing = [link for link in links if link not in anchors]
        assert not missing, f"{document} links to RESULTS.md anchors that do not exist: {missing}"


def test_the_readme_lists_every_server_limit_with_its_default():
    import dataclasses

    from seq2seq.serving.settings import ServeConfig, flag

    rows = dict(re.findall(r"^\| `(--[a-z-]+)` \| ([^|]+) \|", section(README.read_text(encoding="utf-8"),
                                                                      "Serve a model"), re.M))
    for field in dataclasses.fields(ServeConfig):
        assert flag(field.name) in rows, f"README's limits table lacks {flag(field.name)}"
        if isinstance(field.default, int | float):
            assert float(rows[flag(field.name)].replace(",", "")) == field.default, flag(field.name)
    assert set(rows) == {flag(f.name) for f in dataclasses.fields(ServeConfig)}


def test_reliabilitys_input_limits_are_the_config_defaults():
    from seq2seq.config import Config

    config = Config()
    text = (ROOT / "RELIABILITY.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(data|decode)\.(\w+)` \| ([\d,]+) ", text, re.M)
    assert len(rows) >= 4
    for section_name, key, default in rows:
        assert getattr(getattr(config, section_name), key) == int(default.replace(",", "")), key
