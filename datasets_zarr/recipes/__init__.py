"""Dataset recipes: find the scans of a locally unpacked public dataset and convert them with that dataset's defaults (nothing is downloaded)."""

from ._common import RecipeFiles
from .brain_mri import convert_brain_mri, find_nifti_brains, find_oasis
from .btcv import convert_btcv, find_btcv
from .luna16 import convert_luna16, find_luna16
from .msd import convert_msd, find_msd
from .tcia_covid import convert_tcia_covid, find_tcia_covid

# name -> convert function(root, out, **convert_kwargs); the CLI can offer these names.
RECIPES = {
    "btcv": convert_btcv,
    "msd": convert_msd,
    "luna16": convert_luna16,
    "tcia-covid19": convert_tcia_covid,
    "brain-mri": convert_brain_mri,
}

__all__ = [
    "RECIPES", "RecipeFiles", "convert_brain_mri", "convert_btcv", "convert_luna16",
    "convert_msd", "convert_tcia_covid", "find_btcv", "find_luna16", "find_msd",
    "find_nifti_brains", "find_oasis", "find_tcia_covid",
]
