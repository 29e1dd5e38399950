"""The attribute classifier: the bundled model's CLIP-score and FID analogue.

A small CNN trained on clean ordinary images predicts (shape, colour, position). *Prompt alignment*
is the fraction of generated images whose three predicted attributes all match their caption; *FD*
is the Frechet distance between generated and real images in its 128-d penultimate features.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

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


def train_classifier(
    *, seed: int, steps: int = 800, n_images: int = 8000, batch_size: int = 64, style: str = "field",
    progress: Callable[[int], None] | None = None,
) -> tuple[AttributeClassifier, float]:
    """Train on fresh renders of all combinations; returns the model and its accuracy on new renders."""
    torch.manual_seed(seed)
    images, labels = render_attribute_set(n_images, seed=seed + 1, style=style)
    model = AttributeClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(steps):
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
    model.eval()
    test_images, test_labels = render_attribute_set(2000, seed=seed + 2, style=style)
    accuracy = (model.predict(test_images) == test_labels).all(1).float().mean().item()
    return model, accuracy
