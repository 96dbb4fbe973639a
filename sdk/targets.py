"""Target profiles: the boards edgeship benchmarks for.

A profile fixes the thread count and CPU affinity a benchmark runs with (the board's core
count, capped at this host's) and the memory the board has. Latency is always measured on
the machine that runs the benchmark: reports label it as a host measurement. A profile may
carry ``latency_scale``, a user-supplied factor from host to board latency; scaled figures are
reported separately and marked as estimates, never as measurements.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

from sdk.errors import ConfigError

__all__ = ["PROFILES", "RUNTIMES", "TargetProfile", "get_target", "host_profile"]

#: The runtimes a bundle can name, as its manifest names them.
RUNTIMES = ("onnxruntime", "litert")


@dataclass(frozen=True)
class TargetProfile:
    """A board: cores, memory and CPU, and how a benchmark emulates it on the host."""

    name: str
    description: str
    cores: int
    memory_mb: int
    arch: str
    cpu: str
    latency_scale: float | None = None  # host -> board latency factor; an estimate if set
    # CPU features that matter for inference, named as Linux's /proc/cpuinfo names them
    # (asimd = NEON, asimddp = dot product, i8mm); see sdk.isa. Empty: unknown.
    isa: tuple[str, ...] = ()
    # The runtimes installed on the board (of RUNTIMES); empty: not known, so either.
    runtimes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [r for r in self.runtimes if r not in RUNTIMES]
        if isinstance(self.runtimes, str) or unknown:
            raise ConfigError(
                f"target {self.name}: runtimes takes a tuple of {', '.join(RUNTIMES)}; "
                f"got {self.runtimes!r}"
            )

    def usable_runtimes(self) -> tuple[str, ...]:
        """The runtimes a bundle for this board may name: ``runtimes``, or all when unknown."""
        return self.runtimes or RUNTIMES

    def threads_on_host(self) -> int:
        """Threads to benchmark with here: the board's cores, capped at this host's."""
        return max(1, min(self.cores, _host_cores()))

    def affinity_on_host(self) -> list[int]:
        """The first ``threads_on_host()`` CPUs this process may run on."""
        allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        return allowed[: self.threads_on_host()]


def _host_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def host_profile() -> TargetProfile:
    mem_mb = 0
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    mem_mb = int(line.split()[1]) // 1024
    except OSError:
        pass
    return TargetProfile(
        name="host",
        description="this machine, as it is",
        cores=_host_cores(),
        memory_mb=mem_mb,
        arch=platform.machine(),
        cpu=platform.processor() or platform.machine(),
        runtimes=installed_runtimes(),
    )


def installed_runtimes() -> tuple[str, ...]:
    """The runtimes this Python can import (found, not imported: this stays cheap)."""
    from importlib.util import find_spec

    have = []
    if find_spec("onnxruntime") is not None:
        have.append("onnxruntime")
    if find_spec("ai_edge_litert") is not None or find_spec("tflite_runtime") is not None:
        have.append("litert")
    return tuple(have)


# ISA features per core generation (Linux /proc/cpuinfo names). Cortex-A53/A57/A72 are
# Armv8.0-A: NEON (asimd) but no int8 dot product. Cortex-A76 and A78AE are Armv8.2-A with the
# dot product (asimddp) and fp16 arithmetic; neither has i8mm (Armv8.6-A).
_ARMV8_0 = ("fp", "asimd", "crc32")
_ARMV8_2_DOTPROD = (
    "fp", "asimd", "crc32", "aes", "pmull", "sha1", "sha2", "atomics", "fphp", "asimdhp",
    "asimdrdm", "lrcpc", "dcpop", "asimddp",
)  # fmt: skip

# Board facts from the vendors' specifications (cores, RAM of the common variant, CPU core).
PROFILES: dict[str, TargetProfile] = {
    p.name: p
    for p in (
        TargetProfile(
            "rpi3",
            "Raspberry Pi 3 Model B+",
            4,
            1024,
            "aarch64",
            "Cortex-A53 1.4 GHz",
            isa=_ARMV8_0,
        ),
        TargetProfile(
            "rpi4",
            "Raspberry Pi 4 Model B (4 GB)",
            4,
            4096,
            "aarch64",
            "Cortex-A72 1.8 GHz",
            isa=_ARMV8_0,
        ),
        TargetProfile(
            "rpi5",
            "Raspberry Pi 5 (8 GB)",
            4,
            8192,
            "aarch64",
            "Cortex-A76 2.4 GHz",
            isa=_ARMV8_2_DOTPROD,
        ),
        TargetProfile(
            "rpi-zero2w",
            "Raspberry Pi Zero 2 W",
            4,
            512,
            "aarch64",
            "Cortex-A53 1 GHz",
            isa=_ARMV8_0,
        ),
        TargetProfile(
            "jetson-nano",
            "NVIDIA Jetson Nano (4 GB)",
            4,
            4096,
            "aarch64",
            "Cortex-A57 1.43 GHz",
            isa=(*_ARMV8_0, "aes", "pmull", "sha1", "sha2"),
        ),
        TargetProfile(
            "jetson-orin-nano",
            "NVIDIA Jetson Orin Nano (8 GB)",
            6,
            8192,
            "aarch64",
            "Cortex-A78AE 1.5 GHz",
            isa=_ARMV8_2_DOTPROD,
        ),
    )
}


def get_target(
    name: str, *, latency_scale: float | None = None, runtimes: tuple[str, ...] | None = None
) -> TargetProfile:
    """The profile called ``name`` (``host`` is this machine, with the runtimes it has
    installed); ``runtimes`` says what the board has installed (the board profiles do not
    know: a Pi image may carry ONNX Runtime, LiteRT or both)."""
    key = name.strip().lower()
    if key == "host":
        profile = host_profile()
    elif key in PROFILES:
        profile = PROFILES[key]
    else:
        known = ", ".join(["host", *PROFILES])
        raise ConfigError(f"unknown target {name!r}; known targets: {known}")
    if latency_scale is not None:
        if latency_scale <= 0:
            raise ConfigError(f"latency scale must be positive, got {latency_scale}")
        from dataclasses import replace

        profile = replace(profile, latency_scale=latency_scale)
    if runtimes is not None:
        from dataclasses import replace

        if isinstance(runtimes, str):
            raise ConfigError(f"runtimes takes a tuple such as ({runtimes!r},), not a string")
        profile = replace(profile, runtimes=tuple(runtimes))
    return profile
