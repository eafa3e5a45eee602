"""Graph passes, one per file. Each documents the graph before and after it runs."""
from .calibrate import CaptureCalibration
from .sequential import SequentialTernarize
from .ternarize import TernarizeWeights

__all__ = ["CaptureCalibration", "SequentialTernarize", "TernarizeWeights"]
