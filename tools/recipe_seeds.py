"""The bundled recipe on several seeds: one row per folder written by ``dori toy train``, from
its ``card.json`` and ``dori_model.json`` (nothing is re-measured).

    python tools/recipe_seeds.py runs/seed1 runs/seed2 [--shipped] [--write]

``--shipped`` adds the shipped model as the first row. ``--write`` puts the table into
docs/BUNDLED_MODEL.md and the shipped MODEL_CARD.md, between ``<!-- recipe-seeds:start -->`` and
``<!-- recipe-seeds:end -->`` (a card without them gets a section at its end); otherwise it is printed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dori.bundled.card import RECIPE_SEEDS_END as END  # dori toy card keeps the section these mark
from dori.bundled.card import RECIPE_SEEDS_HEADING
from dori.bundled.card import RECIPE_SEEDS_START as START

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "src/dori/models/assets/bundled"
ALIGNMENT_BAR = 0.95  # held-out prompt alignment on every seed


def row(folder: Path, shipped: bool) -> str:
    card = json.loads((folder / "card.json").read_text())
    meta = json.loads((folder / "dori_model.json").read_text())
    train = meta["train_config"]
    bench = card["copy_benchmark"]
    held, plain = card["held_out"], card["non_memorized"]
    mark = "" if held["alignment"] >= ALIGNMENT_BAR else " (under 0.95)"
    name = f"{train['seed']} (shipped)" if shipped else str(train["seed"])
    where = "conv_in + attention" if meta.get("position_encoding") == "sinusoidal+attention" else "conv_in"
    scale = train.get("text_lr_scale", 1.0)
    text = "frozen at init" if scale == 0 else "trained" if scale == 1 else f"trained at x{scale:g}"
    classifier_file = folder / "attribute_classifier.json"
    classifier = json.loads(classifier_file.read_text()) if classifier_file.is_file() else {}
    accuracy = f"{classifier['accuracy_on_fresh_renders']:.3f}" if classifier else "–"
    return (f"| {name} | {train.get('partial_caption_prob', 0):.0%} | {where} | {text} | {train['steps']} | {train.get('seconds', float('nan')) / 60:.1f} | "
            f"{card['guidance']:g} | {card['memorized']['mr']:.2f} ({card['memorized']['sscd_mean']:.3f}) | "
            f"{plain['mr']:.2f} | {held['alignment']:.3f}{mark} | {plain['alignment']:.3f} | {held['fd']:.0f} | "
            f"{bench['recall']:.3f} / {bench['false_positive_rate']:.3f} | {card['detector']['tau']:.3f} | {accuracy} |")  # fmt: skip


def table(folders: list[Path], shipped: bool) -> str:
    first = card_settings(folders[0] if folders else SHIPPED)
    lines = [
        f"Each row: `dori toy train --seed S` and its card (DDIM {first['steps']}, {first['seeds']} seeds per "
        "caption, the guidance chosen by the card's rule); `python tools/recipe_seeds.py` reads them. Text encoder "
        "'trained': jointly with the U-Net (the fourth recipe, the shipped model's); 'frozen at init': never trained "
        "(the fifth recipe, `dori toy train`'s default since the recipe was tested on other seeds). Training times are on this project's 2-core "
        "machine. Classifier accuracy: the attribute classifier that measures alignment, on fresh renders.",
        "",
        "| seed | partial captions | position encoding | text encoder | steps | training (min) | guidance | memorized MR (similarity) | non-memorized MR | "
        "held-out alignment | non-memorized alignment | held-out FD | detector recall / false positives | tau | "
        "classifier accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if shipped:
        lines.append(row(SHIPPED, True))
    lines += [row(folder, False) for folder in folders]
    return "\n".join(lines) + "\n"


def card_settings(folder: Path) -> dict:
    card = json.loads((folder / "card.json").read_text())
    return {"steps": card["steps"], "seeds": card["seeds"]}


def write_between(file: Path, text: str, *, heading: str | None = None) -> None:
    """Replace the text between the markers; with ``heading``, a file without them gets a section."""
    content = file.read_text(encoding="utf-8")
    if (START not in content or END not in content) and heading:
        content = f"{content.rstrip()}\n\n{heading}\n\n{START}\n{END}\n"
    if START not in content or END not in content:
        raise SystemExit(f"{file} lacks the {START} / {END} markers")
    head, rest = content.split(START, 1)
    _, tail = rest.split(END, 1)
    file.write_text(f"{head}{START}\n{text}{END}{tail}", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", type=Path)
    parser.add_argument("--shipped", action="store_true")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    for folder in args.folders:
        if not (folder / "card.json").is_file():
            raise SystemExit(f"{folder} holds no card.json; run 'dori toy train' (or 'dori toy card --model {folder}')")
    text = table(args.folders, args.shipped)
    if not args.write:
        print(text, end="")
        return
    # A new card ('dori toy train') has no section; the first --write appends it, and 'dori toy card' keeps it.
    for file, heading in ((ROOT / "docs/BUNDLED_MODEL.md", None), (SHIPPED / "MODEL_CARD.md", RECIPE_SEEDS_HEADING)):
        write_between(file, text, heading=heading)
        print(f"{file.relative_to(ROOT)}: recipe table of {len(args.folders) + args.shipped} models")


if __name__ == "__main__":
    main()
