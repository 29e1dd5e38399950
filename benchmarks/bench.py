"""dori's benchmarks: time and peak memory, printed as tables.

    python benchmarks/bench.py                  # every table, on the bundled model
    python benchmarks/bench.py --only compare   # batched vs one-prompt-one-seed loops
    python benchmarks/bench.py --only rows      # U-Net calls whole vs in chunks
    python benchmarks/bench.py --only stages --quick
    python benchmarks/bench.py --model /models/sd-v1-4 --device cuda --only compare

1. **Stages**: each stage of ``dori study`` run in its own fresh process (so its peak memory is its
   own), in order, on one study folder: seconds, the seconds spent in NeMo's search (the nemo
   stage's and locality's), and peak memory (resident set on CPU, CUDA allocator peak on GPU).
   ``PYTHONPATH=OTHER/src python benchmarks/bench.py --only stages`` times another checkout's code
   with the same benchmark.
2. **Rows per U-Net call** (``--only rows``): U-Net calls of N rows run whole and in the chunks of
   at most ``max_rows`` rows that dori uses on a CPU (``DiffusionModel.model_output``), forward
   without gradient (sampling) and forward + backward to the embedding (the attack); the time of
   each and whether both give the same numbers, bit for bit.
3. **Batched vs loop**: generation, detection (noise-difference norm), NeMo localisation and the
   DoRI attack, each run by dori's batched implementation and by a one-prompt, one-seed loop (the
   way the NeMo and Wen et al. reference code run), on the same inputs; the speed ratio and
   whether both give the same numbers.

Every measurement runs in a child process, one at a time (two torch processes on a small CPU slow
each other down). Timings are wall-clock; run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dori.configs import STUDY_DEFAULT_STAGES as STAGES  # light: no torch import
TASKS = ("generate", "detect", "nemo", "attack")
ROW_COUNTS = (64, 80, 128, 256)  # a sampling batch of 40 and of 64 images with guidance, and more


# --------------------------------------------------------------------- child side


def _peak_memory(device: str) -> float:
    """MiB: the CUDA allocator's peak on GPU, the process's peak resident set on CPU."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child_stage(args) -> dict:
    from dori.models.loading import load_model
    import dori.mitigate.nemo as nemo
    import dori.stages.mitigate as mitigate
    from dori.configs import StudyConfig
    from dori.stages.study import run_study

    searching = [0.0]  # seconds inside NeMo's search (the nemo stage's, and locality's on the triggers)
    search = nemo.nemo_localize

    def timed(*a, **k):
        began = time.monotonic()
        try:
            return search(*a, **k)
        finally:
            searching[0] += time.monotonic() - began

    nemo.nemo_localize = mitigate.nemo_localize = timed
    model = load_model(args.model, device=args.device)
    config = StudyConfig(model=args.model, stages=args.stage, quick=args.quick)
    began = time.monotonic()
    run_study(config, model, args.folder, resume=True)
    return {"seconds": time.monotonic() - began, "peak_mib": _peak_memory(args.device), "nemo_search": searching[0]}


def _inputs(model, n_prompts: int):
    from dori.references import load_prompts

    spec = "bundled:memorized" if "toy_data" in model.meta else "sd14:memorized"
    return load_prompts(spec, model, limit=n_prompts)


