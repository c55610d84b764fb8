"""m2ist: M²IST multi-modal interactive side-tuning of frozen Hugging Face towers for referring expression
comprehension (image + phrase → one box)."""

__version__ = "0.1.0"

from .config import M2ISTConfig
from .evaluation import accuracy_at_iou, evaluate
from .hub import PretrainedNotFoundError
from .inference import draw_boxes, predict_boxes
from .model import RECModelOutput, SideTunedModel, get_side_tuned_model
from .processing import RECProcessor
from .taps import TAP_REGISTRY, Tap, TapSpec, register_taps

__all__ = [
    "TAP_REGISTRY",
    "M2ISTConfig",
    "PretrainedNotFoundError",
    "RECModelOutput",
    "RECProcessor",
    "SideTunedModel",
    "Tap",
    "TapSpec",
    "__version__",
    "accuracy_at_iou",
    "draw_boxes",
    "evaluate",
    "get_side_tuned_model",
    "predict_boxes",
    "register_taps",
]
