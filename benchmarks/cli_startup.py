"""How fast the CLI answers: `dori --help` and every `dori CMD --help`, each a fresh process.

    python benchmarks/cli_startup.py            # 5 runs each; median, min and max seconds
    python benchmarks/cli_startup.py --runs 9

The bar is under 1 s, median, on 2 cores: torch and the model libraries load only when a
command runs (tests/test_layout.py checks that importing the CLI loads none of them).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = ["", "study", "generate", "replicate", "detect", "mitigate", "attack", "wanda-sweep", "locality", "unlearn",
            "toy", "toy train", "toy card", "toy benchmark"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    dori = shutil.which("dori") or str(Path(sys.executable).with_name("dori"))
    print("| command | median s | min s | max s |")
    print("|---|---|---|---|")
    for command in COMMANDS:
        times = []
        for _ in range(args.runs):
            began = time.perf_counter()
            subprocess.run([dori, *command.split(), "--help"], check=True, capture_output=True)
            times.append(time.perf_counter() - began)
        name = f"dori {command} --help".replace("  ", " ")
        print(f"| `{name}` | {statistics.median(times):.2f} | {min(times):.2f} | {max(times):.2f} |")


if __name__ == "__main__":
    main()
