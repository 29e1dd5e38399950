"""Rewrite a bundled folder's MODEL_CARD.md from its card.json, copy_detector.json and training
record, measuring nothing again (for when only the card's wording changed).

    python tools/rewrite_card.py DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    from dori.bundled.train import rewrite_card

    rewrite_card(parser.parse_args().folder)


if __name__ == "__main__":
    main()
