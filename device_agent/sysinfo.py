"""Host metrics for telemetry and host facts for the birth message, from ``/proc`` and ``/sys``.

:class:`SysInfo` reads everything under an injectable ``root`` (``/`` on a board, a fixture tree
in tests), so each reader can be tested against files copied from a real Raspberry Pi:

* CPU use of this process and of the whole system, from ``/proc/self/stat`` and ``/proc/stat``
  deltas between two calls of :meth:`SysInfo.cpu_percent`;
* resident memory (``/proc/self/status`` VmRSS) and available memory (``/proc/meminfo``);
* SoC temperature (``/sys/class/thermal/thermal_zone*/temp``, preferring ``cpu-thermal``);
* Raspberry Pi throttling flags, from the firmware's sysfs node or ``vcgencmd get_throttled``
  (the command is injectable);
* board model, CPU, Pi revision, core count, architecture, OS and total memory.

A file that is missing or unreadable yields None, never an exception: the agent runs on Jetsons,
PCs and containers too, and a telemetry field that cannot be measured is simply null.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from device_agent.contracts.messages import JSONScalar, Throttled

__all__ = ["HostSample", "SysInfo", "parse_throttled"]

# The firmware driver (raspberrypi-hwmon / rpi firmware) exposes the get_throttled mask here
# on recent kernels, which saves spawning vcgencmd every window.
_THROTTLED_SYSFS = "sys/devices/platform/soc/soc:firmware/get_throttled"
_MODEL_FILES = ("proc/device-tree/model", "sys/firmware/devicetree/base/model")
# Thermal zone types that mean "the SoC / CPU" on Pi (cpu-thermal), Jetson (CPU-therm),
# x86 (x86_pkg_temp) and generic ARM boards (soc-thermal).
_CPU_ZONE_TYPES = ("cpu-thermal", "cpu-therm", "soc-thermal", "x86_pkg_temp", "cpu_thermal")
_VCGENCMD_TIMEOUT_S = 2.0
# Arm Ltd. cores by /proc/cpuinfo "CPU part" (implementer 0x41), for boards whose kernel gives
# no "model name".
_ARM_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1",
    "0xd41": "Cortex-A78",
    "0xd42": "Cortex-A78AE",
}


@dataclass(frozen=True)
class HostSample:
    """The host fields of one telemetry window (each None where the host cannot tell)."""

    cpu_percent: float | None
    system_cpu_percent: float | None
    rss_bytes: int | None
    mem_available_bytes: int | None
    temperature_c: float | None
    throttled: Throttled | None


@dataclass(frozen=True)
class _CpuReading:
    process_ticks: int | None
    system_total: int | None
    system_busy: int | None


def parse_throttled(text: str) -> Throttled | None:
    """Parse ``throttled=0x50005`` (vcgencmd) or ``50005`` (sysfs, hex) into flags."""
    value = text.strip()
    if value.startswith("throttled="):
        value = value[len("throttled=") :]
    try:
        raw = int(value, 16)
    except ValueError:
        return None
    return Throttled(raw) if 0 <= raw <= 0xFFFFFFFF else None


class SysInfo:
    """Reads host metrics under ``root``.

    ``vcgencmd`` is the command used for throttling when the sysfs node is absent: a path, or
    the default ``"vcgencmd"`` looked up on ``PATH``, or None to never run it. ``machine``
    overrides ``platform.machine()`` (the architecture is not a file under ``root``).
    The first CPU baseline is taken at construction, so the first :meth:`cpu_percent` covers
    the time since then.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] = "/",
        *,
        vcgencmd: str | os.PathLike[str] | None = "vcgencmd",
        machine: str | None = None,
    ) -> None:
        self.root = Path(root)
        self._vcgencmd = vcgencmd
        self._machine = machine
        self._lock = threading.Lock()
        self._last_cpu = self._read_cpu()

    # --- file helpers ---------------------------------------------------------------------

    def _read(self, relpath: str) -> str | None:
        try:
            return (self.root / relpath).read_text(errors="replace")
        except (OSError, ValueError):
            return None

    def _kv(self, relpath: str) -> dict[str, str]:
        """``key: value`` lines (meminfo, status, cpuinfo's last block) as a dict."""
        text = self._read(relpath)
        out: dict[str, str] = {}
        for line in (text or "").splitlines():
            key, sep, value = line.partition(":")
            if sep:
                out.setdefault(key.strip(), value.strip())
        return out

    # --- CPU ------------------------------------------------------------------------------

    def _read_cpu(self) -> _CpuReading:
        process = system_total = system_busy = None
        stat = self._read("proc/self/stat")
        if stat:
            # The command name (field 2) is in parentheses and may contain spaces or ')'.
            fields = stat[stat.rfind(")") + 2 :].split()
            try:
                process = int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15)
            except (IndexError, ValueError):
                process = None
        text = self._read("proc/stat")
        for line in (text or "").splitlines():
            if line.startswith("cpu "):
                try:
                    ticks = [int(v) for v in line.split()[1:]]
                except ValueError:
                    break
                # user nice system idle iowait irq softirq steal [guest guest_nice]: guest time
                # is already included in user/nice, so only the first eight add up.
                ticks = ticks[:8]
                if len(ticks) >= 4:
                    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
                    system_total = sum(ticks)
                    system_busy = system_total - idle
                break
        return _CpuReading(process, system_total, system_busy)

    def cpu_percent(self) -> tuple[float | None, float | None]:
        """(process, system) CPU use since the previous call, in percent.

        Process CPU is in percent of one core (top's convention: 250 means two and a half
        cores busy with this process); system CPU is the busy share of all cores (0 to 100).
        Both are measured in kernel ticks, so no wall clock is involved.
        """
        now = self._read_cpu()
        with self._lock:
            before, self._last_cpu = self._last_cpu, now
        system = process = None
        if (
            now.system_total is not None
            and before.system_total is not None
            and now.system_busy is not None
            and before.system_busy is not None
        ):
            d_total = now.system_total - before.system_total
            if d_total > 0:
                system = _clamp(100.0 * (now.system_busy - before.system_busy) / d_total, 100.0)
                cores = self.cpu_count()
                if now.process_ticks is not None and before.process_ticks is not None and cores:
                    # d_total counts ticks of every core, so d_total / cores is the wall time.
                    d_proc = now.process_ticks - before.process_ticks
                    process = _clamp(100.0 * d_proc * cores / d_total, 100.0 * cores)
        return process, system

    # --- memory ---------------------------------------------------------------------------

    def rss_bytes(self) -> int | None:
        """This process's resident set size."""
        return _kib(self._kv("proc/self/status").get("VmRSS"))

    def mem_available_bytes(self) -> int | None:
        """The kernel's estimate of memory available to new work (MemAvailable)."""
        return _kib(self._kv("proc/meminfo").get("MemAvailable"))

    def mem_total_bytes(self) -> int | None:
        return _kib(self._kv("proc/meminfo").get("MemTotal"))

    # --- temperature and throttling -------------------------------------------------------

    def temperature_c(self) -> float | None:
        """The SoC temperature in degrees Celsius, from the CPU thermal zone (else the first)."""
        base = self.root / "sys/class/thermal"
        try:
            zones = sorted(
                (p for p in base.glob("thermal_zone*") if p.name[12:].isdigit()),
                key=lambda p: int(p.name[12:]),
            )
        except OSError:
            return None
        fallback: float | None = None
        for zone in zones:
            rel = f"sys/class/thermal/{zone.name}"
            value = _millidegrees(self._read(f"{rel}/temp"))
            if value is None:
                continue
            kind = (self._read(f"{rel}/type") or "").strip().lower()
            if kind in _CPU_ZONE_TYPES:
                return value
            if fallback is None:
                fallback = value
        return fallback

    def throttled(self) -> Throttled | None:
        """Raspberry Pi under-voltage / frequency-cap / throttling flags, None elsewhere."""
        text = self._read(_THROTTLED_SYSFS)
        if text is not None:
            parsed = parse_throttled(text)
            if parsed is not None:
                return parsed
        command = self._vcgencmd_path()
        if command is None:
            return None
        try:
            done = subprocess.run(
                [command, "get_throttled"],
                capture_output=True,
                text=True,
                timeout=_VCGENCMD_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        if done.returncode != 0:
            return None
        return parse_throttled(done.stdout)

    def _vcgencmd_path(self) -> str | None:
        if self._vcgencmd is None:
            return None
        command = os.fspath(self._vcgencmd)
        if os.sep in command:
            return command if os.access(command, os.X_OK) else None
        return shutil.which(command)

    # --- facts ----------------------------------------------------------------------------

    def cpu_count(self) -> int | None:
        """Cores listed in ``/proc/cpuinfo``."""
        text = self._read("proc/cpuinfo")
        if text is None:
            return None
        n = sum(1 for line in text.splitlines() if re.match(r"processor\s*:", line))
        return n or None

    def model(self) -> str | None:
        """The board model, e.g. ``Raspberry Pi 4 Model B Rev 1.1`` (device tree or cpuinfo)."""
        for rel in _MODEL_FILES:
            text = self._read(rel)
            if text:
                # Device-tree strings end with a NUL byte.
                value = text.replace("\x00", "").strip()
                if value:
                    return value
        return self._kv("proc/cpuinfo").get("Model") or None

    def cpu_name(self) -> str | None:
        """The CPU: ``model name`` from ``/proc/cpuinfo`` (x86, some Arm kernels), else an Arm
        core named from its ``CPU part`` (``Cortex-A72`` on a Pi 4, ``Cortex-A76`` on a Pi 5),
        else None."""
        text = self._read("proc/cpuinfo")
        name = _cpuinfo_last(text, "model name")
        if name:
            return name
        part = (_cpuinfo_last(text, "CPU part") or "").lower()
        if _cpuinfo_last(text, "CPU implementer") == "0x41" and part in _ARM_PARTS:
            return f"Arm {_ARM_PARTS[part]}"
        return f"Arm CPU part {part}" if part else None

    def revision(self) -> str | None:
        """The Raspberry Pi revision code (``c03111`` is a Pi 4 B 4 GB rev 1.1), else None."""
        return _cpuinfo_last(self._read("proc/cpuinfo"), "Revision")

    def arch(self) -> str:
        return self._machine or platform.machine()

    def os_name(self) -> str | None:
        """``PRETTY_NAME`` from ``/etc/os-release``."""
        for line in (self._read("etc/os-release") or "").splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.partition("=")[2].strip().strip('"') or None
        return None

    def host_facts(self) -> dict[str, JSONScalar]:
        """Facts for the birth status message (StatusMessage.host)."""
        return {
            "model": self.model(),
            "revision": self.revision(),
            "arch": self.arch(),
            "cpu": self.cpu_name(),
            "cores": self.cpu_count(),
            "mem_total_bytes": self.mem_total_bytes(),
            "os": self.os_name(),
            "kernel": platform.release() if str(self.root) == "/" else None,
            "python": platform.python_version(),
        }

    def sample(self) -> HostSample:
        """Everything a telemetry window reports about the host (CPU since the last sample)."""
        process, system = self.cpu_percent()
        return HostSample(
            cpu_percent=process,
            system_cpu_percent=system,
            rss_bytes=self.rss_bytes(),
            mem_available_bytes=self.mem_available_bytes(),
            temperature_c=self.temperature_c(),
            throttled=self.throttled(),
        )


def _kib(value: str | None) -> int | None:
    """``123456 kB`` -> bytes."""
    if not value:
        return None
    parts = value.split()
    try:
        number = int(parts[0])
    except ValueError:
        return None
    unit = parts[1].lower() if len(parts) > 1 else ""
    return number * 1024 if unit == "kb" else number


def _millidegrees(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return int(text.strip()) / 1000.0
    except ValueError:
        return None


def _cpuinfo_last(text: str | None, key: str) -> str | None:
    for line in (text or "").splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            return value.strip() or None
    return None


def _clamp(value: float, hi: float) -> float:
    # Tick counters are sampled at slightly different instants, so ratios can overshoot.
    return round(min(max(value, 0.0), hi), 2)
