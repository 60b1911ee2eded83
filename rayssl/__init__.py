"""rayssl: self-supervised pretraining of 3D medical image encoders on Ray, streaming from Zarr."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_pretrained"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `import rayssl` (and the CLI) stays free of torch, MONAI and Ray.
    if name == "load_pretrained":
        from rayssl.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'rayssl' has no attribute {name!r}")
