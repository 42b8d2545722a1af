"""The network-facing node: SCP handlers, completion, scheduler, writers, sender and CLI."""

# Pillow's imaging core is loaded before anything imports pydicom: ``import pydicom``
# imports python-gdcm, which loads itself with RTLD_GLOBAL, and its bundled zlib would
# then take over Pillow's PNG compression (heap corruption on the first PNG written).
import PIL.Image  # noqa: F401  (import order, see above)
