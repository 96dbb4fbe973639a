"""Whether this host's int8 kernels saturate, so that tests asserting int8 quality figures
quantize as the product advises for the host and hold the same bounds on every CPU.

ONNX Runtime's x86 int8 kernels without VNNI multiply with VPMADDUBSW, whose 16-bit
intermediate sums saturate with 8-bit weights: the same model scores lower there than on a
VNNI x86 or an Arm board with the dot product. :mod:`sdk.isa` says when (``reduce_range``),
and 7-bit weights (``QuantizeConfig(reduce_range=True)``) are ONNX Runtime's advice for such
hosts. A test never asserts what depends on the CPU, so quality tests use this value.
"""

from __future__ import annotations

from sdk.isa import int8_outlook

__all__ = ["HOST_REDUCE_RANGE"]

#: True on a host whose int8 kernels saturate (x86 without VNNI): quantize with 7-bit weights.
HOST_REDUCE_RANGE: bool = int8_outlook("host").reduce_range
