"""The MobileNet v1 backbone shared by every task (``mobilenets.backbone``)."""

from mobilenets.backbone.mobilenet import FeatureTap, MobileNetV1

__all__ = ["FeatureTap", "MobileNetV1"]
