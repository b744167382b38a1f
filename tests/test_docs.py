"""Every relative link in README.md and docs/ points at a file that exists, and every #anchor at a heading of its
target (GitHub's heading slugs)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target) and ![alt](target "title")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose(text: str) -> list[str]:
    """The lines outside fenced code blocks (a `# comment` in a bash block is no heading, a link there no link)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped except hyphens, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's slug in a markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose(path.read_text(encoding="utf-8")):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(root: Path) -> list[str]:
    """Each relative link of README.md and docs/**/*.md whose file or heading does not exist, as 'file: target'."""
    files = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    bad = []
    for md in files:
        for line in prose(md.read_text(encoding="utf-8")):
            for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):  # inline code is not a link
                if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                    continue
                path, _, anchor = target.partition("#")
                dest = (md.parent / path).resolve() if path else md
                if not dest.exists():
                    bad.append(f"{md.relative_to(root)}: {target} (no such file)")
                elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
                    bad.append(f"{md.relative_to(root)}: {target} (no such heading)")
    return bad


def test_slugs_follow_githubs_rule():
    assert slug("Which strategy? CIFAR-10, 100 images per class") == "which-strategy-cifar-10-100-images-per-class"
    assert slug("One-line errors, exit 2") == "one-line-errors-exit-2"
    assert slug("A quantized frozen base (QLoRA)") == "a-quantized-frozen-base-qlora"
    assert slug("`strategy=` and data_root") == "strategy-and-data_root"


def test_readme_and_docs_links_resolve():
    assert (ROOT / "docs").is_dir()
    assert broken_links(ROOT) == []


def test_a_broken_link_or_anchor_is_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Real heading\n\n```bash\n# not a heading\n```\n")
    (tmp_path / "README.md").write_text(
        "# X\n[ok](docs/a.md#real-heading) [self](#x) [web](https://example.com/missing)\n"
        "[gone](docs/missing.md) [bad anchor](docs/a.md#not-a-heading) `[code](nowhere.md)`\n"
        "```\n[fenced](nowhere.md)\n```\n")
    assert broken_links(tmp_path) == ["README.md: docs/missing.md (no such file)",
                                      "README.md: docs/a.md#not-a-heading (no such heading)"]
