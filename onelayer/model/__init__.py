from .layer import TrainableLayer
from .load import (DEMO_MODEL, Policy, full_parameter, load_policy, resolve_layer, resolve_layers,
                   resolve_model_path)
from .split import Context, LogitTransform, SplitModel

__all__ = ["Context", "DEMO_MODEL", "LogitTransform", "Policy", "SplitModel", "TrainableLayer", "full_parameter",
           "load_policy", "resolve_layer", "resolve_layers", "resolve_model_path"]
