"""Real data formats and their generators (``mobilenets.datasets``)."""

import os

# albumentations asks PyPI for a newer version on every import unless this is set; the suite promises to run
# offline, and every import of albumentations (datasets/transforms.py) goes through this package first.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
