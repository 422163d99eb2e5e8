"""The MAE reconstruction figure: original / masked / reconstruction / reconstruction + visible (the paper's Fig. 2).

Shapes: B batch, C channels, H, W image, L patches, p patch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..models.mae import MaskedAutoencoderViT
from ..models.masking import check_mask_ratio
from ..models.patches import patchify
from .grid import enlargement, save_grid, to_pil

PANELS = ("original", "masked", "reconstruction", "reconstruction + visible")


def seeded_noise(batch: int, num_patches: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Masking noise (B, L) from a private generator: the same seed gives the same mask, global RNG untouched."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, num_patches, generator=g).to(device)


@torch.no_grad()
def reconstruct(
    model: MaskedAutoencoderViT,
    imgs: torch.Tensor,
    mask_ratio: float = 0.75,
    seed: int | None = 0,
    noise: torch.Tensor | None = None,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
) -> dict[str, torch.Tensor]:
    """Run the MAE and return the four panels, each (B, C, H, W) in [0, 1], plus 'mask' (B, L) and 'loss' ().

    imgs are normalised as the model saw them in training; mean/std map them back to pixels (pass the
    model's `data_mean` / `data_std` for a model from `fastmae.load`). seed: the mask comes from a private
    generator (the same seed gives the same mask); seed=None draws it as the official code does.

    With norm_pix_loss the predictions are per-patch normalised; they are mapped back with each
    patch's own mean and variance (from the input), so colours and contrast are right.
    """
    check_mask_ratio(mask_ratio)
    was_training = model.training
    model.eval()
    B = imgs.shape[0]
    if noise is None and seed is not None:
        noise = seeded_noise(B, model.patch_embed.num_patches, seed, imgs.device)
    # a cross decoder decodes every masked patch here, whatever share it scores in training
    kept = {"kept_mask_ratio": 0.0} if getattr(model, "decoder", "self") == "cross" else {}
    loss, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise, **kept)  # (), (B, L, p*p*C), (B, L)
    pred = pred.float()
    if model.norm_pix_loss:
        target = patchify(imgs.float(), model.patch_size)  # (B, L, p*p*C)
        mu, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1.0e-6) ** 0.5 + mu
    rec = model.unpatchify(pred)  # (B, C, H, W)
    m = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]).float())  # (B, C, H, W), 1 = removed
    x = imgs.float()
    model.train(was_training)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)

    def to_pixels(t: torch.Tensor) -> torch.Tensor:
        return (t * std_t + mean_t).clamp(0, 1)

    return {
        "original": to_pixels(x),
        "masked": to_pixels(x * (1 - m)),  # removed patches show the data mean, as in the official demo
        "reconstruction": to_pixels(rec),
        "reconstruction + visible": to_pixels(x * (1 - m) + rec * m),
        "mask": mask,
        "loss": loss.detach().float(),  # the training loss of this batch (MSE on the removed patches)
    }


def save_figure(panels: dict[str, torch.Tensor], path: str | Path, max_rows: int = 8, min_side: int = 112) -> Path:
    """A grid PNG: one row per image, columns original / masked / reconstruction / reconstruction + visible."""
    n = min(panels["original"].shape[0], max_rows)
    scale = enlargement(*panels["original"].shape[-2:], min_side)  # small images (28 px) are enlarged
    rows = [[to_pil(panels[name][i], scale) for name in PANELS] for i in range(n)]
    return save_grid(PANELS, rows, path)
