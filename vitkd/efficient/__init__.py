"""Efficient-ViT toolbox (issue 6): token reduction on trained timm ViTs, channel-shuffle students, measurement.

One concept per module: ``gtp`` (graph-based token propagation), ``tome`` (ToMe bipartite merging, the
baseline), ``idlevit`` (token idling and its token cut loss), ``finetune`` (IdleViT self-distillation stage),
``shuffle_block`` (channel-shuffle block and student presets), ``measure`` (params, FLOPs, throughput),
``vit_parts`` (the pieces of a timm ViT forward the methods reuse). Import the module you need; this package
imports nothing so that ``vitkd.stages`` can register the shuffle presets without an import cycle.
"""
