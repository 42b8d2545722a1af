"""Stage 1: segment C1..C7 in a CT volume (MONAI FlexibleUNet, 7 sigmoid outputs).

Public API::

    from ai.seg import SegModel
    m = SegModel.load("seg-demo")          # once per process
    out = m.predict(volume)                # SegOutput: label_map, visible, seconds
    m.identity                             # ModelIdentity
"""

from ai.seg.model import SegModel, SegOutput, build_network, default_arch_params
from ai.seg.preprocess import InputSpec

__all__ = ["InputSpec", "SegModel", "SegOutput", "build_network", "default_arch_params"]
