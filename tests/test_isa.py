"""int8 outlook from the instruction set: board profiles, a real Pi 4 cpuinfo, x86 flag sets."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from sdk.isa import cpu_flags, int8_outlook, int8_verdict, saturation
from sdk.targets import PROFILES, get_target

PI4 = Path(__file__).resolve().parent / "fixtures" / "pi4"


def test_reads_the_pi4_features_from_its_cpuinfo() -> None:
    assert cpu_flags(PI4) == {"fp", "asimd", "evtstrm", "crc32", "cpuid"}


def test_the_rpi4_profile_agrees_with_a_real_pi4() -> None:
    assert set(PROFILES["rpi4"].isa) <= cpu_flags(PI4)
    # The host outlook read from the Pi 4's own cpuinfo and the rpi4 profile's agree.
    from_board = int8_outlook("host", root=PI4)
    from_profile = int8_outlook("rpi4", host_flags=cpu_flags(PI4))
    assert from_board.expect_int8_speedup is False
    assert from_profile.expect_int8_speedup is False
    assert from_profile.host_note is None  # the "host" is a Pi 4 itself: nothing misleads
    assert "dot product" in from_board.reason


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("rpi3", False),  # Cortex-A53
        ("rpi-zero2w", False),  # Cortex-A53
        ("rpi4", False),  # Cortex-A72: NEON, no dotprod
        ("jetson-nano", False),  # Cortex-A57
        ("rpi5", True),  # Cortex-A76: dotprod
        ("jetson-orin-nano", True),  # Cortex-A78AE: dotprod
    ],
)
def test_board_outlooks(target: str, expected: bool) -> None:
    note = int8_outlook(target, host_flags=())
    assert note.expect_int8_speedup is expected
    assert note.target == target
    assert ("asimddp" in PROFILES[target].isa) is expected
    assert "i8mm" not in PROFILES[target].isa  # none of these cores is Armv8.6


@pytest.mark.parametrize(
    ("flags", "expected", "reduce_range"),
    [
        ({"sse4_2", "avx2", "avx512f", "avx512bw", "avx512_vnni"}, True, False),
        ({"sse4_2", "avx2", "avx_vnni"}, True, False),
        ({"sse4_2", "avx2", "fma"}, True, True),  # u8s8 can saturate without VNNI
        ({"sse4_2", "ssse3"}, None, False),
        ({"fp", "asimd", "asimddp", "i8mm"}, True, False),
        ({"fp", "asimd", "asimddp"}, True, False),
        ({"fp", "asimd"}, False, False),
        (set(), None, False),
    ],
)
def test_verdict_from_flags(flags: set[str], expected: bool | None, reduce_range: bool) -> None:
    speedup, reason, _features, reduce = int8_verdict(flags)
    assert speedup is expected
    assert reduce is reduce_range
    assert reason


def test_a_vnni_host_is_flagged_as_misleading_for_a_pi4() -> None:
    note = int8_outlook("rpi4", host_flags={"avx2", "avx512_vnni"})
    assert note.expect_int8_speedup is False
    assert note.host_note is not None and "avx512_vnni" in note.host_note
    assert "will not see" in note.host_note
    # A Pi 5 target on the same host: both have fast int8, so no note.
    assert int8_outlook("rpi5", host_flags={"avx2", "avx512_vnni"}).host_note is None


def test_host_target_uses_the_host_flags() -> None:
    note = int8_outlook("host", host_flags={"avx2"})
    assert note.expect_int8_speedup is True and note.reduce_range


def test_unknown_isa_is_none_not_a_guess() -> None:
    profile = get_target("rpi4")
    bare = replace(profile, name="custom-board", isa=())
    note = int8_outlook(bare, host_flags=())
    assert note.expect_int8_speedup is None
    assert "no instruction-set data" in note.reason


def test_cpuinfo_missing_or_mixed(tmp_path: Path) -> None:
    assert cpu_flags(tmp_path) == frozenset()
    proc = tmp_path / "proc"
    proc.mkdir()
    # big.LITTLE: the little cores lack the dot product, so the process cannot count on it.
    (proc / "cpuinfo").write_text(
        "processor\t: 0\nFeatures\t: fp asimd asimddp\n\nprocessor\t: 1\nFeatures\t: fp asimd\n\n"
    )
    assert cpu_flags(tmp_path) == {"fp", "asimd"}
    assert int8_outlook("host", root=tmp_path).expect_int8_speedup is False


VNNI_HOST = {"sse4_2", "avx2", "avx512f", "avx512bw", "avx512_vnni"}
AVX2_HOST = {"sse4_2", "avx2", "fma"}


@pytest.mark.parametrize(
    ("target", "host", "why"),
    [
        ("host", VNNI_HOST, None),
        ("host", AVX2_HOST, "this host's int8 kernels saturate"),
        # a Pi's kernels do not saturate, but its quality is measured on this host
        ("rpi4", AVX2_HOST, "would score lower here"),
        ("rpi5", VNNI_HOST, None),
        ("rpi4", set(), None),
    ],
)
def test_saturation_names_the_machine_that_saturates(
    target: str, host: set[str], why: str | None
) -> None:
    found = saturation(target, host_flags=host)
    if why is None:
        assert found is None
    else:
        assert found is not None and why in found


def test_a_board_without_vnni_saturates_whatever_the_host() -> None:
    board = replace(get_target("rpi4"), name="x86-box", isa=("sse4_2", "avx2"))
    found = saturation(board, host_flags=VNNI_HOST)
    assert found is not None and found.startswith("x86-box's int8 kernels saturate")
    assert saturation(replace(board, isa=tuple(VNNI_HOST)), host_flags=VNNI_HOST) is None
