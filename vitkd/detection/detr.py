"""DETR model family: a timm ViT backbone feeding a transformer encoder-decoder with learned object queries.

    image → ViT (timm ``VisionTransformer``, class token kept for the attention probe) → patch tokens
          → linear projection to ``d_model`` + learned position embedding → ``nn.TransformerEncoder``
          → ``num_queries`` learned queries attend to it through ``nn.TransformerDecoderLayer``s
          → shared LayerNorm + heads on every decoder layer: class logits (K+1, last = no object) and
            boxes (normalised ``cxcywh``, sigmoid).

Outputs: ``pred_logits`` (B, Q, K+1), ``pred_boxes`` (B, Q, 4) of the last decoder layer, and in training
``aux_outputs`` (the same for each earlier layer, for the auxiliary losses).

Differences from DETR (choices for tiny CPU runs): the backbone is a ViT trained from scratch (no pretrained
weights offline); the decoder input is the learned query itself (DETR: zeros + query position added in every
layer) because ``nn.TransformerDecoderLayer`` takes no positional argument; the box head's last bias starts
at a box-size prior (centre 0.5, size ``box_prior``) so the first matchings are not between degenerate boxes;
each query has a learned reference point (``reference_points``, started on a grid) its box centre is
predicted relative to (Anchor DETR / Deformable DETR): DETR's slow convergence on small data sets
(detr#9, #125) is mostly queries that all start at the same place.

Presets (``DETR_PRESETS``): ``detr_aerial_teacher``, ``detr_aerial_student`` (fewer layers, half width, fewer
queries) and ``detr_test`` (the smallest, for tests). ``create_detr(name, **overrides)`` builds one.
"""

from __future__ import annotations

import math
from typing import Any

import timm
import torch
import torch.nn as nn

from vitkd.detection.box_ops import normalized_to_pixel_xyxy
from vitkd.errors import VitkdInputError

DETR_PRESETS: dict[str, dict[str, Any]] = {
    # backbone: ViT patch / width / depth / heads; transformer: width, encoder and decoder layers, heads, FFN; queries
    "detr_aerial_teacher": dict(
        patch_size=8,
        embed_dim=128,
        depth=4,
        num_heads=4,
        d_model=128,
        enc_layers=1,
        dec_layers=3,
        nhead=4,
        dim_feedforward=256,
        num_queries=16,
    ),
    "detr_aerial_student": dict(
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=2,
        d_model=64,
        enc_layers=1,
        dec_layers=2,
        nhead=2,
        dim_feedforward=128,
        num_queries=12,
    ),
    "detr_test": dict(
        patch_size=8,
        embed_dim=32,
        depth=1,
        num_heads=2,
        d_model=32,
        enc_layers=1,
        dec_layers=2,
        nhead=2,
        dim_feedforward=32,
        num_queries=5,
    ),
}