def child_task(args) -> dict:
    """One task, batched or looped; returns seconds, peak memory and a fingerprint of the result."""
    import torch

    from dori.models.loading import load_model

    model = load_model(args.model, device=args.device)
    prompts = _inputs(model, args.prompts)
    seeds = list(range(args.seeds))
    loop = args.mode == "loop"
    emb = model.encode(prompts.texts)
    began = time.monotonic()
    if args.task == "generate":
        if loop:
            out = torch.cat([model.generate(emb[i : i + 1], [s], steps=args.steps, batch_size=1)
                             for i in range(len(emb)) for s in seeds])  # fmt: skip
        else:
            out = model.generate(emb, seeds, steps=args.steps, batch_size=args.batch_size)
        result = out.double().mean().item()
    elif args.task == "detect":
        from dori.measure.detection import noise_difference_norms

        if loop:
            scores = [noise_difference_norms(model, [p], seeds=[s], steps=args.steps, batch_size=1)["first_step"][0]
                      for p in prompts.texts for s in seeds]  # fmt: skip
            result = sum(scores) / len(seeds)
        else:
            result = sum(noise_difference_norms(model, prompts.texts, seeds=seeds, steps=args.steps,
                                                batch_size=args.batch_size)["first_step"])  # fmt: skip
    elif args.task == "nemo":
        from dori.mitigate.nemo import NemoConfig, nemo_localize
        from dori.mitigate.nemo_reference import nemo_reference

        config = NemoConfig(batch_size=10 if loop else max(args.batch_size, 10))
        stats, threshold = nemo_reference(model, reference_prompts=None, stats=None, threshold=None, config=config,
                                          say=lambda m: None)  # fmt: skip
        began = time.monotonic()  # the reference statistics are shared, not timed
        if loop:
            results = [nemo_localize(model, emb[i : i + 1], stats, threshold, config)[0] for i in range(len(emb))]
        else:
            results = nemo_localize(model, emb, stats, threshold, config)
        result = sum(sum(len(v) for v in r.neurons.values()) for r in results)
    elif args.task == "attack":
        from dori.attack import AttackConfig, dori_attack
        from dori.references import References, attack_targets

        refs = References(model, images=None, sscd=None)
        latents = model.to_latents(torch.cat(attack_targets(model, prompts, refs)))
        config = AttackConfig(steps=args.attack_steps)
        row_seeds = list(range(len(emb)))
        if loop:
            found = torch.cat([dori_attack(model, latents[i : i + 1], emb[i : i + 1], config, seeds=[row_seeds[i]]).embeddings
                               for i in range(len(emb))])  # fmt: skip
        else:
            found = dori_attack(model, latents, emb, config, seeds=row_seeds).embeddings
        result = found.double().mean().item()
    else:
        raise SystemExit(f"unknown task {args.task}")
    return {"seconds": time.monotonic() - began, "peak_mib": _peak_memory(args.device), "result": result}


def child_rows(args) -> dict:
    """Whole vs chunked U-Net calls: seconds (best of 3) and bit-identity, for each row count."""
    import torch

    from dori.models.loading import load_model

    model = load_model(args.model, device=args.device)
    generator = torch.Generator().manual_seed(0)
    out = []
    for rows in ROW_COUNTS:
        x = torch.randn(rows, *model.latent_shape, generator=generator).to(model.device, model.dtype)
        emb = torch.randn(rows, *model.embedding_shape, generator=generator).to(model.device, model.dtype)
        t = torch.randint(model.num_train_timesteps, (rows,), generator=generator).to(model.device)

        def forward():
            with torch.no_grad():
                return model.model_output(x, t, emb)

        def backward():
            e = emb.clone().requires_grad_(True)
            return torch.autograd.grad(model.model_output(x, t, e).float().pow(2).sum(), e)[0]

        measured = {}
        for name, run in (("forward", forward), ("forward + backward", backward)):
            for mode in ("whole", "chunks"):
                best, result = float("inf"), None
                for _ in range(3):
                    began = time.monotonic()
                    with model.whole_batches() if mode == "whole" else contextlib.nullcontext():
                        result = run()
                    best = min(best, time.monotonic() - began)
                measured[name, mode] = (best, result)
            same = torch.equal(measured[name, "whole"][1], measured[name, "chunks"][1])
            out.append([rows, name, measured[name, "whole"][0], measured[name, "chunks"][0], same])
    return {"rows": out, "max_rows": model.max_rows}


# --------------------------------------------------------------------- parent side


