"""Parity with the official facebookresearch/mae implementation on the shared fixture."""

from __future__ import annotations

import torch

from fastmae.models.mae import MaskedAutoencoderViT
from fastmae.models.vit import VisionTransformer


def _model(cfg) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(
        img_size=cfg["img_size"], patch_size=cfg["patch_size"], in_chans=cfg["in_chans"],
        embed_dim=cfg["embed_dim"], depth=cfg["depth"], num_heads=cfg["num_heads"],
        decoder_embed_dim=cfg["decoder_embed_dim"], decoder_depth=cfg["decoder_depth"],
        decoder_num_heads=cfg["decoder_num_heads"], norm_pix_loss=cfg["norm_pix_loss"],
    )


def test_init_pos_embeds_equal_official(official):
    m = _model(official["config"])
    assert torch.equal(m.pos_embed.data, official["init_pos_embed"])
    assert torch.equal(m.decoder_pos_embed.data, official["init_decoder_pos_embed"])
    assert not m.pos_embed.requires_grad and not m.decoder_pos_embed.requires_grad


def test_forward_backward_match_official(official):
    m = _model(official["config"])
    m.load_state_dict(official["mae_state_dict"], strict=True)
    imgs, noise = official["imgs"], official["noise"]
    loss, pred, mask = m(imgs, official["config"]["mask_ratio"], noise=noise)
    torch.testing.assert_close(loss, official["loss"], atol=1e-5, rtol=0)
    torch.testing.assert_close(pred, official["pred"], atol=1e-5, rtol=0)
    assert torch.equal(mask, official["mask"])
    latent, mask2, ids_restore = m.forward_encoder(imgs, official["config"]["mask_ratio"], noise)
    torch.testing.assert_close(latent, official["latent"], atol=1e-5, rtol=0)
    assert torch.equal(ids_restore, official["ids_restore"])
    loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    assert set(grads) == set(official["grads"])
    for name, g in official["grads"].items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_seeded_mask_equals_official(official):
    m = _model(official["config"])
    m.load_state_dict(official["mae_state_dict"], strict=True)
    torch.manual_seed(official["rng_seed"])
    _, _, mask = m(official["imgs"], official["config"]["mask_ratio"])
    assert torch.equal(mask, official["mask"])


def test_classifiers_load_strictly_and_match_logits(official):
    cfg = official["config"]
    for key, pool in (("classifier_avg", "avg"), ("classifier_token", "token")):
        v = VisionTransformer(
            img_size=cfg["img_size"], patch_size=cfg["patch_size"], in_chans=cfg["in_chans"], num_classes=10,
            embed_dim=cfg["embed_dim"], depth=cfg["depth"], num_heads=cfg["num_heads"], global_pool=pool,
        ).eval()
        v.load_state_dict(official[key]["state_dict"], strict=True)
        with torch.no_grad():
            torch.testing.assert_close(v(official["imgs"]), official[key]["logits"], atol=1e-5, rtol=0)
