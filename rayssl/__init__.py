"""rayssl: self-supervised pretraining of 3D medical image encoders on Ray, streaming from Zarr."""

__version__ = "0.1.0"
