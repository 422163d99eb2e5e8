"""2D pose on a plain ViT, as ViTPose (Xu et al., 2022): the encoder's last map, a light head to K heatmaps, Gaussian
targets with per-keypoint weights, MSE, and a sub-pixel decode.

Shapes: B batch, C channels, H, W crop (--model.img_size), p patch, h, w = H/p, W/p patch grid, D width, K keypoints,
H', W' = 4h, 4w heatmap (both heads upsample x4), s = p/4 crop pixels per heatmap pixel.

Coordinates are continuous pixels (pixel j covers [j, j+1), its centre is j + 0.5) in the crop, the heatmap and
the image alike, so a crop pixel x is heatmap pixel x / s and a left-right flip is x -> W - x in every frame:
flipping heatmaps back is exact (the unbiasedness UDP asks for, Huang et al., 2020). The backbone runs as ViTPose
runs an MAE encoder: no cls token in the sequence (its position embedding is added to every patch), the patch
convolution padded by `patch_padding` pixels (ViTPose's 2 for 16-px patches), the final norm, then (B, D, h, w).
Heads keep Hugging Face `VitPoseForPoseEstimation`'s names (`head.conv`, `head.deconv1`, ...), so its weights load
as they are.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dense import DenseModel
from .heads import DenseHead
from .vit import LN_EPS, VisionTransformer, pos_embed_for

VITPOSE_PADDING = 2  # ViTPose's patch-embedding padding (its `PatchEmbed(padding=4 + 2 * (ratio // 2 - 1))`, ratio 1)
HEATMAP_UPSAMPLE = 4  # both heads: heatmaps at 4x the patch grid (64x48 for 256x192 crops at patch 16)
DARK_KERNEL = 11  # the Gaussian blur of DARK's modulation (mmpose's UDPHeatmap blur_kernel_size for sigma 2)


def vitpose_padding(patch_size: int) -> int:
    """ViTPose's patch padding where it keeps the patch grid (patches over 4 px), else 0: with 4-px patches 2 px
    of padding would add a row and a column of patches."""
    return VITPOSE_PADDING if patch_size > 2 * VITPOSE_PADDING else 0


def vitpose_map(encoder: nn.Module, x: torch.Tensor, patch_padding: int = 0) -> torch.Tensor:
    """Images (B, C, H, W) -> the encoder's last map (B, D, h, w) as ViTPose computes it (no cls token in the
    sequence; its position embedding added to every patch; patch conv padded by `patch_padding`; final norm)."""
    pe = encoder.patch_embed
    if x.ndim != 4 or x.shape[1] != pe.in_chans:
        raise ValueError(f"expected images (B, {pe.in_chans}, H, W), got shape {tuple(x.shape)}")
    h, w = pe.grid_for(x.shape[-2], x.shape[-1])
    t = F.conv2d(x, pe.proj.weight, pe.proj.bias, stride=pe.patch_size, padding=patch_padding)  # (B, D, h, w)
    if tuple(t.shape[-2:]) != (h, w):
        raise ValueError(f"patch padding {patch_padding} turns a {h}x{w} patch grid into {t.shape[-2]}x{t.shape[-1]};"
                         f" use a padding below half the patch size {pe.patch_size[0]}")
    pos = pos_embed_for(encoder, (h, w))  # (1, 1+L, D)
    t = t.flatten(2).transpose(1, 2) + pos[:, 1:] + pos[:, :1]  # (B, L, D)
    for blk in encoder.blocks:
        t = blk(t)
    t = encoder.norm(t)
    return t.transpose(1, 2).reshape(t.shape[0], -1, h, w)  # (B, D, h, w)


def set_norm_eps(module: nn.Module, eps: float) -> None:
    """Every LayerNorm of `module` at `eps` (Hugging Face VitPose configs say 1e-12 or 1e-6; fastmae builds 1e-6)."""
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = eps


# ---------------------------------------------------------------------------------------------------
# Targets and decoding (pure functions of tensors).


def encode_heatmaps(keypoints: torch.Tensor, weights: torch.Tensor, size: tuple[int, int],
                    sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Keypoints (B, K, 2) in heatmap pixels -> Gaussian heatmaps (B, K, H', W') peaking at 1 on the exact sub-pixel
    position, and weights (B, K): the given ones, 0 where a keypoint lies over 3 sigma outside the map (mmpose)."""
    H, W = size
    ys = torch.arange(H, dtype=torch.float32, device=keypoints.device) + 0.5  # (H',) pixel centres
    xs = torch.arange(W, dtype=torch.float32, device=keypoints.device) + 0.5  # (W',)
    kx, ky = keypoints[..., 0:1].float(), keypoints[..., 1:2].float()  # (B, K, 1)
    gx = torch.exp(-((xs - kx) ** 2) / (2 * sigma**2))  # (B, K, W')
    gy = torch.exp(-((ys - ky) ** 2) / (2 * sigma**2))  # (B, K, H')
    heat = gy[..., :, None] * gx[..., None, :]  # (B, K, H', W')
    r = 3 * sigma
    inside = (kx[..., 0] > -r) & (kx[..., 0] < W + r) & (ky[..., 0] > -r) & (ky[..., 0] < H + r)  # (B, K)
    return heat, weights.float() * inside


