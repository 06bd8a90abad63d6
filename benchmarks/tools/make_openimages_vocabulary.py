"""Write ``cocatk/assets/vocabularies/openimages.txt`` (the built-in photo vocabulary of ``cocatk tag``).

    python benchmarks/tools/make_openimages_vocabulary.py class-descriptions-boxable.csv bbox_labels_600_hierarchy.json
    python benchmarks/tools/make_openimages_vocabulary.py CSV JSON --check   # exit 1 if the asset is out of date

Sources: Open Images V7's boxable class names and their hierarchy
(https://storage.googleapis.com/openimages/web/download_v7.html; © Google LLC, licensed CC BY 4.0).

* ``class-descriptions-boxable.csv``: ``MID,Display name`` rows (Google's own file has no header; a ``label,class``
  header line, as some copies carry, is skipped).
* ``bbox_labels_600_hierarchy.json``: nested ``{"LabelName", "Subcategory": [...], "Part": [...]}`` from the root
  ``/m/0bl9f`` ("Entity"), which is not a class.

Output: one line per class of the CSV, the class's ancestor chain by ``Subcategory`` (is-a) edges from the root's child
down to the class, names joined by ``|``. The hierarchy is a DAG: a class with several parents gets the first path met
in a depth-first walk in document order. ``Part`` edges (has-a) are not parents; a class met only under a ``Part``
would start a path of its own (in the V7 files every class is also reachable by ``Subcategory`` edges alone), and a
class missing from the hierarchy is top-level. Lines are sorted by path, component by component, case-insensitively.
The output depends only on the two files: rerunning reproduces the asset byte for byte.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

ROOT = "/m/0bl9f"  # "Entity"
SEPARATOR = "|"
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "cocatk" / "assets" / "vocabularies" / "openimages.txt"

HEADER = """\
# Open Images V7 boxable classes ({n}) and their hierarchy.
# Source: https://storage.googleapis.com/openimages/web/download_v7.html (class-descriptions-boxable.csv,
# bbox_labels_600_hierarchy.json). © Google LLC, licensed under CC BY 4.0
# (https://creativecommons.org/licenses/by/4.0/). Changes: the hierarchy flattened to one path per class.
# One label per line: a hierarchical path from the top group to the label, separated by "|" \
(lr:hierarchicalSubject style).
"""


def read_names(path: Path) -> dict[str, str]:
    """MID -> display name, in file order; refuses duplicates and names that cannot be a path component."""
    names: dict[str, str] = {}
    seen: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row:
                continue
            if i == 0 and not row[0].startswith("/"):  # a header line such as "label,class"
                continue
            if len(row) != 2:
                raise SystemExit(f"{path}:{i + 1}: expected 2 fields, got {row!r}")
            mid, name = row
            checks = [
                (not name.strip(), "is empty"),
                (SEPARATOR in name, f"contains {SEPARATOR!r}"),
                (name != name.strip(), "has leading/trailing white space"),
                (name.startswith("#"), "starts with '#' (a comment line)"),
                (name in seen, f"repeats the name of {seen.get(name)}"),
                (mid in names, f"repeats MID {mid}"),
            ]
            problem = next((why for failed, why in checks if failed), None)
            if problem:
                raise SystemExit(f"{path}:{i + 1}: class {mid} {name!r} {problem}")
            names[mid] = name
            seen[name] = mid
    return names


def first_paths(tree: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """MID -> the first chain of MIDs (root's child .. class) met depth-first in document order.

    Pass 1 follows ``Subcategory`` edges only, from the root. Pass 2 walks the whole tree again for classes pass 1
    did not reach: a ``Part`` child starts a new top-level path (its own ``Subcategory`` descendants hang from it)."""
    if tree.get("LabelName") != ROOT:
        raise SystemExit(f"the hierarchy's root is {tree.get('LabelName')!r}, expected {ROOT} (Entity)")
    paths: dict[str, tuple[str, ...]] = {}

    def walk(node: dict[str, Any], chain: tuple[str, ...], follow_parts: bool) -> None:
        for child in node.get("Subcategory", []):
            here = (*chain, child["LabelName"])
            paths.setdefault(child["LabelName"], here)
            walk(child, here, follow_parts)
        if follow_parts:
            for child in node.get("Part", []):
                here = (child["LabelName"],)
                paths.setdefault(child["LabelName"], here)
                walk(child, here, follow_parts)

    walk(tree, (), follow_parts=False)
    walk(tree, (), follow_parts=True)
    return paths


def build(csv_path: Path, json_path: Path) -> tuple[str, dict[str, Any]]:
    """The file's text, and facts about it (for the report)."""
    names = read_names(csv_path)
    tree = json.loads(json_path.read_text(encoding="utf-8"))
    paths = first_paths(tree)
    unknown = sorted({m for chain in paths.values() for m in chain} - names.keys())
    if unknown:
        raise SystemExit(f"the hierarchy names classes the CSV lacks: {', '.join(unknown)}")
    missing = [m for m in names if m not in paths]  # not in the hierarchy at all: top-level
    lines = [SEPARATOR.join(names[m] for m in paths.get(mid, (mid,))) for mid in names]
    lines.sort(key=lambda line: ([part.casefold() for part in line.split(SEPARATOR)], line))
    text = HEADER.format(n=len(lines)) + "".join(line + "\n" for line in lines)
    depths = [line.count(SEPARATOR) + 1 for line in lines]
    facts = {
        "classes": len(lines),
        "top_level": depths.count(1),
        "max_depth": max(depths),
        "deepest": [line for line, d in zip(lines, depths, strict=True) if d == max(depths)],
        "not_in_hierarchy": [names[m] for m in missing],
        "lines": lines,
    }
    return text, facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path, help="class-descriptions-boxable.csv")
    parser.add_argument("hierarchy", type=Path, help="bbox_labels_600_hierarchy.json")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT}")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if --out differs")
    args = parser.parse_args(argv)
    text, facts = build(args.csv, args.hierarchy)
    if args.check:
        current = args.out.read_bytes() if args.out.exists() else b""
        same = current == text.encode("utf-8")
        print(f"{args.out}: {'up to date' if same else 'OUT OF DATE'}")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    print(
        f"wrote {args.out}: {facts['classes']} classes, {facts['top_level']} top-level, "
        f"max depth {facts['max_depth']} ({'; '.join(facts['deepest'])})"
    )
    if facts["not_in_hierarchy"]:
        print(f"not in the hierarchy (top-level): {', '.join(facts['not_in_hierarchy'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
