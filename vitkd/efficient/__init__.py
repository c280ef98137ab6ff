"""Efficient-ViT toolbox: token reduction on trained timm ViTs and their measurement.

One concept per module: ``gtp`` (graph-based token propagation), ``tome`` (ToMe bipartite merging, the
baseline), ``idlevit`` (token idling and its token cut loss), ``measure`` (params, FLOPs, throughput),
``vit_parts`` (the pieces of a timm ViT forward the methods reuse). The channel-shuffle students are
``vitkd.models.shuffle_block``; IdleViT's fine-tuning stage is ``vitkd.stages.idlevit_finetune``.
"""
