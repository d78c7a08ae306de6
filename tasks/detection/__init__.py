"""Object detection on the MobileNet backbone (paper Table 13): SSD300 and Faster R-CNN on torchvision's
detectors, COCO evaluation equal to pycocotools."""

from mobilenets.tasks.detection.faster_rcnn import FasterRCNNDetection
from mobilenets.tasks.detection.ssd import SSDDetection
from mobilenets.tasks.detection.task import DetectionTask

__all__ = ["DetectionTask", "FasterRCNNDetection", "SSDDetection"]
