"""Volumes in, results out: loading, models, training and evaluation of cspine-node.

This package never imports ``dicom_node`` or ``storage``.
"""

# Pillow's imaging core is loaded before anything imports pydicom: ``import pydicom``
# imports python-gdcm, which loads itself with RTLD_GLOBAL, and its bundled zlib would
# then take over Pillow's PNG compression (heap corruption on the first PNG written).
import PIL.Image  # noqa: F401  (import order, see above)
