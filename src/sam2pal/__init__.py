"""sam2-pal: segment morphological structures on specimen collections with SAM2."""

__version__ = "0.1.0"
