"""The DoRI attack: adversarial conditioning embeddings that re-trigger memorized images."""

from dori.attack.dori import AttackConfig, AttackResult, dori_attack, initial_embeddings, load_embeddings

__all__ = ["AttackConfig", "AttackResult", "dori_attack", "initial_embeddings", "load_embeddings"]
