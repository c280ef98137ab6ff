"""DETR model family: a timm ViT backbone feeding a transformer encoder-decoder with anchor queries.

    image → ViT (timm ``VisionTransformer``, class token kept for the attention probe) → patch tokens
          → linear projection to ``d_model`` + learned position embedding → ``nn.TransformerEncoder``
          → queries (an anchor box and a label each) attend to it through ``nn.TransformerDecoderLayer``s
          → shared LayerNorm + heads on every decoder layer: class logits (K+1, last = no object) and
            boxes (normalised ``cxcywh``: sigmoid of an offset from the query's anchor).

Outputs: ``pred_logits`` (B, Q, K+1), ``pred_boxes`` (B, Q, 4) of the last decoder layer, and in training
``aux_outputs`` (the same for each earlier layer, for the auxiliary losses); ``dn_outputs`` for denoising
queries (``denoising.py``) and ``query_outputs`` for given boxes (shared distillation queries, ``distill.py``).

Differences from DETR (choices for tiny CPU runs): the backbone is a ViT trained from scratch (no pretrained
weights offline); the query position enters at the decoder input only (DETR adds it in every layer) because
``nn.TransformerDecoderLayer`` takes no positional argument; queries are anchor boxes (Anchor DETR, DAB-DETR:
Liu et al., "DAB-DETR: Dynamic Anchor Boxes are Better Queries for DETR", arXiv 2201.12329) with a Gaussian
cross-attention prior around each anchor (SMCA DETR, Gao et al. 2021).

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
from vitkd.detection.denoising import DenoisingQueries
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


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


def grid_anchors(n: int, size: float) -> torch.Tensor:
    """(n, 4) cxcywh anchors: centres on the first n cells of a near-square grid, width and height ``size``."""
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    ys, xs = torch.meshgrid((torch.arange(rows) + 0.5) / rows, (torch.arange(cols) + 0.5) / cols, indexing="ij")
    centres = torch.stack([xs.flatten(), ys.flatten()], 1)[:n]
    return torch.cat([centres, torch.full((n, 2), size)], 1)


def sine_embedding(boxes: torch.Tensor, dim: int, max_frequency: float = 32.0) -> torch.Tensor:
    """(..., 4) boxes in [0, 1] → (..., dim): sin and cos of 2π·f·x for each coordinate x and dim/8 frequencies
    f spaced geometrically from 1 to ``max_frequency`` periods per image (DAB-DETR codes positions the same way,
    with frequencies that fall from one period per image; on a small image the rising ones tell nearby anchors
    apart)."""
    per = dim // 8
    freq = max_frequency ** (torch.arange(per, device=boxes.device, dtype=torch.float32) / max(per - 1, 1))
    x = boxes[..., None].float() * (2 * math.pi) * freq  # (..., 4, per)
    return torch.cat([x.sin(), x.cos()], -1).flatten(-2)


class DETR(nn.Module):
    """ViT-backbone DETR with anchor queries. The backbone is ``self.vit`` (a timm ViT: the attention-probe
    callback finds it).

    Every decoder query is an anchor box a ∈ [0, 1]⁴ (cxcywh) plus a content vector: its decoder input is
    content + MLP(sine(a)) (DAB-DETR's anchor query), its box is sigmoid(Δ + logit(a)), and its cross-attention
    carries a Gaussian prior of width ``attn_sigma`` around a's centre (SMCA DETR). The own queries are
    ``num_queries`` learned anchors started on a grid, each with learned content (``query_embed``): DETR's slow
    convergence on small sets (detr#9, #125) is mostly queries that all start at the same place. Given boxes
    (denoising queries, shared distillation queries) take the embedding of a label as content
    (``label_embed``; index K = no label), so any box is a query a teacher and a student can both answer:
    ``forward(x, queries=...)`` runs such boxes as a group of their own (KD-DETR's shared distillation
    points, ``distill.py``), and denoising training (``denoising.py``) teaches the model to answer them.
    """

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
        attn_sigma: float | None = 0.2,
    ):
        super().__init__()
        if img_size % patch_size:
            raise VitkdInputError(
                f"img_size {img_size} is not a multiple of the patch size {patch_size}: "
                "resize the images or pick another preset"
            )
        self.num_classes, self.num_queries, self.nhead = num_classes, num_queries, nhead
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
        self.anchors = nn.Parameter(inverse_sigmoid(grid_anchors(num_queries, box_prior)))  # logits of the own queries
        self.query_embed = nn.Embedding(num_queries, d_model)  # the own queries' content
        self.label_embed = nn.Embedding(num_classes + 1, d_model)  # content of given boxes; index K: no label
        self.query_pos = MLP(d_model, d_model, d_model, 2)
        self.class_embed = nn.Linear(d_model, num_classes + 1)
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        with torch.no_grad():  # the first boxes are the anchors themselves
            self.bbox_embed.layers[-1].weight.mul_(0.1)
            self.bbox_embed.layers[-1].bias.zero_()
        self.attn_sigma = attn_sigma
        gh, gw = self.vit.patch_embed.grid_size
        ys, xs = torch.meshgrid((torch.arange(gh) + 0.5) / gh, (torch.arange(gw) + 0.5) / gw, indexing="ij")
        self.register_buffer("token_xy", torch.stack([xs.flatten(), ys.flatten()], 1), persistent=False)

    def anchor_boxes(self) -> torch.Tensor:
        """(Q, 4) the own queries' anchors, cxcywh in [0, 1]."""
        return self.anchors.sigmoid()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder memory (B, N, d_model) from the ViT's patch tokens."""
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens :]
        return self.encoder(self.input_proj(tokens) + self.pos_embed)

    def attention_bias(self, boxes: torch.Tensor) -> torch.Tensor | None:
        """(B·nhead, Q, N) additive cross-attention bias −‖c_q − p_n‖² / (2σ²) (SMCA's Gaussian prior around each
        query's anchor centre c_q), or None."""
        if self.attn_sigma is None:
            return None
        d2 = (boxes[:, :, None, :2] - self.token_xy[None, None]).pow(2).sum(-1)
        return (-d2 / (2 * self.attn_sigma**2)).repeat_interleave(self.nhead, dim=0)

    def box_content(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, G, d_model) content of given boxes: the embedding of their label (K: no label)."""
        return self.label_embed(labels)

    def decode(
        self,
        memory: torch.Tensor,
        boxes: torch.Tensor,
        content: torch.Tensor,
        self_mask: torch.Tensor | None = None,
        all_layers: bool = False,
    ) -> list[dict[str, torch.Tensor]]:
        """Heads' outputs, on every decoder layer or on the last, of queries with anchors ``boxes`` (B, Q, 4)
        and ``content`` (B, Q, d_model): the decoder input is content + MLP(sine(anchor))."""
        h = content + self.query_pos(sine_embedding(boxes, self.query_pos.layers[0].in_features))
        bias, ref = self.attention_bias(boxes), inverse_sigmoid(boxes)
        outs = []
        for i, layer in enumerate(self.decoder_layers):
            h = layer(h, memory, tgt_mask=self_mask, memory_mask=bias)
            if all_layers or i == len(self.decoder_layers) - 1:
                g = self.decoder_norm(h)
                outs.append({"pred_logits": self.class_embed(g), "pred_boxes": (self.bbox_embed(g) + ref).sigmoid()})
        return outs

    def answer(self, memory: torch.Tensor, boxes: torch.Tensor) -> dict[str, torch.Tensor]:
        """The last layer's answer to given boxes (B, G, 4), with no label, as a group of their own."""
        labels = torch.full(boxes.shape[:2], self.num_classes, dtype=torch.int64, device=boxes.device)
        return self.decode(memory, boxes, self.box_content(labels))[-1]

    def forward(self, x: torch.Tensor, dn: DenoisingQueries | None = None, queries: torch.Tensor | None = None):
        """``pred_logits`` (B, Q, K+1) and ``pred_boxes`` (B, Q, 4) of the own queries' last layer; in training
        ``aux_outputs`` (each earlier layer). With ``dn``: ``dn_outputs`` (every layer) of the denoising queries,
        run beside the own ones under their attention mask. With ``queries`` (B, G, 4): ``query_outputs``, the
        last layer's answer to those boxes (``answer``), run as a group of their own on the same memory."""
        memory = self.features(x)
        out = self.own_outputs(memory, dn)
        if queries is not None:
            out["query_outputs"] = self.answer(memory, queries)
        return out

    def own_outputs(self, memory: torch.Tensor, dn: DenoisingQueries | None = None) -> dict[str, Any]:
        """The own queries' outputs on ``memory`` (with the denoising queries beside them when given)."""
        b = memory.shape[0]
        boxes = self.anchor_boxes().unsqueeze(0).expand(b, -1, -1)
        content = self.query_embed.weight.unsqueeze(0).expand(b, -1, -1)
        mask, d = None, 0
        if dn is not None:
            boxes, content = torch.cat([dn.boxes, boxes], 1), torch.cat([self.box_content(dn.labels), content], 1)
            mask, d = dn.attention_mask(self.num_queries), dn.size
        layers = self.decode(memory, boxes, content, mask, all_layers=self.training)
        out: dict[str, Any] = {k: v[:, d:] for k, v in layers[-1].items()}
        if self.training:
            out["aux_outputs"] = [{k: v[:, d:] for k, v in o.items()} for o in layers[:-1]]
        if dn is not None:
            out["dn_outputs"] = [{k: v[:, :d] for k, v in o.items()} for o in layers]
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
