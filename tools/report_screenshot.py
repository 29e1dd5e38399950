"""Take the README's screenshot of a study's report in headless Chromium (Debian's ``chromium``).

    python tools/report_screenshot.py runs/study            # writes docs/report.png
    python tools/report_screenshot.py runs/study --height 1400 --out docs/report.png

Run it again whenever the shipped model's study changes, so the picture shows the real report.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="a finished `dori study` folder (with report.html)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "report.png")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1500)
    args = parser.parse_args()
    report = (args.study / "report.html").resolve()
    if not report.is_file():
        raise SystemExit(f"{report} not found; run `dori study --out {args.study}` first")
    if json.loads((args.study / "summary.json").read_text()).get("quick"):
        raise SystemExit(f"{args.study} is a --quick study; the README shows the full one")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("Chromium not found; apt-get install chromium")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={args.width},{args.height}",
                        f"--screenshot={args.out.resolve()}", report.as_uri()],
                       check=True, capture_output=True, timeout=120)  # fmt: skip
    print(f"{args.out}: {report} at {args.width}x{args.height}")


if __name__ == "__main__":
    main()
