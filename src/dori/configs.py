"""Typed configs, one per stage, validated on creation. They are written next to every result,
and the command line takes its defaults from them. (No torch import here: ``dori --help`` stays fast.)"""

from __future__ import annotations

from dataclasses import dataclass

from dori.errors import DoriError


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise DoriError(f"{name.replace('_', '-')} must be at least 1, got {value}")


@dataclass(frozen=True)
class ReplicateConfig:
    prompts: str
    model: str = "bundled"
    seeds: int = 10
    first_seed: int = 0
    steps: int = 50
    guidance: float = 7.0
    type: str | None = None
    limit: int | None = None
    images: str | None = None
    sscd: str | None = None
    sscd_convention: str = "resize320"
    batch_size: int = 64

    def __post_init__(self) -> None:
        _check_positive(seeds=self.seeds, steps=self.steps, batch_size=self.batch_size)


@dataclass(frozen=True)
class DetectConfig:
    memorized: str
    non_memorized: str
    model: str = "bundled"
    generations: int = 4
    consistency_seeds: int = 10
    steps: int = 50
    guidance: float = 7.0
    all_steps: bool = False
    limit: int | None = None
    batch_size: int = 64

    def __post_init__(self) -> None:
        _check_positive(generations=self.generations, steps=self.steps, batch_size=self.batch_size)
        if self.consistency_seeds < 2:
            raise DoriError(f"consistency-seeds must be at least 2 (pairs of seeds), got {self.consistency_seeds}")


