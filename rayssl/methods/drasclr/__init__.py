"""DrasCLR (Yu et al., MedIA 2024): the method (method.py) and its downstream feature API (features.py)."""

from __future__ import annotations

from rayssl.methods.drasclr.features import embed_image, embed_landmarks, embed_volume, embed_voxels
from rayssl.methods.drasclr.method import (
    CT_WINDOW,
    DRASCLR_INTENSITY,
    EXTRA_ATLAS_COORDS,
    EXTRA_NEIGHBORS,
    EXTRA_POSITIONS,
    METHOD,
    DrasCLR,
    DrasCLRConfig,
    DrasCLREncoder,
    DrasCLRModel,
    landmark_starts,
    neighbor_info_nce,
)

__all__ = [
    "CT_WINDOW", "DRASCLR_INTENSITY", "EXTRA_ATLAS_COORDS", "EXTRA_NEIGHBORS", "EXTRA_POSITIONS", "METHOD",
    "DrasCLR", "DrasCLRConfig", "DrasCLREncoder", "DrasCLRModel",
    "embed_image", "embed_landmarks", "embed_volume", "embed_voxels", "landmark_starts", "neighbor_info_nce",
]
