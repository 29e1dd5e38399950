"""Issue 23's contract under generated hostile input (hypothesis): every numeric option and every
file a command reads. Either the value is accepted and what comes out is finite and valid, or the
result is a DoriError whose message is one line; never another exception, never a partial file.

Derandomized (the same cases on every run, as the house rules ask) and bounded so the suite stays
within CI's time. ``pytest --hypothesis-show-statistics`` prints how many cases each test tried."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from test_errors import run_cli

from dori import configs, fields
from dori.errors import DoriError

CASES = settings(derandomize=True, deadline=None, database=None, max_examples=100,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
FEW = settings(CASES, max_examples=15)


def _one_line(error: DoriError) -> None:
    text = str(error)
    assert text.strip() and "\n" not in text and "Traceback" not in text, text


# ------------------------------------------------------------------ numeric options

# The contract, stated here independently of the code: the smallest value of each option.
MINIMUM = {"seeds": 1, "steps": 1, "batch_size": 1, "generations": 1, "consistency_seeds": 2, "utility_seeds": 1,
           "eval_steps": 1, "attack_batch": 1, "attack_steps": 1, "retain_batch": 1, "triggers_per_target": 1,
           "inner_steps": 0, "refresh_every": 0, "warmup_steps": 0, "surrogate_tries": 1, "empty_caption_prob": 0, "checkpoint_every": 1, "targets": 1, "inits": 2, "agreement_triggers": 1, "limit": 1,
           "first_seed": 0, "seed": 0, "attack_seed": 0, "control_limit": 0, "fresh_steps": 0,
           "eval_attack_steps": 0, "guidance": 0, "learning_rate": 0, "adv_weight": 0, "preserve_weight": 0}  # fmt: skip
ATTACK_STEPS_MAY_BE_ZERO = (configs.AttackRunConfig, configs.LocalityConfig)  # step 0: the prompt's own embedding
REQUIRED = {"method": "wanda", "prompts": "p", "memorized": "m", "non_memorized": "n"}
CONFIGS = (configs.ReplicateConfig, configs.DetectConfig, configs.MitigateConfig, configs.AttackRunConfig,
           configs.WandaSweepConfig, configs.UnlearnRunConfig, configs.LocalityConfig)  # fmt: skip
NUMERIC = [(cls, f.name) for cls in CONFIGS for f in dataclasses.fields(cls)
           if f.type in ("int", "float", "int | None", "float | None", "float | str")]  # fmt: skip
NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 1e300, 0.5, 1.0, float("nan"), float("inf")]),
)


FLAGS = {"learning_rate": "--lr", "triggers_per_target": "--triggers"}  # where the flag is not the field's name


def _flag(name: str) -> str:
    return FLAGS.get(name, "--" + name.replace("_", "-"))


@CASES
@given(field=st.sampled_from(NUMERIC), value=NUMBERS)
def test_every_numeric_option_is_accepted_within_its_range_or_refused_in_one_line(field, value):
    cls, name = field
    base = {k: v for k, v in REQUIRED.items() if k in {f.name for f in dataclasses.fields(cls)}}
    try:
        config = cls(**base, **{name: value})
    except DoriError as error:
        _one_line(error)
        assert _flag(name).lstrip("-") in str(error) or name.replace("_", " ") in str(error), str(error)
        event("refused with a clear error")
        return
    event("accepted")
    accepted = getattr(config, name)
    if isinstance(accepted, str):  # Wanda's "auto" is not drawn here
        pytest.fail(f"{name}={value!r} became {accepted!r}")
    assert math.isfinite(accepted)
    low = 0 if name == "steps" and cls in ATTACK_STEPS_MAY_BE_ZERO else MINIMUM.get(name)
    if low is not None:
        assert accepted >= low, (cls.__name__, name, accepted)
    if {f.name: f.type for f in dataclasses.fields(cls)}[name].startswith("int"):
        assert isinstance(accepted, int) and accepted <= max(fields.MAX_COUNT, fields.MAX_SEED)
    if name == "ratio":
        assert 0 < accepted <= 1


# Options of `dori replicate` and `generate`, each drawn either small and valid (so an accepted run
# finishes in a second) or hostile (outside the range, non-finite, or absurdly large).
def _hostile_ints(low: int):
    return st.one_of(st.integers(max_value=low - 1, min_value=-(2**70)), st.integers(min_value=10**7, max_value=2**70))


FLOAT_TEXT = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                       st.sampled_from(["nan", "inf", "-inf", "1e400", "-0.0", "1e-320"]))  # fmt: skip


@st.composite
def replicate_options(draw):
    options = {
        "--seeds": draw(st.one_of(st.integers(1, 2), _hostile_ints(1))),
        "--steps": draw(st.one_of(st.integers(1, 2), _hostile_ints(1))),
        "--first-seed": draw(st.one_of(st.integers(0, 5), st.integers(min_value=-(2**70), max_value=-1),
                                       st.integers(min_value=2**31, max_value=2**70))),  # fmt: skip
        "--batch-size": draw(st.one_of(st.integers(1, 4), _hostile_ints(1))),
        "--limit": draw(st.one_of(st.just(1), _hostile_ints(1))),
    }
    if draw(st.booleans()):
        options["--guidance"] = draw(st.one_of(FLOAT_TEXT, st.floats(0, 20).map(repr)))
    return options


def _finite_json(text: str):
    def refuse(constant):
        raise AssertionError(f"{constant} in a results file")

    return json.loads(text, parse_constant=refuse)


@FEW
@given(options=replicate_options())
def test_replicate_with_generated_numbers_finishes_with_finite_json_or_refuses_in_one_line(
        options, tiny_sd_dir, prompt_files, sscd_file, tmp_path_factory, capsys):  # fmt: skip
    out = tmp_path_factory.mktemp("rep") / "run"
    args = ["replicate", "--model", tiny_sd_dir, "--prompts", prompt_files / "mem.csv", "--images",
            prompt_files / "images", "--sscd", sscd_file, "--out", out]  # fmt: skip
    for flag, value in options.items():
        args += [flag, value]
    code, err = run_cli(args, capsys)
    event(f"exit {code}")
    if code == 0:
        summary = _finite_json((out / "summary.json").read_text())
        assert 0 <= summary["mr"] <= 1
        for line in (out / "results.jsonl").read_text().splitlines():
            _finite_json(line)
    else:
        assert code == 2 and "Traceback" not in err, err
        assert not (out / "summary.json").exists() and not (out / "results.jsonl").exists()


@FEW
@given(seeds=st.one_of(st.integers(1, 2), _hostile_ints(1)), steps=st.one_of(st.integers(1, 2), _hostile_ints(1)),
       guidance=st.one_of(FLOAT_TEXT, st.floats(0, 1e6).map(repr)))  # fmt: skip
def test_generate_with_generated_numbers_writes_every_image_or_nothing(seeds, steps, guidance, tiny_sd_dir,
                                                                        tmp_path_factory, capsys):  # fmt: skip
    out = tmp_path_factory.mktemp("gen") / "images"
    code, err = run_cli(["generate", "--model", tiny_sd_dir, "--prompt", "a cat", "--seeds", seeds, "--steps", steps,
                         "--guidance", guidance, "--out", out], capsys)  # fmt: skip
    event(f"exit {code}")
    if code == 0:
        assert len(_finite_json((out / "images.json").read_text())) == seeds
        assert len(list(out.glob("prompt000_seed*.png"))) == seeds
    else:
        assert code == 2 and "Traceback" not in err, err
        assert not out.exists() and not list(out.parent.glob(".images.partial-*"))


# ------------------------------------------------------------------ files a command reads

@st.composite
def damaged(draw, data: bytes) -> bytes:
    """A generated corruption of a good file: truncated, bytes overwritten, junk, empty, or extended."""
    kind = draw(st.sampled_from(["truncate", "overwrite", "junk", "empty", "append"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if kind == "overwrite":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
        return bytes(out)
    if kind == "junk":
        return draw(st.binary(max_size=256))
    if kind == "empty":
        return b""
    return data + draw(st.binary(min_size=1, max_size=64))


def _either_valid_or_clear(read, check=lambda value: None) -> None:
    try:
        value = read()
    except DoriError as error:
        _one_line(error)
        event("refused with a clear error")
        return
    event("read as valid")
    check(value)


def _finite_tensor(t) -> None:
    assert bool(torch.isfinite(t.float()).all())


GOOD_TEXT = {
    "prompts.csv": "Index;Caption;type\n0;a red barn;VM\n1;a blue boat;TM\n",
    "prompts.jsonl": '{"caption": "a red barn", "index": 0}\n{"caption": "a blue boat", "index": 1}\n',
    "prompts.txt": "a red barn\na blue boat\n",
}


@CASES
@given(data=st.data(), name=st.sampled_from(sorted(GOOD_TEXT)))
def test_damaged_prompt_files_load_as_prompts_or_fail_clearly(data, name, tmp_path_factory):
    from dori.prompts import load_prompt_set

    file = tmp_path_factory.mktemp("prompts") / name
    file.write_bytes(data.draw(damaged(GOOD_TEXT[name].encode())))

    def check(prompts) -> None:
        assert len(prompts) >= 1 and all(isinstance(p.prompt, str) and p.prompt.strip() for p in prompts.prompts)

    _either_valid_or_clear(lambda: load_prompt_set(str(file)), check)


@pytest.fixture(scope="module")
def saved_files(tiny_sd, tmp_path_factory):
    """One good file of each binary kind dori reads: embeddings, NeMo statistics, a run's tensors
    and checkpoint, a results file."""
    from dori.mitigate.nemo import save_statistics, value_statistics

    folder = tmp_path_factory.mktemp("good")
    save_file({"step_0": tiny_sd.encode(["a cat"]).cpu(), "step_5": tiny_sd.encode(["a dog"]).cpu()},
              str(folder / "embeddings.safetensors"))  # fmt: skip
    save_statistics(value_statistics(tiny_sd, ["a cat", "a dog", "a red barn"]), folder / "stats.pt")
    torch.save({"unet": {"w": torch.ones(2)}, "optimizer": {}, "step": 3, "triggers": torch.zeros(2, 4),
                "history": "[]"}, folder / "checkpoint.pt")  # fmt: skip
    (folder / "results.jsonl").write_text('{"id": 0, "mr": 0.5}\n{"id": 1, "mr": 1.0}\n')
    (folder / "summary.json").write_text('{"mr": 0.5, "sscd_mean": 0.7}\n')
    return folder


@CASES
@given(data=st.data(), kind=st.sampled_from(["embeddings", "stats", "checkpoint", "results", "summary"]))
def test_damaged_binary_and_run_files_load_valid_or_fail_clearly(data, kind, saved_files, tiny_sd, tmp_path_factory):
    from dori.attack import load_embeddings
    from dori.mitigate.nemo import load_statistics
    from dori.runs import ResultsFile, read_checkpoint, read_json

    name = {"embeddings": "embeddings.safetensors", "stats": "stats.pt", "checkpoint": "checkpoint.pt",
            "results": "results.jsonl", "summary": "summary.json"}[kind]  # fmt: skip
    file = tmp_path_factory.mktemp(kind) / name
    file.write_bytes(data.draw(damaged((saved_files / name).read_bytes())))
    readers = {
        "embeddings": (lambda: load_embeddings(file, tiny_sd), _finite_tensor),
        "stats": (lambda: load_statistics(file, tiny_sd),
                  lambda s: [_finite_tensor(t) for t in (*s.mean, *s.std)]),
        "checkpoint": (lambda: read_checkpoint(file, keys=("unet", "step")), lambda c: None),
        "results": (lambda: ResultsFile(file), lambda r: [json.dumps(row, allow_nan=False) for row in r.rows]),
        "summary": (lambda: read_json(file), lambda s: None),
    }  # fmt: skip
    read, check = readers[kind]
    _either_valid_or_clear(read, check)


TENSOR_DAMAGE = st.sampled_from(["nan", "inf", "float64", "int8", "wrong shape", "scalar", "empty", "renamed"])


def _damage_tensor(tensor: torch.Tensor, how: str) -> tuple[str | None, torch.Tensor]:
    if how == "nan":
        return None, tensor.clone().index_fill_(0, torch.tensor([0]), float("nan"))
    if how == "inf":
        return None, tensor.clone().index_fill_(0, torch.tensor([0]), float("inf"))
    if how == "float64":
        return None, tensor.double()
    if how == "int8":
        return None, tensor.to(torch.int8)
    if how == "wrong shape":
        return None, tensor.flatten()[: max(1, tensor.numel() // 2)].clone()
    if how == "scalar":
        return None, torch.tensor(1.0)
    if how == "empty":
        return None, tensor.flatten()[:0].clone()
    return "renamed", tensor


@CASES
@given(how=TENSOR_DAMAGE, which=st.integers(0, 50))
def test_mask_and_embedding_tensors_of_the_wrong_kind_are_refused_clearly(how, which, wanda_mask, saved_files,
                                                                        tiny_sd, tmp_path_factory):  # fmt: skip
    """Valid files with the wrong contents: NaN, another dtype or shape, a missing tensor."""
    from safetensors.torch import load_file

    from dori.attack import load_embeddings
    from dori.interventions import load_mask

    folder = tmp_path_factory.mktemp("mask") / "mask"
    shutil.copytree(wanda_mask, folder)
    weights = folder / json.loads((folder / "mask.json").read_text())["weights"]
    tensors = load_file(str(weights))
    key = sorted(tensors)[which % len(tensors)]
    new_key, tensors[key] = _damage_tensor(tensors[key].float() if how in ("nan", "inf") else tensors[key], how)
    if new_key:
        tensors["not_a_site"] = tensors.pop(key)
    save_file(tensors, str(weights))
    _either_valid_or_clear(lambda: load_mask(folder, tiny_sd),
                           lambda m: [bool(((w == 0) | (w == 1)).all()) or pytest.fail(str(w.dtype))
                                      for w in m.weights.values()])  # fmt: skip
    emb_file = tmp_path_factory.mktemp("emb") / "e.safetensors"
    emb = load_file(str(saved_files / "embeddings.safetensors"))
    new_key, emb["step_5"] = _damage_tensor(emb["step_5"], how)
    if new_key:
        emb["other"] = emb.pop("step_5")
    save_file(emb, str(emb_file))
    _either_valid_or_clear(lambda: load_embeddings(emb_file, tiny_sd, "step_5"), _finite_tensor)


@pytest.fixture(scope="module")
def wanda_mask(tiny_sd, tmp_path_factory):
    from dori.interventions import save_mask
    from dori.mitigate.wanda import wanda_mitigation, wanda_scores_for

    scores = wanda_scores_for(tiny_sd, [tiny_sd.encode(["a cat", "a dog"])], "ffn", batch_size=8)
    folder = tmp_path_factory.mktemp("wanda") / "mask"
    save_mask(wanda_mitigation(tiny_sd, scores.mask(tiny_sd, 0, 0.1)), folder)
    return folder


@FEW
@given(data=st.data(), part=st.sampled_from(["dori_model.json", "scheduler/scheduler_config.json",
                                               "unet/config.json", "text_encoder/config.json"]))  # fmt: skip
def test_damaged_model_folder_files_load_or_fail_clearly(data, part, tiny_sd_dir, tmp_path_factory):
    from dori.models.loading import load_model

    folder = tmp_path_factory.mktemp("model") / "model"
    shutil.copytree(tiny_sd_dir, folder)
    good = (folder / part).read_bytes() if (folder / part).exists() else b'{"name": "tiny"}'
    (folder / part).write_bytes(data.draw(damaged(good)))
    _either_valid_or_clear(lambda: load_model(folder), lambda model: model.encode(["a cat"]))


@FEW
@given(data=st.data())
def test_damaged_sscd_files_and_training_images_fail_clearly(data, sscd_file, prompt_files, tmp_path_factory):
    from dori.measure.similarity import SSCD
    from dori.references import load_image

    folder = tmp_path_factory.mktemp("sscd")
    file = folder / "sscd.pt"
    file.write_bytes(data.draw(damaged(sscd_file.read_bytes())))
    _either_valid_or_clear(lambda: SSCD(file), lambda model: _finite_tensor(model.embed(torch.rand(2, 3, 32, 32))))
    image = next(iter(sorted((prompt_files / "images").iterdir())))
    bad = folder / image.name
    bad.write_bytes(data.draw(damaged(image.read_bytes())))
    _either_valid_or_clear(lambda: load_image(bad, (16, 16)), _finite_tensor)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "--hypothesis-show-statistics"]))
