"""DETR detection parts: a ViT-backbone DETR teacher distilled into a lighter DETR student.

``box_ops`` (box formats, GIoU), ``matcher`` (Hungarian matching), ``criterion`` (DETR set loss), ``detr``
(model family and presets), ``distill`` (distillation terms, pseudo ground truth), ``evaluate`` (COCO mAP).
The LightningModules are ``vitkd.stages.detection``; the demo is ``python -m vitkd.demos.detection``.
"""
