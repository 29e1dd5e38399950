"""Copy a study's results table (``DIR/table.md``, written by ``dori study``) between the
``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers (``NAME`` is ``results`` unless
``--block`` names another) of every page that has them: docs/RESULTS.md gets the whole of
``table.md`` (the table and the lines under it), README.md only the table. Rows of stages the study
did not run are left out.

    python tools/readme_results.py runs/study
    python tools/readme_results.py runs/erasure --block erasure-results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NOT_RUN = "| not run |"
ROOT = Path(__file__).resolve().parents[1]
PAGES = {ROOT / "README.md": "table", ROOT / "docs" / "RESULTS.md": "all"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--block", default="results")
    args = parser.parse_args()
    study = args.study
    start, end = f"<!-- {args.block}:start -->", f"<!-- {args.block}:end -->"
    lines = [line for line in (study / "table.md").read_text().splitlines(keepends=True) if NOT_RUN not in line]
    summary = json.loads((study / "summary.json").read_text())
    if summary.get("quick"):
        raise SystemExit(f"{study} is a --quick study; the README shows the full one")
    config = json.loads((study / "config.json").read_text())
    note = (f"<!-- copied from {study.name}/table.md by tools/readme_results.py --block {args.block}; "
            f"dori {config['versions'].get('dori')} -->\n")  # fmt: skip
    written = 0
    for page, part in PAGES.items():
        text = page.read_text()
        if start not in text or end not in text:
            continue
        table = "".join(line for line in lines if part == "all" or line.startswith("|"))
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        page.write_text(f"{head}{start}\n{note}{table}{end}{tail}")
        print(f"{page.relative_to(ROOT)}: {args.block} from {study}")
        written += 1
    if not written:
        raise SystemExit(f"no page has the {start} / {end} markers")


if __name__ == "__main__":
    main()
