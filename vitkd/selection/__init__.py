"""Wild-data selection (Wang et al., "Attention Probe: Vision Transformer Distillation in the Wild", arXiv
2102.05958, §2.2), one concept per module; ``vitkd.stages.AttentionProbeSelector`` wires them:

* ``scoring`` — the value functions (Eqs. 4–6) and vitkd's own terms; ``scorer`` — a batch's scores by the
  teacher;
* ``parts`` — resumable per-shard saved scores and what they depend on; ``args`` — the selector's argument checks;
* ``ranking`` — the value each strategy ranks by; ``topk`` — the running top-k merge over the parts;
* ``outputs`` — ``scores.csv`` and its tallies, the kept samples for ``selected/``, ``metrics.json``'s figures;
* ``metrics`` — precision and AUROC against the pool's source tags;
* ``examples`` and ``result`` — what the selector hands the callbacks' ``on_selection_end`` (the selection report).
"""
