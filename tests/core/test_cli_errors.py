"""Bad command lines: one line on stderr, exit code 2, before any work (no traceback, nothing run or written)."""

from __future__ import annotations

import importlib.util

import pytest

from ring_core.cli import main

BAD = {
    "verify --world-size 0": "argument --world-size: must be a positive int, got 0",
    "verify --world-size -3": "argument --world-size: must be a positive int, got -3",
    "verify --dtype": "argument --dtype: expected at least one argument",
    "verify --impl typo": "--impl 'typo' is not a registered attention implementation; choose from",
    "bench --impl typo": "--impl 'typo' is not a registered attention implementation; choose from",
    "bench --repeats 0": "argument --repeats: must be a positive int, got 0",
    "bench --repeats -1": "argument --repeats: must be a positive int, got -1",
    "bench --head-dim 0": "argument --head-dim: must be a positive int, got 0",
    "bench --segments 6 4 --rates 1 2": "--segments/--rates: segment_lengths must be strictly increasing",
    "bench --seq-lens 1048576": "--seq-lens 1048576 on the CPU: about",
    "bench --json /no/such/folder/b.json": "--json /no/such/folder/b.json: the folder /no/such/folder does not exist",
    "pattern local_window --seq-len 64 --block-size 0": "argument --block-size: must be a positive int, got 0",
    "pattern local_window --seq-len 64 --block-size -4": "argument --block-size: must be a positive int, got -4",
    "pattern random --seq-len 64": "pattern 'random' needs option(s) ['density']",
    "pattern nope --seq-len 64": "unknown block-sparse pattern 'nope'",
    "pattern local_window --seq-len 64 -o window=6": "window must be a multiple of block_size",
    "pattern local_window --seq-len 64": "pattern 'local_window' needs option(s) ['window']",
    "pattern local_window -o window=64": "the following arguments are required: --seq-len",
}


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("command", BAD)
def test_a_bad_argument_is_one_line_and_exit_code_2(command, capsys):
    code, out, err = _run(command.split(), capsys)
    assert code == 2, (out, err)
    assert BAD[command] in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"ring-attention {command.split()[0]}: error: "), err
    assert out == "", out  # nothing ran


def test_a_huge_cpu_benchmark_says_how_to_run_it_anyway(capsys):
    _, _, err = _run(["bench", "--seq-lens", "1048576"], capsys)
    assert "pass --force to run anyway" in err


@pytest.mark.parametrize(
    "command",
    ["bench --seq-lens 64 --segments 32 --rates 1 --plot {}", "pattern local_window --seq-len 8 -o window=8 --out {}"],
)
def test_plots_without_matplotlib_are_refused_before_any_work(command, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    code, out, err = _run(command.format(tmp_path / "plot.png").split(), capsys)
    assert code == 2 and 'needs matplotlib: pip install "ring-core[plot]"' in err and out == "", (out, err)
    assert not (tmp_path / "plot.png").exists()
