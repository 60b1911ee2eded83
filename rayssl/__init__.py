"""rayssl: self-supervised pretraining of 3D medical image encoders on Ray, streaming from Zarr."""

from rayssl.lazy import lazy_exports

__version__ = "0.1.0"
# Imported on first use: `import rayssl` (and the CLI) stays free of torch, MONAI and Ray.
_EXPORTS = {"load_pretrained": "rayssl.pretrained"}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
