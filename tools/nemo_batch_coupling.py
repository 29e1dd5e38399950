"""Does a prompt's NeMo result depend on the other prompts searched with it?

torchmetrics' multi-scale SSIM takes the data range of each scale from the whole batch it is given.
NeMo's reference code scores each trial on its own (one prompt's memorized seeds); dori scores a
whole round of trials (every prompt searched together) in one call. This tool searches a prompt set
together, as ``dori mitigate`` does, and then each chosen prompt alone, and prints both results.

    python tools/nemo_batch_coupling.py [--prompts bundled:memorized] [--alone 0,6]

On the bundled model (2 cores) it takes about two minutes for two prompts.
"""

from __future__ import annotations

import argparse

from dori.configs import MitigateConfig
from dori.mitigate.nemo import nemo_localize
from dori.mitigate.nemo_reference import nemo_for_run
from dori.models.loading import load_model
from dori.references import load_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--prompts", default="bundled:memorized")
    parser.add_argument("--alone", default="0,6", help="comma-separated indices of the prompts to search alone")
    args = parser.parse_args()
    model = load_model(args.model)
    prompts = load_prompts(args.prompts, model)
    config = MitigateConfig(method="nemo", prompts=args.prompts, model=args.model)
    nemo_config, stats, threshold = nemo_for_run(model, config, print)
    emb = model.encode(prompts.texts)
    together = nemo_localize(model, emb, stats, threshold, nemo_config)
    print(f"threshold {threshold:.4f}; {len(prompts)} prompts searched together, then each of --alone by itself\n")
    print("| prompt | neurons together | neurons alone | shared | refined SSIM together | alone |")
    print("|---|---|---|---|---|---|")
    for i in (int(x) for x in args.alone.split(",")):
        alone = nemo_localize(model, emb[i : i + 1], stats, threshold, nemo_config)[0]
        a, b = together[i].neurons, alone.neurons
        shared = sum(len(set(a.get(site, [])) & set(b.get(site, []))) for site in set(a) | set(b))
        print(f"| {prompts.texts[i]} | {sum(map(len, a.values()))} | {sum(map(len, b.values()))} | {shared} | "
              f"{together[i].refined_ssim:.4f} | {alone.refined_ssim:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
