"""Copy a study's results table (``DIR/table.md``, written by ``dori study``) into README.md,
between the ``<!-- results:start -->`` and ``<!-- results:end -->`` markers.

    python tools/readme_results.py runs/study
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python tools/readme_results.py STUDY_DIR")
    study = Path(sys.argv[1])
    table = (study / "table.md").read_text()
    summary = json.loads((study / "summary.json").read_text())
    if summary.get("quick"):
        raise SystemExit(f"{study} is a --quick study; the README shows the full one")
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README.md lacks the {START} / {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    config = json.loads((study / "config.json").read_text())
    note = f"<!-- copied from {study.name}/table.md by tools/readme_results.py; dori {config['versions'].get('dori')} -->\n"
    readme.write_text(f"{head}{START}\n{note}{table}{END}{tail}")
    print(f"README.md: results table from {study}")


if __name__ == "__main__":
    main()
