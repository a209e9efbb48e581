"""Input gradients of ONNX classifiers, built as ONNX graphs and run on onnxruntime.

`GradientProgram` is what trigger reverse and data-free synthesis call; `build_vjp` is the
lower-level transform (cotangent inputs for chosen tensors, gradient output for one input);
`check_gradients` / `check_vjp` compare against central finite differences.
"""

from .backward import build_vjp
from .check import check_gradients, check_vjp, reference_gradient, to_double
from .context import RULES
from .program import GradientProgram, GradResult

__all__ = ["RULES", "GradResult", "GradientProgram", "build_vjp", "check_gradients",
           "check_vjp", "reference_gradient", "to_double"]
