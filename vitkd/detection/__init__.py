"""DETR detection distillation: a ViT-backbone DETR teacher distilled into a lighter DETR student.

``box_ops`` (box formats, GIoU), ``matcher`` (Hungarian matching), ``criterion`` (DETR set loss), ``detr``
(model family and presets), ``distill`` (distillation terms, pseudo ground truth), ``evaluate`` (COCO mAP),
``stages`` (LightningModules), ``demo`` (``python -m vitkd.detection.demo``).
"""