def _run_child(extra: list[str], common: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *common, *extra], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"benchmark child failed ({' '.join(extra)}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def bench_stages(args, common: list[str]) -> str:
    rows, total = [], 0.0
    with tempfile.TemporaryDirectory(prefix="dori-bench-") as folder:
        for stage in STAGES:
            r = _run_child(["--stage", stage, "--folder", str(Path(folder) / "study")] + (["--quick"] if args.quick else []),
                           common)  # fmt: skip
            total += r["seconds"]
            rows.append([stage, f"{r['seconds']:.1f}", f"{r['nemo_search']:.1f}" if r["nemo_search"] else "",
                         f"{r['peak_mib']:.0f}"])  # fmt: skip
            print(f"  {stage}: {r['seconds']:.1f} s", file=sys.stderr, flush=True)
    rows.append(["total", f"{total:.1f}", "", ""])
    return _table(["stage", "seconds", "of which NeMo search", "peak MiB"], rows)


def bench_compare(args, common: list[str]) -> str:
    rows = []
    shape = ["--prompts", str(args.prompts), "--seeds", str(args.seeds), "--steps", str(args.steps),
             "--attack-steps", str(args.attack_steps), "--batch-size", str(args.batch_size)]  # fmt: skip
    for task in TASKS:
        got = {mode: _run_child(["--task", task, "--mode", mode, *shape], common) for mode in ("batched", "loop")}
        b, lp = got["batched"], got["loop"]
        same = abs(b["result"] - lp["result"]) <= 1e-4 * max(1.0, abs(lp["result"]))
        rows.append([task, f"{b['seconds']:.2f}", f"{lp['seconds']:.2f}", f"{lp['seconds'] / b['seconds']:.1f}x",
                     f"{b['peak_mib']:.0f}", f"{lp['peak_mib']:.0f}", "yes" if same else f"no ({b['result']:.6g} vs {lp['result']:.6g})"])  # fmt: skip
        print(f"  {task}: batched {b['seconds']:.2f} s, loop {lp['seconds']:.2f} s", file=sys.stderr, flush=True)
    note = (f"{args.prompts} memorized prompts x {args.seeds} seeds, {args.steps} sampling steps, "
            f"attack {args.attack_steps} steps")  # fmt: skip
    return note + "\n" + _table(["task", "batched s", "loop s", "speed-up", "batched MiB", "loop MiB", "same result"], rows)


def bench_rows(common: list[str]) -> str:
    got = _run_child(["--rows"], common)
    rows = [[n, kind, f"{whole * 1000:.0f}", f"{chunks * 1000:.0f}", f"{chunks / whole:.2f}", "yes" if same else "no"]
            for n, kind, whole, chunks, same in got["rows"]]  # fmt: skip
    note = f"at most {got['max_rows']} rows per call" if got["max_rows"] else "this device runs every call whole"
    return note + "\n" + _table(["rows", "pass", "whole ms", "chunked ms", "ratio", "same numbers"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", choices=("stages", "compare", "rows"))
    parser.add_argument("--quick", action="store_true", help="stages: the study's reduced settings")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--attack-steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    # child-process arguments
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--rows", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child_rows(args) if args.rows else child_stage(args) if args.stage else child_task(args)
        print(json.dumps(result))
        return
    common = ["--model", args.model, "--device", args.device]
    if args.only in (None, "rows"):
        print("## Rows per U-Net call: whole vs in chunks\n")
        print(bench_rows(common) + "\n", flush=True)
    if args.only in (None, "compare"):
        print("## Batched implementation vs one-prompt, one-seed loop\n")
        print(bench_compare(args, common) + "\n", flush=True)
    if args.only in (None, "stages"):
        print(f"## Study stages ({'--quick' if args.quick else 'full settings'}), each in a fresh process\n")
        print(bench_stages(args, common), flush=True)


if __name__ == "__main__":
    main()
