from .layer import TrainableLayer
from .load import DEMO_MODEL, Policy, load_policy, resolve_layer, resolve_model_path
from .split import Context, LogitTransform, SplitModel

__all__ = ["Context", "DEMO_MODEL", "LogitTransform", "Policy", "SplitModel", "TrainableLayer", "load_policy",
           "resolve_layer", "resolve_model_path"]
