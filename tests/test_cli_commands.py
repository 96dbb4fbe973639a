"""The ``edgeship`` command's shape: one module per command, each registering its own parser and
handler, and the entry points (console script, ``python -m sdk.cli``) reaching the same main."""

from __future__ import annotations

import argparse
import subprocess
import sys
from types import ModuleType

import pytest

from sdk.cli import EXIT_BAD_INPUT, build_parser, main
from sdk.cli.app import COMMANDS

# What `edgeship --help` lists, in its order (scripts and docs name these).
EXPECTED = [
    "quantize",
    "bench",
    "optimize",
    "deploy",
    "inspect",
    "targets",
    "demo",
    "collect",
    "fleet",
    "keys",
    "sign",
    "verify",
    "encrypt",
]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_the_commands_and_their_order_are_unchanged() -> None:
    assert list(_subcommands(build_parser())) == EXPECTED


@pytest.mark.parametrize("module", COMMANDS, ids=lambda m: m.__name__)
def test_each_command_module_registers_its_command_with_a_handler(module: ModuleType) -> None:
    """A command module adds its own subparser, and its handler is the module's own."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    module.register(sub)
    name = module.__name__.rsplit(".", 1)[-1]
    assert list(_subcommands(parser)) == [name]
    handler = _subcommands(parser)[name].get_default("handler")
    assert callable(handler)
    assert handler.__module__ == module.__name__


def test_collect_takes_the_collectors_own_options() -> None:
    """``edgeship collect`` and ``edgeship-collector`` share one definition of the options."""
    from collector.cli import build_parser as collector_parser

    ours = vars(build_parser().parse_args(["collect", "--broker", "mqtt://127.0.0.1:1"]))
    theirs = vars(collector_parser().parse_args(["--broker", "mqtt://127.0.0.1:1"]))
    assert len(theirs) > 5  # the probe really parsed the collector's options
    assert {k: ours.get(k, "(missing)") for k in theirs} == theirs


def test_no_command_prints_the_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == EXIT_BAD_INPUT
    assert "usage: edgeship" in capsys.readouterr().out


def test_python_dash_m_sdk_cli_is_the_same_program() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sdk.cli", "--version"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("edgeship ")
    out = subprocess.run(
        [sys.executable, "-m", "sdk.cli", "targets"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "rpi4" in out.stdout and "measured on this host" in out.stdout


@pytest.mark.parametrize("blocked", ["fastapi", "prometheus_client"])
def test_collect_without_the_collector_extra_says_what_to_install(blocked: str) -> None:
    """A board's ``edgeship[agent]`` install has the command but not the server's libraries:
    exit 2 with the install line, not an internal error (exit 3)."""
    probe = (
        f"import sys; sys.modules[{blocked!r}] = None\n"
        "from collector.cli import main\n"
        "sys.exit(main(['--broker', 'mqtt://127.0.0.1:1', '--store', 'sqlite:///x.db']))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert blocked in out.stderr and "pip install 'edgeship[collector]'" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("flag", "value"), [([], None), (["--reduce-range"], True), (["--no-reduce-range"], False)]
)
def test_optimize_reduce_range_defaults_to_deciding(flag: list[str], value: bool | None) -> None:
    """optimize's weights: 7 bits, 8 bits, or (neither flag) decided from the CPUs at hand;
    quantize has only --reduce-range."""
    args = build_parser().parse_args(["optimize", "m.onnx", "-o", "b", *flag])
    assert args.reduce_range is value
    assert build_parser().parse_args(["quantize", "m.onnx", "-o", "q.onnx"]).reduce_range is False
