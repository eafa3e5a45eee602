"""Graph passes, one per file. Each documents the graph before and after it runs."""
from .calibrate import CaptureCalibration
from .fold_permutations import FoldPermutations
from .insert_permutations import InsertPermutations
from .sequential import SequentialTernarize
from .ternarize import TernarizeWeights

__all__ = ["CaptureCalibration", "FoldPermutations", "InsertPermutations", "SequentialTernarize",
           "TernarizeWeights"]
