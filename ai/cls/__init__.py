"""Stage 2: per-vertebra crops, the ConvNeXt + BiLSTM classifier, training and evaluation."""

from ai.cls.crops import CropBatch, CropConfig, VertebraCrop, extract_crops
from ai.cls.model import ClsModel

__all__ = ["ClsModel", "CropBatch", "CropConfig", "VertebraCrop", "extract_crops"]
