#!/usr/bin/env python3
"""Checks every relative markdown link in README.md, docs/*.md and data/README.md: the
target file must exist, and a `#fragment` into a markdown file must name one of its
headings (GitHub's anchor rules). Links with a scheme (https:, mailto:) are not checked.
No build needed.

  scripts/check-doc-links.py            # exit 1 and one line per broken link
"""
import glob
import os
import re
import sys

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.chdir(root)

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*```")


def prose_lines(path):
    """Lines outside fenced code blocks, with inline code spans removed."""
    inside = False
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            yield n, re.sub(r"`[^`]*`", "", line)


def anchors(path):
    """GitHub heading anchors of a markdown file."""
    seen, out = {}, set()
    for _, line in prose_lines(path):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        k = seen.get(slug, 0)
        seen[slug] = k + 1
        out.add(slug if k == 0 else f"{slug}-{k}")
    return out


files = ["README.md"] + sorted(glob.glob("docs/*.md")) + ["data/README.md"]
bad = checked = 0
for f in files:
    for n, line in prose_lines(f):
        for target in LINK.findall(line):
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
                continue
            checked += 1
            path, _, frag = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(f), path)) if path else f
            if not os.path.exists(dest):
                print(f"{f}:{n}: {target}: no such file {dest}")
                bad += 1
            elif frag and dest.endswith(".md") and frag not in anchors(dest):
                print(f"{f}:{n}: {target}: {dest} has no heading with anchor #{frag}")
                bad += 1
print(f"{checked} relative links in {len(files)} files, {bad} broken")
sys.exit(1 if bad else 0)
