"""Whether int8 is likely to run faster than fp32 on a target, from its instruction set.

Int8 pays when the CPU multiplies int8 values faster than fp32 ones. What decides it:

- **Arm**: the dot-product extension (``asimddp``: SDOT/UDOT, 16 int8 multiply-accumulates per
  128-bit instruction against FMLA's 4 fp32 ones) or the int8 matrix multiply (``i8mm``:
  SMMLA). ONNX Runtime's int8 kernels use both. Without them (Cortex-A53/A57/A72: Pi 3,
  Zero 2 W, Jetson Nano, Pi 4) int8 products go through widening multiply-accumulates at about
  the fp32 rate: int8 saves size and memory bandwidth, but the quantize/dequantize steps can
  leave a small model no faster, or slower. Cortex-A76 (Pi 5) and A78AE (Jetson Orin) have
  the dot product.
- **x86**: VNNI (``avx512_vnni``, ``avx_vnni``: VPDPBUSD) or AMX. AVX2 without VNNI still gains
  a little with VPMADDUBSW, whose 16-bit intermediate sums can saturate: quantize with
  ``QuantizeConfig(reduce_range=True)`` there, as ONNX Runtime recommends.

Board targets carry their features in :attr:`sdk.targets.TargetProfile.isa`; the host's come
from ``/proc/cpuinfo`` under an injectable root (a fixture tree in tests). A target's outlook
also says when the host would mislead: latency measured on a VNNI x86 host shows an int8
speedup a Pi 4 will not see.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdk.targets import TargetProfile, get_target

__all__ = ["IsaNote", "cpu_flags", "int8_outlook", "int8_verdict", "saturation"]

_X86_VNNI = ("amx_int8", "avx512_vnni", "avx_vnni", "avx_vnni_int8")
_X86_DOT16 = ("avx512bw", "avx2")
_ARM_INT8 = ("i8mm", "asimddp")
_ARM_SIMD = ("asimd", "neon")


@dataclass(frozen=True)
class IsaNote:
    """The int8 outlook for one target.

    ``expect_int8_speedup``: ``True`` when the target has fast int8 arithmetic, ``False`` when
    int8 runs at about the fp32 rate, ``None`` when its instruction set is unknown.
    ``features``: the int8-relevant features found. ``reduce_range``: quantize with 7-bit
    weights (x86 without VNNI). ``host_note``: how this host's own int8 behaviour differs
    from the target's, when it does.
    """

    target: str
    expect_int8_speedup: bool | None
    reason: str
    features: tuple[str, ...] = ()
    reduce_range: bool = False
    host_note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "expect_int8_speedup": self.expect_int8_speedup,
            "reason": self.reason,
            "features": list(self.features),
            "reduce_range": self.reduce_range,
            "host_note": self.host_note,
        }


def cpu_flags(root: str | Path = "/") -> frozenset[str]:
    """The CPU features every core lists in ``<root>/proc/cpuinfo`` (``flags`` on x86,
    ``Features`` on Arm); empty when the file is missing or lists none."""
    try:
        text = (Path(root) / "proc" / "cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    per_core: list[frozenset[str]] = []
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            per_core.append(frozenset(value.split()))
    if not per_core:
        return frozenset()
    # big.LITTLE boards can list different features per core: keep what all of them have.
    return frozenset.intersection(*per_core)


def int8_verdict(flags: Iterable[str]) -> tuple[bool | None, str, tuple[str, ...], bool]:
    """``(expect_int8_speedup, reason, relevant features, reduce_range)`` for a feature set."""
    have = set(flags)
    vnni = [f for f in _X86_VNNI if f in have]
    if vnni:
        return (
            True,
            f"x86 with {vnni[0]}: VPDPBUSD multiplies and accumulates int8 in one instruction; "
            "ONNX Runtime's int8 kernels use it",
            tuple(vnni),
            False,
        )
    arm = [f for f in _ARM_INT8 if f in have]
    if arm:
        what = (
            "int8 matrix multiply (SMMLA: 32 multiply-accumulates per instruction, 8x fp32 FMLA)"
            if arm[0] == "i8mm"
            else "dot product (SDOT/UDOT: 16 multiply-accumulates per instruction, 4x fp32 FMLA)"
        )
        return (
            True,
            f"Arm with {arm[0]}: {what}; ONNX Runtime's int8 kernels use it",
            tuple(arm),
            False,
        )
    dot16 = [f for f in _X86_DOT16 if f in have]
    if dot16:
        return (
            True,
            f"x86 with {dot16[0]} but no VNNI: int8 gains a little (VPMADDUBSW), and its 16-bit "
            "intermediate sums can saturate, so quantize with reduce_range=True",
            tuple(dot16),
            True,
        )
    simd = [f for f in _ARM_SIMD if f in have]
    if simd:
        return (
            False,
            "Arm NEON without the dot product (asimddp): int8 products need widening "
            "multiply-accumulates at about the fp32 rate, so int8 mostly saves size and memory "
            "bandwidth and its quantize/dequantize steps can make a small model slower; "
            "benchmark both precisions",
            tuple(simd),
            False,
        )
    if not have:
        return None, "no CPU feature information", (), False
    return None, "none of the instruction sets that make int8 fast or slow were found", (), False


def int8_outlook(
    target: str | TargetProfile,
    host_flags: Iterable[str] | None = None,
    *,
    root: str | Path = "/",
) -> IsaNote:
    """Whether int8 is likely to be faster than fp32 on ``target`` (a profile or its name).

    A board's features come from its profile; ``"host"``'s from ``host_flags`` or, when
    ``None``, from ``<root>/proc/cpuinfo``. For a board, the host's features (same source)
    only add ``host_note`` when the host would show a different int8 behaviour.
    """
    profile = target if isinstance(target, TargetProfile) else get_target(target)
    host = frozenset(host_flags) if host_flags is not None else cpu_flags(root)
    if profile.name == "host":
        speedup, reason, features, reduce = int8_verdict(host)
        return IsaNote("host", speedup, reason, features, reduce)
    if not profile.isa:
        return IsaNote(
            profile.name,
            None,
            f"no instruction-set data for target {profile.name!r} (TargetProfile.isa is empty)",
        )
    speedup, reason, features, reduce = int8_verdict(profile.isa)
    host_speedup, _, host_features, _ = int8_verdict(host)
    host_note = None
    if host and host_speedup != speedup:
        found = ", ".join(host_features) or "no int8-relevant features"
        host_note = (
            f"this host has {found}: int8 latency measured here "
            f"{'shows a speedup' if host_speedup else 'shows no speedup'} that {profile.name} "
            f"({profile.cpu}) {'will not see' if host_speedup else 'may well see'}; "
            "benchmark on the board (edgeship bench --device) before trusting int8 timings"
        )
    return IsaNote(profile.name, speedup, reason, features, reduce, host_note)


def saturation(
    target: str | TargetProfile,
    host_flags: Iterable[str] | None = None,
    *,
    root: str | Path = "/",
) -> str | None:
    """Why ONNX Runtime int8 made for ``target`` here should take 7-bit weights, or None.

    Two machines run the model: ``target``, which ships it, and this host, where a search
    measures its quality. Where either one's int8 kernels saturate with 8-bit weights (x86
    without VNNI, see :func:`int8_verdict`), 8-bit weights make the model worse there (on the
    target) or make it look worse than the board will run it (here); 7-bit weights saturate
    on neither, at a little precision. ``host_flags`` and ``root`` as in :func:`int8_outlook`."""
    profile = target if isinstance(target, TargetProfile) else get_target(target)
    host = frozenset(host_flags) if host_flags is not None else cpu_flags(root)
    if profile.name != "host":
        _, _, features, saturates = int8_verdict(profile.isa)
        if saturates:
            return (
                f"{profile.name}'s int8 kernels saturate with 8-bit weights "
                f"({features[0]}, no VNNI)"
            )
    _, _, features, saturates = int8_verdict(host)
    if not saturates:
        return None
    if profile.name == "host":
        return f"this host's int8 kernels saturate with 8-bit weights ({features[0]}, no VNNI)"
    return (
        f"this host's int8 kernels saturate with 8-bit weights ({features[0]}, no VNNI): "
        f"8-bit weights would score lower here, where quality is measured, than on {profile.name}"
    )
