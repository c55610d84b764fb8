"""m2ist: M²IST multi-modal interactive side-tuning of frozen Hugging Face towers for referring expression
comprehension (image + phrase → one box)."""

from .config import M2ISTConfig
from .evaluation import accuracy_at_iou, evaluate
from .hub import PretrainedNotFoundError
from .inference import draw_boxes, predict_boxes
from .model import RECModelOutput, SideTunedModel, get_side_tuned_model
from .processing import RECProcessor
from .taps import TAP_REGISTRY, Tap, TapSpec, register_taps
from .version import __version__

_LAZY = {  # heavy imports (transformers.Trainer) load on first use
    "RECTrainer": "trainer",
    "RECTrainingArguments": "trainer",
    "compute_rec_metrics": "trainer",
    "train_rec": "trainer",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "TAP_REGISTRY",
    "M2ISTConfig",
    "PretrainedNotFoundError",
    "RECModelOutput",
    "RECProcessor",
    "RECTrainer",
    "RECTrainingArguments",
    "SideTunedModel",
    "Tap",
    "TapSpec",
    "__version__",
    "accuracy_at_iou",
    "compute_rec_metrics",
    "draw_boxes",
    "evaluate",
    "get_side_tuned_model",
    "predict_boxes",
    "register_taps",
    "train_rec",
]
