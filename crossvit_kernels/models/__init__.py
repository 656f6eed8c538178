"""CrossViT models: the 11 published variants, the paper's fusion schemes, timm checkpoints."""
from .crossvit import CrossViT, MultiScaleBlock, scale_image
from .fusion import FUSIONS
from .registry import MODEL_CONFIGS, convert_checkpoint, create_model, list_models, load_checkpoint

__all__ = ["CrossViT", "MultiScaleBlock", "scale_image", "FUSIONS", "MODEL_CONFIGS", "create_model", "list_models",
           "load_checkpoint", "convert_checkpoint"]
