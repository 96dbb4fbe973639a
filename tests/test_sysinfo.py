"""Host metrics read from a Raspberry Pi 4 fixture tree; missing files give None, not errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from device_agent.contracts.messages import Throttled
from device_agent.sysinfo import SysInfo, parse_throttled

PI4 = Path(__file__).resolve().parent / "fixtures" / "pi4"
VCGENCMD = PI4 / "usr" / "bin" / "vcgencmd"


@pytest.fixture
def pi4(tmp_path: Path) -> Path:
    """A writable copy of the Pi 4 tree, so a test can advance the CPU counters."""
    root = tmp_path / "pi4"
    shutil.copytree(PI4, root, symlinks=True)
    return root


def test_reads_a_pi4() -> None:
    info = SysInfo(PI4, vcgencmd=VCGENCMD, machine="aarch64")
    assert info.model() == "Raspberry Pi 4 Model B Rev 1.1"
    assert info.revision() == "c03111"
    assert info.cpu_count() == 4
    assert info.rss_bytes() == 98268 * 1024
    assert info.mem_available_bytes() == 3311908 * 1024
    assert info.mem_total_bytes() == 3882432 * 1024
    assert info.temperature_c() == pytest.approx(47.712)
    assert info.os_name() == "Debian GNU/Linux 12 (bookworm)"
    facts = info.host_facts()
    assert facts["arch"] == "aarch64" and facts["cores"] == 4 and facts["kernel"] is None
    assert facts["cpu"] == info.cpu_name() and "A72" in str(facts["cpu"])


def test_pi4_cpuinfo_is_faithful_for_onnxruntime_under_qemu() -> None:
    # This file is bind-mounted over /proc/cpuinfo for ONNX Runtime under qemu-aarch64, whose
    # cpuinfo library parses these exact keys (tab-separated, one block per core).
    text = (PI4 / "proc" / "cpuinfo").read_text()
    blocks = [b for b in text.split("\n\n") if b.startswith("processor")]
    assert len(blocks) == 4
    for i, block in enumerate(blocks):
        lines = block.splitlines()
        assert lines[0] == f"processor\t: {i}"
        assert "CPU implementer\t: 0x41" in lines and "CPU part\t: 0xd08" in lines
        assert "Features\t: fp asimd evtstrm crc32 cpuid" in lines
        assert "CPU architecture: 8" in lines and "CPU revision\t: 3" in lines
    assert "Hardware\t: BCM2835\nRevision\t: c03111\n" in text
    assert text.endswith("Model\t\t: Raspberry Pi 4 Model B Rev 1.1\n")
    assert (PI4 / "proc" / "device-tree" / "model").read_bytes().endswith(b"Rev 1.1\x00")


def test_cpu_percent_from_tick_deltas(pi4: Path) -> None:
    info = SysInfo(pi4, vcgencmd=None)
    stat = (pi4 / "proc" / "stat").read_text().splitlines()
    fields = [int(v) for v in stat[0].split()[1:]]
    # 400 ticks pass on all 4 cores together (1 s at 100 Hz): 100 busy (user), 300 idle.
    fields[0] += 100
    fields[3] += 300
    stat[0] = "cpu  " + " ".join(map(str, fields))
    (pi4 / "proc" / "stat").write_text("\n".join(stat) + "\n")
    # The agent used 60 ticks (45 user + 15 system) of that second: 60 % of one core.
    self_stat = (pi4 / "proc" / "self" / "stat").read_text().split(" ")
    self_stat[13] = str(int(self_stat[13]) + 45)
    self_stat[14] = str(int(self_stat[14]) + 15)
    (pi4 / "proc" / "self" / "stat").write_text(" ".join(self_stat))
    assert info.cpu_percent() == (60.0, 25.0)
    # No ticks since the last call: nothing measurable.
    assert info.cpu_percent() == (None, None)


def test_process_name_with_spaces_and_parentheses(pi4: Path) -> None:
    path = pi4 / "proc" / "self" / "stat"
    path.write_text(path.read_text().replace("(edgeship-agent)", "(a) b (c)"))
    info = SysInfo(pi4, vcgencmd=None)
    assert info._read_cpu().process_ticks == 5230 + 870


def test_throttling_from_vcgencmd(monkeypatch: pytest.MonkeyPatch) -> None:
    info = SysInfo(PI4, vcgencmd=VCGENCMD)
    t = info.throttled()
    assert t == Throttled(0x50000)
    assert t.under_voltage_occurred and t.throttled_occurred and not t.any_now
    monkeypatch.setenv("EDGESHIP_FAKE_THROTTLED", "0x5")
    t = info.throttled()
    assert t is not None and t.under_voltage and t.throttled and not t.freq_capped
    monkeypatch.setenv("EDGESHIP_FAKE_THROTTLED", "garbage")
    assert info.throttled() is None


def test_throttling_prefers_the_firmware_sysfs_node(pi4: Path) -> None:
    node = pi4 / "sys" / "devices" / "platform" / "soc" / "soc:firmware" / "get_throttled"
    node.parent.mkdir(parents=True)
    node.write_text("e0008\n")
    t = SysInfo(pi4, vcgencmd=VCGENCMD).throttled()
    assert t == Throttled(0xE0008) and t.soft_temp_limit and t.freq_capped_occurred


def test_missing_or_broken_vcgencmd_gives_none(tmp_path: Path) -> None:
    assert SysInfo(PI4, vcgencmd=None).throttled() is None
    assert SysInfo(PI4, vcgencmd=tmp_path / "nope").throttled() is None
    failing = tmp_path / "vcgencmd"
    failing.write_text("#!/bin/sh\nexit 1\n")
    failing.chmod(0o755)
    assert SysInfo(PI4, vcgencmd=failing).throttled() is None
    assert SysInfo(PI4, vcgencmd="no-such-command-here").throttled() is None


def test_parse_throttled() -> None:
    assert parse_throttled("throttled=0x0\n") == Throttled(0)
    assert parse_throttled("50005") == Throttled(0x50005)
    assert parse_throttled("throttled=") is None
    assert parse_throttled("0x1ffffffff") is None


def test_empty_root_gives_none_everywhere(tmp_path: Path) -> None:
    info = SysInfo(tmp_path, vcgencmd=None, machine="riscv64")
    sample = info.sample()
    assert sample.cpu_percent is None and sample.system_cpu_percent is None
    assert sample.rss_bytes is None and sample.mem_available_bytes is None
    assert sample.temperature_c is None and sample.throttled is None
    assert info.model() is None and info.cpu_count() is None and info.revision() is None
    facts = info.host_facts()
    assert facts["arch"] == "riscv64" and facts["model"] is None and facts["os"] is None


def test_garbled_files_give_none(pi4: Path) -> None:
    for rel in ("proc/stat", "proc/self/stat", "proc/meminfo", "proc/self/status"):
        (pi4 / rel).write_text("garbage\n")
    (pi4 / "sys/class/thermal/thermal_zone0/temp").write_text("hot\n")
    (pi4 / "proc/device-tree/model").unlink()
    info = SysInfo(pi4, vcgencmd=None)
    assert info.cpu_percent() == (None, None)
    assert info.rss_bytes() is None and info.mem_available_bytes() is None
    assert info.temperature_c() is None
    assert info.model() == "Raspberry Pi 4 Model B Rev 1.1"  # from cpuinfo's Model line


def test_prefers_the_cpu_thermal_zone(tmp_path: Path) -> None:
    for n, (kind, temp) in enumerate([("gpu-thermal", "39000"), ("cpu-thermal", "51250")]):
        zone = tmp_path / "sys" / "class" / "thermal" / f"thermal_zone{n}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(temp + "\n")
    assert SysInfo(tmp_path, vcgencmd=None).temperature_c() == 51.25


def test_real_host_never_raises() -> None:
    info = SysInfo()
    sample = info.sample()
    assert sample.rss_bytes is None or sample.rss_bytes > 0
    assert isinstance(info.host_facts()["arch"], str)
