"""The `quad` command line: help answers without importing the heavy libraries, `quad scale` forwards its options."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from quadlib.cli import main
from quadlib.reports import REPO_ROOT

HEAVY = ("torch", "transformers", "pandas", "numpy")


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["report", "--help"], ["ingest", "--help"],
                                  ["make-data", "--help"]])
def test_help_imports_no_heavy_library(argv: list[str]) -> None:
    """`quad --help` took 2-4 s when building the `scale` subparser imported torch."""
    probe = (f"import sys\nfrom quadlib.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
             f"print('MODULES=' + __import__('json').dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: quad" in done.stdout
    loaded = json.loads(done.stdout.rsplit("MODULES=", 1)[1])
    assert loaded == [], f"`quad {' '.join(argv)}` imported {loaded}"


def test_scale_parses_its_own_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as shown:
        main(["scale", "--help"])
    assert shown.value.code == 0
    assert "--estimator-state" in capsys.readouterr().out  # the scale-out module's options, under `quad scale`
    with pytest.raises(SystemExit) as refused:
        main(["scale", "--run", "unused", "--steps", "no-such-step"])
    assert refused.value.code == 2
    assert "invalid choice: 'no-such-step'" in capsys.readouterr().err