def gaussian_kernel(size: int, sigma: float | None = None) -> torch.Tensor:
    """A normalised 1-D Gaussian of `size` taps; sigma None: OpenCV's for that size (0.3 (size/2 - 1) + 0.8)."""
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8 if sigma is None else sigma
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def dark_decode(heat: torch.Tensor, kernel: int = DARK_KERNEL, sigma: float | None = None,
                keep_max: bool = True, bounded: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Heatmaps (B, K, H', W') -> keypoints (B, K, 2) in heatmap pixels and scores (B, K) (the maxima).

    DARK (Zhang et al., 2020): blur each map (its maximum kept), take the log, and move from the arg-max by one
    Newton step on the log's second-order Taylor expansion; exact for a Gaussian peak away from the border.
    sigma / keep_max: the blur's (None: OpenCV's for the kernel, as mmpose) and whether it is rescaled to keep the
    maximum (transformers' VitPose post-processing: sigma 0.8, not rescaled). bounded: the step is at most one
    pixel and a flat or saddle neighbourhood keeps the arg-max; False: transformers' VitPose decode (mmpose's
    post_dark_udp step: its mixed difference, the Hessian regularised by float32's eps, nothing bounded; the blur's
    border mirrored as scipy's gaussian_filter does).
    """
    B, K, H, W = heat.shape
    heat = heat.float()
    scores, idx = heat.flatten(2).max(-1)  # (B, K)
    x0, y0 = idx % W, idx // W  # (B, K)
    g = gaussian_kernel(kernel, sigma).to(heat.device)
    m = heat.reshape(B * K, 1, H, W)
    if bounded:
        m = F.conv2d(F.conv2d(m, g.view(1, 1, 1, -1), padding=(0, kernel // 2)), g.view(1, 1, -1, 1),
                     padding=(kernel // 2, 0))  # (BK, 1, H', W'): zero-padded blur
    else:  # scipy's gaussian_filter (transformers): the border mirrored, edge pixel included
        r = kernel // 2
        m = torch.cat([m[..., :r].flip(-1), m, m[..., -r:].flip(-1)], -1)
        m = torch.cat([m[..., :r, :].flip(-2), m, m[..., -r:, :].flip(-2)], -2)
        m = F.conv2d(F.conv2d(m, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))  # (BK, 1, H', W')
    peak = m.flatten(1).amax(1).clamp(min=1e-12)  # (BK,)
    if keep_max:
        m = m * (scores.reshape(-1) / peak).view(-1, 1, 1, 1)
    logm = F.pad(m.clamp(1e-3, 50.0).log(), (1, 1, 1, 1), mode="replicate").view(B, K, H + 2, W + 2)

    def at(dx: int, dy: int) -> torch.Tensor:
        flat = (y0 + 1 + dy) * (W + 2) + (x0 + 1 + dx)  # (B, K)
        return logm.flatten(2).gather(2, flat[..., None])[..., 0]

    c = at(0, 0)
    gx, gy = (at(1, 0) - at(-1, 0)) / 2, (at(0, 1) - at(0, -1)) / 2
    hxx, hyy = at(1, 0) - 2 * c + at(-1, 0), at(0, 1) - 2 * c + at(0, -1)
    hxy = (at(1, 1) - at(1, -1) - at(-1, 1) + at(-1, -1)) / 4
    if not bounded:  # mmpose's post_dark_udp (and transformers'): its own mixed difference, an eps-regularised step
        hxy = (at(1, 1) - at(1, 0) - at(0, 1) + 2 * c - at(-1, 0) - at(0, -1) + at(-1, -1)) / 2
        eps = torch.finfo(torch.float32).eps
        det = (hxx + eps) * (hyy + eps) - hxy**2
        dx, dy = -((hyy + eps) * gx - hxy * gy) / det, -((hxx + eps) * gy - hxy * gx) / det
        return torch.stack([x0.float() + 0.5 + dx, y0.float() + 0.5 + dy], -1), scores
    det = hxx * hyy - hxy**2
    ok = det.abs() > 1e-6  # a flat or saddle neighbourhood: keep the arg-max
    safe = torch.where(ok, det, torch.ones_like(det))
    dx = torch.where(ok, -(hyy * gx - hxy * gy) / safe, torch.zeros_like(det)).clamp(-1, 1)
    dy = torch.where(ok, -(hxx * gy - hxy * gx) / safe, torch.zeros_like(det)).clamp(-1, 1)
    xy = torch.stack([x0.float() + 0.5 + dx, y0.float() + 0.5 + dy], -1)  # (B, K, 2) continuous pixels
    return xy, scores


def flip_index(names: list[str], pairs: list[tuple[int, int]] = ()) -> list[int]:
    """The keypoint each one becomes under a left-right flip: the given pairs, else `left_*` <-> `right_*` names
    (also 'left'/'right' anywhere in a name, and `l_`/`r_` prefixes); a keypoint without a partner maps to itself."""
    index = list(range(len(names)))
    if pairs:
        for a, b in pairs:
            index[a], index[b] = b, a
        return index
    lookup = {n: i for i, n in enumerate(names)}
    for i, n in enumerate(names):
        for a, b in (("left", "right"), ("right", "left"), ("Left", "Right"), ("Right", "Left")):
            if a in n and n.replace(a, b) in lookup:
                index[i] = lookup[n.replace(a, b)]
        for a, b in (("l_", "r_"), ("r_", "l_")):
            if n.startswith(a) and b + n[2:] in lookup:
                index[i] = lookup[b + n[2:]]
    return index


def flip_back(heat: torch.Tensor, index: list[int]) -> torch.Tensor:
    """Heatmaps (B, K, H', W') of flipped crops -> those of the crops: partners swapped, columns mirrored."""
    return heat[:, index].flip(-1)


# ---------------------------------------------------------------------------------------------------
# Heads (the dense-task interface: forward, loss, predict).


class PoseHead(DenseHead):
    """forward(feats (B, D, h, w)) -> heatmaps (B, K, 4h, 4w); loss(out, targets 'keypoints' (B, K, 2) crop pixels,
    'weights' (B, K)) = MSE weighted per keypoint; predict(out) -> (keypoints (B, K, 2) crop pixels, scores (B, K))."""

    def __init__(self, num_keypoints: int, patch_size: int, sigma: float = 2.0):
        super().__init__()
        self.num_keypoints, self.sigma = num_keypoints, float(sigma)
        self.stride = patch_size / HEATMAP_UPSAMPLE  # crop pixels per heatmap pixel

    def heatmaps(self, feats: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.heatmaps(feats)

    def loss(self, out: torch.Tensor, targets: dict) -> dict[str, torch.Tensor]:
        kp = torch.as_tensor(targets["keypoints"]).to(out.device) / self.stride
        heat, w = encode_heatmaps(kp, torch.as_tensor(targets["weights"]).to(out.device), tuple(out.shape[-2:]),
                                  self.sigma)
        # mmpose's KeypointMSELoss with target weights
        return {"loss_heatmap": ((out.float() - heat) ** 2 * w[..., None, None]).mean()}

    @torch.no_grad()
    def predict(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xy, scores = dark_decode(out)
        return xy * self.stride, scores


class SimpleHead(PoseHead):
    """ViTPose-simple: ReLU, bilinear x4, 3x3 conv to K (Hugging Face `VitPoseSimpleDecoder`)."""

    kind = "simple"

    def __init__(self, dim: int, num_keypoints: int, patch_size: int, sigma: float = 2.0):
        super().__init__(num_keypoints, patch_size, sigma)
        self.conv = nn.Conv2d(dim, num_keypoints, 3, padding=1)
        nn.init.normal_(self.conv.weight, std=0.001)
        nn.init.zeros_(self.conv.bias)

    def heatmaps(self, feats: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(F.relu(feats), scale_factor=HEATMAP_UPSAMPLE, mode="bilinear", align_corners=False)
        return self.conv(x)  # (B, K, 4h, 4w)


class ClassicHead(PoseHead):
    """ViTPose's classic decoder: two 4x4 stride-2 deconvolutions (+ BatchNorm + ReLU), then a 1x1 conv to K
    (Hugging Face `VitPoseClassicDecoder`; its width is 256)."""

    kind = "classic"

    def __init__(self, dim: int, num_keypoints: int, patch_size: int, sigma: float = 2.0, channels: int = 256):
        super().__init__(num_keypoints, patch_size, sigma)
        self.deconv1 = nn.ConvTranspose2d(dim, channels, 4, stride=2, padding=1, bias=False)
        self.batchnorm1 = nn.BatchNorm2d(channels)
        self.deconv2 = nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1, bias=False)
        self.batchnorm2 = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, num_keypoints, 1)
        for m in (self.deconv1, self.deconv2):
            nn.init.normal_(m.weight, std=0.001)  # mmpose's deconv init
        nn.init.normal_(self.conv.weight, std=0.001)
        nn.init.zeros_(self.conv.bias)

    def heatmaps(self, feats: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.batchnorm1(self.deconv1(feats)))  # (B, c, 2h, 2w)
        x = F.relu(self.batchnorm2(self.deconv2(x)))  # (B, c, 4h, 4w)
        return self.conv(x)  # (B, K, 4h, 4w)


HEADS = {"simple": SimpleHead, "classic": ClassicHead}


def build_head(kind: str, dim: int, num_keypoints: int, patch_size: int, sigma: float = 2.0,
               channels: int = 256) -> PoseHead:
    """The pose head named by --pose.head."""
    if kind not in HEADS:
        raise ValueError(f"unknown pose head {kind!r}; heads: {', '.join(HEADS)}")
    if kind == "classic":
        return ClassicHead(dim, num_keypoints, patch_size, sigma, channels)
    return SimpleHead(dim, num_keypoints, patch_size, sigma)


class PoseModel(DenseModel):
    """forward(crops (B, C, H, W)) -> heatmaps (B, K, H', W'): a ViT encoder read as ViTPose reads it, and a pose
    head. Frozen encoder unless `finetune`. `flip_index` (the keypoint each becomes under a flip) serves the flip
    test; `names`, `skeleton` and `sigmas` describe the keypoints."""

    def __init__(self, encoder: nn.Module, head: PoseHead, finetune: bool = False, patch_padding: int = 0,
                 names: list[str] | None = None, flip: list[int] | None = None,
                 skeleton: list[tuple[int, int]] | None = None, sigmas: list[float] | None = None,
                 codec: str = "continuous"):
        super().__init__(encoder, head, finetune, pool="dense")
        self.codec = codec  # 'continuous' (fastmae's training) or 'udp' (ViTPose's, a Hugging Face VitPose folder)
        K = head.num_keypoints
        self.patch_padding = patch_padding
        self.names = list(names) if names else [f"keypoint_{k}" for k in range(K)]
        self.flip = list(flip) if flip else flip_index(self.names)
        self.skeleton = [tuple(e) for e in (skeleton or [])]
        self.sigmas = list(sigmas) if sigmas else []

    def encode_features(self, imgs: torch.Tensor) -> torch.Tensor:
        return vitpose_map(self.encoder, imgs, self.patch_padding)

    @torch.no_grad()
    def flip_test(self, imgs: torch.Tensor) -> torch.Tensor:
        """Heatmaps averaged over the crops and their mirror images (flipped back): mmpose's flip test."""
        return (self(imgs) + flip_back(self(imgs.flip(-1)), self.flip)) / 2


def build_pose(kw: dict, finetune: bool = False, drop_path: float = 0.0) -> PoseModel:
    """The pose model that pose kwargs describe (a pose checkpoint's 'model_kwargs', or what
    weights.convert.vitpose reads from a Hugging Face VitPose config), freshly initialised."""
    enc = dict(kw["encoder"])
    encoder = VisionTransformer(**enc, num_classes=0, global_pool="token", drop_path_rate=drop_path)
    set_norm_eps(encoder, float(kw.get("norm_eps", LN_EPS)))
    head = build_head(kw["head"], encoder.embed_dim, int(kw["num_keypoints"]), int(enc["patch_size"]),
                      float(kw.get("sigma", 2.0)), int(kw.get("channels", 256)))
    return PoseModel(encoder, head, finetune, int(kw.get("patch_padding", 0)), kw.get("names"), kw.get("flip"),
                     kw.get("skeleton"), kw.get("sigmas"), str(kw.get("codec", "continuous")))


__all__ = ["ClassicHead", "HEADS", "PoseHead", "PoseModel", "SimpleHead", "build_head", "build_pose", "dark_decode",
           "encode_heatmaps", "flip_back", "flip_index", "gaussian_kernel", "set_norm_eps", "vitpose_map",
           "vitpose_padding"]
