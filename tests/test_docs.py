"""The documentation a newcomer reads first holds together.

- Every relative link in README.md, tuning.md, bench/README.md, bench/SUMMARY.md and docs/*.md
  resolves to a file inside the repository, and its ``#anchor``, when it has one and points at
  a Markdown file, to a heading there (GitHub's rule: lowercase, punctuation other than ``-``
  and ``_`` dropped, each space a ``-``; a repeated heading gets ``-1``, ``-2``, ...).
- No doc points at ``../shared`` or at an absolute ``/work`` path (paths of the machine the
  project was written on, which a clone does not have) -- in a link or anywhere in its text.
- The docs speak of the project, not of how it was made: no "issue #", "the lead", "helper",
  "session" (whole words, case-insensitive; line breaks count as spaces).  The allowed uses
  are listed in ``ALLOWED``: "sticky sessions" (the load-balancer term).
- bench/SUMMARY.md agrees with tuning.md: every commit it names and every figure in its
  "measured" column appears in tuning.md, and bench/README.md links to it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted(
    {ROOT / "README.md", ROOT / "tuning.md", ROOT / "bench" / "README.md", ROOT / "bench" / "SUMMARY.md"}
    | set((ROOT / "docs").glob("*.md"))
)
DOC_IDS = [str(p.relative_to(ROOT)) for p in DOCS]

FENCE = re.compile(r"^ {0,3}(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
# [text](target "title") and ![alt](target); the text may span lines.
INLINE_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
HREF = re.compile(r"""<a\s[^>]*href=["']([^"']+)["']""", re.I)
HTML_ID = re.compile(r"""<a\s[^>]*(?:name|id)=["']([^"']+)["']""", re.I)
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...

PROCESS_WORDS = re.compile(r"\bissue\s+#|\bthe\s+lead\b|\bhelpers?\b|\bsessions?\b", re.I)
ALLOWED = [
    re.compile(r"\bsticky\s+sessions?\b", re.I),  # README.md, docs/api.md: the load-balancer term
]
MACHINE_PATHS = re.compile(r"\.\./shared\b|(?<![\w.~-])/work(?:/|\b)")


def split_code(text: str) -> tuple[str, list[str]]:
    """The text with fenced code blocks blanked (line numbers kept), and the heading lines
    found outside them."""
    out, headings, fence = [], [], None
    for line in text.split("\n"):
        m = FENCE.match(line)
        if fence:
            if m and line.strip().startswith(fence):
                fence = None
            out.append("")
            continue
        if m:
            fence = m.group(1)
            out.append("")
            continue
        out.append(line)
        if HEADING.match(line):
            headings.append(line)
    return "\n".join(out), headings


def github_anchor(heading: str) -> str:
    text = INLINE_CODE.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text stays
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w: letters, digits, _ (unicode letters too)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    _, headings = split_code(text)
    seen: dict[str, int] = {}
    out = set(HTML_ID.findall(text))
    for line in headings:
        m = HEADING.match(line)
        assert m
        a = github_anchor(m.group(2))
        n = seen.get(a, 0)
        seen[a] = n + 1
        out.add(a if n == 0 else f"{a}-{n}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every link outside code."""
    prose, _ = split_code(path.read_text(encoding="utf-8"))
    # Blank inline code spans, keeping their newlines so that line numbers stay right.
    prose = INLINE_CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), prose)
    found = []
    for rx in (INLINE_LINK, REF_DEF, HREF):
        for m in rx.finditer(prose):
            target = m.group(m.lastindex or 1)
            found.append((prose.count("\n", 0, m.start(m.lastindex or 1)) + 1, target))
    return sorted(found)


def line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


@pytest.mark.parametrize("doc", DOCS, ids=DOC_IDS)
def test_relative_links_resolve(doc: Path) -> None:
    problems = []
    for line, target in links(doc):
        where = f"{doc.relative_to(ROOT)}:{line}: {target}"
        if EXTERNAL.match(target):
            continue
        if MACHINE_PATHS.search(target) or target.startswith("/"):
            problems.append(f"{where}: points outside the repository")
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        try:
            dest.relative_to(ROOT)
        except ValueError:
            problems.append(f"{where}: points outside the repository")
            continue
        if not dest.exists():
            problems.append(f"{where}: no such file")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=DOC_IDS)
def test_no_paths_of_the_writing_machine(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    problems = [
        f"{doc.relative_to(ROOT)}:{line_of(text, m.start())}: {m.group(0)!r}" for m in MACHINE_PATHS.finditer(text)
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=DOC_IDS)
def test_no_internal_process_words(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    allowed = [(m.start(), m.end()) for rx in ALLOWED for m in rx.finditer(text)]
    problems = []
    for m in PROCESS_WORDS.finditer(text):
        if any(a <= m.start() < b for a, b in allowed):
            continue
        context = " ".join(text[max(0, m.start() - 40) : m.end() + 40].split())
        problems.append(f"{doc.relative_to(ROOT)}:{line_of(text, m.start())}: {m.group(0)!r} in ...{context}...")
    assert not problems, "\n".join(problems)


def test_github_anchor_rule() -> None:
    assert github_anchor("Publish ingest: where the ceiling is") == "publish-ingest-where-the-ceiling-is"
    assert github_anchor("`rss` — memory per idle subscribed connection") == "rss--memory-per-idle-subscribed-connection"
    assert github_anchor("Host settings (sysctl)") == "host-settings-sysctl"
    assert github_anchor("Scale-out through Redis") == "scale-out-through-redis"
    assert github_anchor("A [linked](x.md) snake_case heading") == "a-linked-snake_case-heading"


def test_summary_agrees_with_tuning() -> None:
    summary = (ROOT / "bench" / "SUMMARY.md").read_text(encoding="utf-8")
    tuning = (ROOT / "tuning.md").read_text(encoding="utf-8")
    problems = []
    for commit in sorted(set(re.findall(r"`([0-9a-f]{7,40})`", summary))):
        if commit not in tuning:
            problems.append(f"commit {commit} is not named in tuning.md")
    rows = [r for r in summary.split("\n") if r.startswith("| ") and not r.startswith("| figure")]
    assert rows, "no table rows in bench/SUMMARY.md"
    for row in rows:
        measured = row.split("|")[2]
        for figure in re.findall(r"\d[\d,]*(?:\.\d+)?", measured):
            if not re.search(rf"(?<![\d.,]){re.escape(figure)}(?![\d]|[.,]\d)", tuning):
                problems.append(f"figure {figure} (row {row.split('|')[1].strip()!r}) is not in tuning.md")
    assert not problems, "\n".join(problems)
    assert "(SUMMARY.md)" in (ROOT / "bench" / "README.md").read_text(encoding="utf-8")
