"""The attribute classifier: the bundled model's CLIP-score and FID analogue.

A small CNN trained on clean ordinary images predicts (shape, colour, position). *Prompt alignment*
is the fraction of generated images whose three predicted attributes all match their caption; *FD*
is the Frechet distance between generated and real images in its 128-d penultimate features.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from dori.measure.replication import rate
from dori.toy.data import COLOURS, POSITIONS, SHAPES, render_attribute_set


class AttributeClassifier(nn.Module):
    def __init__(self, width: int = 32, features: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 16, features), nn.ReLU(),
        )  # fmt: skip
        self.heads = nn.ModuleList(nn.Linear(features, n) for n in (len(SHAPES), len(COLOURS), len(POSITIONS)))

    def features(self, images: Tensor) -> Tensor:
        """Penultimate features ``[N, 128]`` of images in ``[0, 1]``."""
        return self.body(images * 2 - 1)

    def forward(self, images: Tensor) -> list[Tensor]:
        feats = self.features(images)
        return [head(feats) for head in self.heads]

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """Predicted (shape, colour, position) indices ``[N, 3]``."""
        return torch.stack([logits.argmax(1) for logits in self(images)], dim=1)


# The instrument's bar, fixed before any model is measured with it (seed 4's classifier
# scored 0.9615 after 800 steps, the other seeds' 0.994 to 0.998): training goes on in rounds until
# the accuracy on a validation set of fresh renders reaches it, or the step cap is reached.
ACCURACY_BAR = 0.99
MAX_ROUNDS = 4


def train_classifier(
    *, seed: int, steps: int = 800, n_images: int = 8000, batch_size: int = 64, style: str = "field",
    bar: float = ACCURACY_BAR, max_rounds: int = MAX_ROUNDS, progress: Callable[[int], None] | None = None,
) -> tuple[AttributeClassifier, dict]:
    """Train on fresh renders of all combinations in rounds of ``steps``, until the accuracy (all
    three attributes right) on a validation set of fresh renders reaches ``bar`` or ``max_rounds``
    rounds are done. Returns the model and ``{"accuracy_on_fresh_renders", "validation_accuracy",
    "steps"}``; the first is measured on a third set of renders, which does not decide the stop.
    A seed that reaches the bar in its first round gets the classifier plain 800 steps gave it."""
    torch.manual_seed(seed)
    images, labels = render_attribute_set(n_images, seed=seed + 1, style=style)
    valid_images, valid_labels = render_attribute_set(2000, seed=seed + 3, style=style)
    model = AttributeClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    done = 0
    for _ in range(max_rounds):
        model.train()
        for _ in range(steps):
            idx = torch.randint(len(images), (batch_size,), generator=generator)
            x = images[idx]
            # Generated images are slightly noisy: train the instrument to ignore that.
            sigma = torch.rand(batch_size, 1, 1, 1, generator=generator) * 0.06
            x = (x + sigma * torch.randn(x.shape, generator=generator)).clamp(0, 1)
            loss = sum(loss_fn(logits, labels[idx, k]) for k, logits in enumerate(model(x)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if progress is not None:
                progress(1)
        done += steps
        model.eval()
        validation = _accuracy(model, valid_images, valid_labels)
        if validation >= bar:
            break
    test_images, test_labels = render_attribute_set(2000, seed=seed + 2, style=style)
    info = {"accuracy_on_fresh_renders": _accuracy(model, test_images, test_labels),
            "validation_accuracy": validation, "steps": done}  # fmt: skip
    return model, info


def _accuracy(model: AttributeClassifier, images: Tensor, labels: Tensor) -> float:
    return rate((model.predict(images) == labels).all(1))
