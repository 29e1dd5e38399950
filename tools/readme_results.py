"""Copy a study's results table (``DIR/table.md``, written by ``dori study``) into README.md,
between the ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers (``NAME`` is ``results``
unless ``--block`` names another). Rows of stages the study did not run are left out.

    python tools/readme_results.py runs/study
    python tools/readme_results.py runs/erasure --block erasure-results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NOT_RUN = "| not run |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--block", default="results")
    args = parser.parse_args()
    study = args.study
    start, end = f"<!-- {args.block}:start -->", f"<!-- {args.block}:end -->"
    table = "".join(line for line in (study / "table.md").read_text().splitlines(keepends=True) if NOT_RUN not in line)
    summary = json.loads((study / "summary.json").read_text())
    if summary.get("quick"):
        raise SystemExit(f"{study} is a --quick study; the README shows the full one")
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"README.md lacks the {start} / {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    config = json.loads((study / "config.json").read_text())
    note = (f"<!-- copied from {study.name}/table.md by tools/readme_results.py --block {args.block}; "
            f"dori {config['versions'].get('dori')} -->\n")  # fmt: skip
    readme.write_text(f"{head}{start}\n{note}{table}{end}{tail}")
    print(f"README.md: {args.block} table from {study}")


if __name__ == "__main__":
    main()
