"""`r1lab --help` must start fast: the CLI and the package's top level import neither torch
nor transformers until a command needs them (issue: every command took 4-8 s to start)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import r1lab


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(out.stdout.split())


@pytest.mark.parametrize(
    "code",
    [
        "import r1lab.cli",
        "import r1lab; r1lab.__version__",
        # --help builds the parser and exits; a stage's settings are imported only for its help
        "from r1lab.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
    ],
)
def test_the_cli_starts_without_torch(code):
    loaded = _modules_after(code)
    assert "torch" not in loaded and "transformers" not in loaded


def test_public_names_load_on_first_use():
    from r1lab.api import load
    from r1lab.engine.generate import SamplingParams
    from r1lab.model.transformer import Transformer

    assert r1lab.load is load and r1lab.SamplingParams is SamplingParams
    assert r1lab.Transformer is Transformer
    assert set(r1lab.__all__) <= set(dir(r1lab))
    for name in r1lab.__all__:
        assert getattr(r1lab, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        r1lab.nonexistent  # noqa: B018
