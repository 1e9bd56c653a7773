"""The method reference the code cites exists in the repository (issue 20, item 4).

Every "docs/method.md §N" citation in the repository's .py and .md files (and any bare citation of a
METHOD file left over) must name a section heading of ``docs/method.md``, and no file may cite a method
file outside ``docs/``.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "method.md"
THIS = Path(__file__).resolve()

# Spelled in pieces so this file does not cite anything itself.
_BARE = "METHOD"
# "docs/method.md §…", "METHOD.md §…" or "METHOD §…", then the run of section references after it.
CITATION = re.compile(r"(?:docs/method\.md|\b" + _BARE + r"(?:\.md)?)\s+(?=§)")
# one reference: §6, §6.2, §8.2.1, ranges §6.2–6.7 / §8.3-8.7 / §6–§7, lettered items §15 A, §15 A–E, §15 A, C, E
_NUM = r"\d+(?:\.\d+)*"
_LETTERS = r"(?:\s(?P<letters>[A-I](?:\s?[–-]\s?[A-I])?(?:,\s?[A-I](?![\w]))*)(?![\w]))?"
REF = re.compile(rf"§(?P<a>{_NUM})(?:\s?[–-]\s?§?(?P<b>{_NUM}))?{_LETTERS}")
SEPARATOR = re.compile(r"\s*(?:,|/|\band\b)\s*(?=§)")
HEADING = re.compile(r"^#{1,6}\s+(?P<num>\d+(?:\.\d+)*)(?:\s+(?P<letter>[A-Z])(?![\w]))?[.\s]")


def _repo_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored .py/.md files (what a clone or a commit would hold)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", "*.py", "*.md"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    files = [ROOT / p for p in out.split("\0") if p]
    return sorted(p for p in files if p.is_file() and p.resolve() != THIS)


def _headings() -> tuple[set[str], set[tuple[str, str]]]:
    numbers: set[str] = set()
    letters: set[tuple[str, str]] = set()
    in_code = False
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        m = None if in_code else HEADING.match(line)
        if m:
            if m["letter"]:
                letters.add((m["num"], m["letter"]))
            else:
                numbers.add(m["num"])
    return numbers, letters


def _expand(a: str, b: str | None) -> list[str]:
    """§6.2–6.7 -> 6.2 … 6.7; §6–§7 -> 6, 7; a single number -> itself."""
    if b is None:
        return [a]
    pa, pb = a.split("."), b.split(".")
    if len(pa) != len(pb) or pa[:-1] != pb[:-1] or int(pb[-1]) < int(pa[-1]):
        return [a, b]
    stem = ".".join(pa[:-1])
    return [f"{stem}.{i}" if stem else str(i) for i in range(int(pa[-1]), int(pb[-1]) + 1)]


def _expand_letters(spec: str) -> list[str]:
    out = []
    for part in re.split(r",\s?", spec):
        m = re.fullmatch(r"([A-I])(?:\s?[–-]\s?([A-I]))?", part.strip())
        if m:
            hi = m[2] or m[1]
            out.extend(chr(c) for c in range(ord(m[1]), ord(hi) + 1))
    return out


def citations(text: str) -> list[tuple[str, str | None]]:
    """(section number, letter or None) for every section a citation in ``text`` names."""
    found: list[tuple[str, str | None]] = []
    for m in CITATION.finditer(text):
        pos = m.end()
        while True:
            ref = REF.match(text, pos)
            if ref is None:
                break
            for num in _expand(ref["a"], ref["b"]):
                found.append((num, None))
            if ref["letters"]:
                found.extend((ref["a"], letter) for letter in _expand_letters(ref["letters"]))
            pos = ref.end()
            sep = SEPARATOR.match(text, pos)
            if sep is None:
                break
            pos = sep.end()
    return found


def test_the_method_reference_exists():
    assert DOC.is_file(), "docs/method.md, the method reference the code cites, is missing"
    numbers, _ = _headings()
    assert {str(i) for i in range(0, 18)} <= numbers, f"top-level sections missing: {sorted(numbers)}"


def test_citation_parser():
    cases = {
        "docs/method.md §4, §6.2–6.7, §7.4.": [("4", None), *((f"6.{i}", None) for i in range(2, 8)), ("7.4", None)],
        "(docs/method.md §8.3-8.7): KV": [(f"8.{i}", None) for i in range(3, 8)],
        "docs/method.md §6–§7 says": [("6", None), ("7", None)],
        "docs/method.md §15 A–E, §6": [("15", None), *(("15", c) for c in "ABCDE"), ("6", None)],
        "docs/method.md §15 A, C, E).": [("15", None), ("15", "A"), ("15", "C"), ("15", "E")],
        "docs/method.md §12 Fig. 9": [("12", None)],
        "docs/method.md §11 I2V: Quality": [("11", None)],
        "docs/method.md §10 \"data\"": [("10", None)],
        "(" + _BARE + " §7.3, §16.9)": [("7.3", None), ("16.9", None)],
    }
    for text, want in cases.items():
        assert citations(text) == want, text


def test_every_citation_names_a_section_of_docs_method_md():
    numbers, letters = _headings()
    missing = []
    for path in _repo_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for num, letter in citations(text):
            ok = (num, letter) in letters if letter else num in numbers
            if not ok:
                missing.append(f"{path.relative_to(ROOT)}: §{num}{' ' + letter if letter else ''}")
    assert not missing, "citations of sections docs/method.md does not have:\n" + "\n".join(sorted(set(missing)))


def test_no_file_cites_a_method_file_outside_docs():
    bare = re.compile(r"(?<![\w/])" + _BARE + r"(?:\.md\b|\s+§)")
    offenders = []
    for path in _repo_files():
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if bare.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not offenders, (
        "cite the method as docs/method.md §N (the reference in this repository), not a method file elsewhere:\n"
        + "\n".join(offenders)
    )


@pytest.mark.parametrize("path", ["README.md", "docs/interfaces.md"])
def test_key_documents_point_at_docs_method_md(path):
    assert "docs/method.md" in (ROOT / path).read_text(encoding="utf-8")