class MLP(nn.Module):
    """Box head: ``num_layers`` linear layers with ReLU between them (DETR's ``MLP``)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else torch.relu(layer(x))
        return x


def grid_logits(n: int) -> torch.Tensor:
    """(n, 2) inverse-sigmoid centres of the first n cells of a near-square grid over the image."""
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    ys, xs = torch.meshgrid((torch.arange(rows) + 0.5) / rows, (torch.arange(cols) + 0.5) / cols, indexing="ij")
    pts = torch.stack([xs.flatten(), ys.flatten()], 1)[:n]
    return torch.log(pts / (1 - pts))


class DETR(nn.Module):
    """ViT-backbone DETR. The backbone is ``self.vit`` (a timm ViT: the attention-probe callback finds it)."""

    def __init__(
        self,
        num_classes: int,
        img_size: int = 64,
        in_chans: int = 3,
        patch_size: int = 8,
        embed_dim: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        d_model: int = 128,
        enc_layers: int = 1,
        dec_layers: int = 3,
        nhead: int = 4,
        dim_feedforward: int = 256,
        num_queries: int = 12,
        dropout: float = 0.0,
        box_prior: float = 0.15,
        reference_points: bool = True,
        attn_sigma: float | None = 0.2,
    ):
        super().__init__()
        if img_size % patch_size:
            raise VitkdInputError(
                f"img_size {img_size} is not a multiple of the patch size {patch_size}: "
                "resize the images or pick another preset"
            )
        self.num_classes, self.num_queries = num_classes, num_queries
        self.vit = timm.models.vision_transformer.VisionTransformer(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=2.0,
        )
        num_patches = self.vit.patch_embed.num_patches
        self.input_proj = nn.Linear(embed_dim, d_model)
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches, d_model) * 0.02)
        layer = dict(
            d_model=d_model,
            nhead=nhead,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(**layer), enc_layers, enable_nested_tensor=False
        )
        self.decoder_layers = nn.ModuleList(nn.TransformerDecoderLayer(**layer) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.query_embed = nn.Embedding(num_queries, d_model)
        self.class_embed = nn.Linear(d_model, num_classes + 1)
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        with torch.no_grad():  # box-size prior: sigmoid(bias) = (0.5, 0.5, box_prior, box_prior)
            self.bbox_embed.layers[-1].weight.mul_(0.1)
            prior = torch.tensor([0.5, 0.5, box_prior, box_prior])
            self.bbox_embed.layers[-1].bias.copy_(torch.log(prior / (1 - prior)))
        # learned reference points (as in Anchor/Deformable DETR), started on a grid: each query predicts its
        # box centre as an offset from its own point, so queries specialise by place from the first step
        self.reference = nn.Parameter(grid_logits(num_queries)) if reference_points else None
        # spatial prior of the cross-attention (SMCA DETR, Gao et al. 2021): a Gaussian of width attn_sigma
        # (image fraction) around each query's reference point, added to its attention logits
        self.attn_sigma = attn_sigma if reference_points else None
        gh, gw = self.vit.patch_embed.grid_size
        ys, xs = torch.meshgrid((torch.arange(gh) + 0.5) / gh, (torch.arange(gw) + 0.5) / gw, indexing="ij")
        self.register_buffer("token_xy", torch.stack([xs.flatten(), ys.flatten()], 1), persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder memory (B, N, d_model) from the ViT's patch tokens."""
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens :]
        return self.encoder(self.input_proj(tokens) + self.pos_embed)

    def heads(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.decoder_norm(h)
        box = self.bbox_embed(h)
        if self.reference is not None:
            box = torch.cat([box[..., :2] + self.reference, box[..., 2:]], dim=-1)
        return {"pred_logits": self.class_embed(h), "pred_boxes": box.sigmoid()}

    def attention_bias(self) -> torch.Tensor | None:
        """(Q, N) additive cross-attention bias −‖r_q − p_n‖² / (2σ²) (SMCA's Gaussian prior), or None."""
        if self.attn_sigma is None:
            return None
        d2 = (self.reference.sigmoid()[:, None, :] - self.token_xy[None]).pow(2).sum(-1)
        return -d2 / (2 * self.attn_sigma**2)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        memory = self.features(x)
        bias = self.attention_bias()
        h = self.query_embed.weight.unsqueeze(0).repeat(
            x.shape[0], 1, 1
        )  # a copy, not a view: the FLOP counter's module tracker fails on views of parameters in inference mode
        outs = []
        for i, layer in enumerate(self.decoder_layers):
            h = layer(h, memory, memory_mask=bias)
            if self.training or i == len(self.decoder_layers) - 1:
                outs.append(self.heads(h))
        out = dict(outs[-1])
        if self.training:
            out["aux_outputs"] = outs[:-1]
        return out


def create_detr(name: str, num_classes: int, img_size: int = 64, in_chans: int = 3, **overrides: Any) -> DETR:
    """A preset of ``DETR_PRESETS`` with optional overrides (e.g. ``num_queries=8``)."""
    if name not in DETR_PRESETS:
        raise VitkdInputError(f"unknown DETR arch {name!r}: use one of {sorted(DETR_PRESETS)}")
    cfg = {**DETR_PRESETS[name], **overrides}
    try:
        return DETR(num_classes=num_classes, img_size=img_size, in_chans=in_chans, **cfg)
    except TypeError as err:
        raise VitkdInputError(f"bad DETR model_kwargs for {name!r} ({err}): use keys of DETR's constructor") from err


def postprocess(outputs: dict, img_size: int) -> list[dict[str, torch.Tensor]]:
    """Per image: ``boxes`` (xyxy pixels), ``scores`` and ``labels`` of every query (DETR's ``PostProcess``:
    score = the best non-empty class probability)."""
    prob = outputs["pred_logits"].float().softmax(-1)[..., :-1]
    scores, labels = prob.max(-1)
    boxes = normalized_to_pixel_xyxy(outputs["pred_boxes"].float(), img_size, img_size)
    return [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(boxes, scores, labels)]
