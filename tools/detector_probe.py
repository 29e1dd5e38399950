"""Where the bundled copy detector stops finding copies: each planted image (and ``--ordinary``
ordinary training images) under edits the copy benchmark does not hold it to, at graded strengths,
scored against the unedited image. Nothing is generated; the folder gives the data and the detector.

    python tools/detector_probe.py DIR [--ordinary 50] [--seed 0] [--grid probe.png]

Each row: how many sources still score above tau, and the lowest similarity. The benchmark's own
edits stop at: noise sigma 0.12, blur sigma 1, shifts of 3 pixels, contrast x0.7, crops of 3
pixels. ``--grid`` saves the planted images under the strongest edit of each family, one family
per row, to look at.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def edits():
    import torch
    import torch.nn.functional as F

    from dori.measure.similarity import gaussian_blur

    def noise(sigma):
        return lambda x, g: x + sigma * torch.randn(x.shape, generator=g)

    def blur(sigma):
        return lambda x, g: gaussian_blur(x, sigma)

    def shift(pixels):
        return lambda x, g: F.pad(x, (pixels, 0, pixels, 0), mode="replicate")[..., : x.shape[-2], : x.shape[-1]]

    def fade(factor):  # contrast towards mid grey, as a washed-out copy
        return lambda x, g: 0.5 + (x - 0.5) * factor

    def zoom(scale):  # enlarge about the centre and crop back (scale > 1), or shrink onto grey
        def apply(x, g):
            size = x.shape[-1]
            new = round(size * scale)
            resized = F.interpolate(x, size=(new, new), mode="bilinear", align_corners=False, antialias=scale < 1)
            if scale >= 1:
                top = (new - size) // 2
                return resized[..., top : top + size, top : top + size]
            out = torch.full_like(x, 0.5)
            top = (size - new) // 2
            out[..., top : top + new, top : top + new] = resized
            return out
        return apply

    def cutout(side):  # a grey square over the middle: part of the picture missing
        def apply(x, g):
            out = x.clone()
            top = (x.shape[-1] - side) // 2
            out[..., top : top + side, top : top + side] = 0.5
            return out
        return apply

    return {
        "noise": [(f"sigma {s}", noise(s)) for s in (0.05, 0.1, 0.12, 0.15, 0.2)],
        "blur": [(f"sigma {s}", blur(s)) for s in (1.0, 1.5, 2.0)],
        "shift": [(f"{p} px", shift(p)) for p in (3, 4, 6)],
        "fade": [(f"contrast x{f}", fade(f)) for f in (0.5, 0.3, 0.2)],
        "zoom": [(f"x{z}", zoom(z)) for z in (1.1, 1.25, 0.9, 0.75)],
        "cutout": [(f"{c}x{c} grey square", cutout(c)) for c in (6, 10)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--ordinary", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=Path)
    args = parser.parse_args()
    import torch

    from dori.report_images import save_grid
    from dori.toy.kit import ToyKit

    kit = ToyKit.from_folder(args.folder)
    detector = kit.detector
    planted = torch.stack([pair.image for pair in kit.data.planted])
    picked = torch.randperm(len(kit.ordinary_images), generator=torch.Generator().manual_seed(args.seed))
    ordinary = kit.ordinary_images[picked[: args.ordinary]]
    print(f"{args.folder}: tau {detector.tau:.4f}, noise floor {detector.noise_floor}; "
          f"{len(planted)} planted and {len(ordinary)} ordinary sources, noise seed {args.seed}\n")  # fmt: skip
    print("| edit | strength | planted found | planted lowest | ordinary found | ordinary lowest | planted missed |")
    print("|---|---|---|---|---|---|---|")
    strongest = []
    for family, levels in edits().items():
        for label, apply in levels:
            generator = torch.Generator().manual_seed(args.seed)
            cells = []
            for sources in (planted, ordinary):
                scores = detector.paired_similarity(detector.embed(apply(sources, generator).clamp(0, 1)),
                                                    detector.embed(sources))  # fmt: skip
                cells.append((int((scores > detector.tau).sum()), len(scores), float(scores.min()), scores))
            missed = [kit.data.planted[i].caption for i in (cells[0][3] <= detector.tau).nonzero()[:, 0].tolist()]
            print(f"| {family} | {label} | {cells[0][0]} of {cells[0][1]} | {cells[0][2]:.2f} | {cells[1][0]} of "
                  f"{cells[1][1]} | {cells[1][2]:.2f} | {', '.join(missed) or '-'} |")  # fmt: skip
        strongest.append(apply(planted, torch.Generator().manual_seed(args.seed)).clamp(0, 1))
    if args.grid:
        save_grid(torch.cat(strongest), args.grid, columns=len(planted))
        print(f"\nwrote {args.grid}: rows {', '.join(edits())}")


if __name__ == "__main__":
    main()
