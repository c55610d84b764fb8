"""Tensor operations shared by the model, the losses, the processor and the evaluator."""

from .boxes import box_convert, box_iou, clip_boxes, generalized_box_iou, paired_box_iou
from .positions import sincos_grid_table

__all__ = ["box_convert", "box_iou", "clip_boxes", "generalized_box_iou", "paired_box_iou", "sincos_grid_table"]
