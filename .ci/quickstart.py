"""Run the README's quick start against the installed ema_optim (see wheel_check.sh).

Takes the first ```python block under "## Quick start" in README.md, gives it the two names the
README leaves to the reader (``loader``, ``evaluate``), and runs it in the current directory.
Also checks that the import comes from site-packages, not a checkout, and that the wheel
ships py.typed.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import torch

import ema_optim


def quick_start(readme: Path) -> str:
    section = readme.read_text().split("## Quick start", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    if match is None:
        raise SystemExit(f"{readme}: no ```python block under '## Quick start'")
    return match.group(1)


def main() -> None:
    package = Path(ema_optim.__file__).parent
    assert "site-packages" in package.parts, f"ema_optim imported from {package}, not the installed wheel"
    assert (package / "py.typed").is_file(), "the wheel does not ship ema_optim/py.typed"
    installed = metadata.version("ema_optim")
    assert installed == ema_optim.__version__, f"metadata {installed} != {ema_optim.__version__}"

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 10, generator=g)
    loader = [(x[i : i + 16], x[i : i + 16].sum(1, keepdim=True)) for i in range(0, 64, 16)]
    evaluated = []
    namespace = {"loader": loader, "evaluate": evaluated.append}
    exec(compile(quick_start(Path(sys.argv[1])), "README.md quick start", "exec"), namespace)

    assert evaluated == [namespace["model"]], "the quick start did not evaluate the model"
    loaded = torch.load("opt.pt", weights_only=True)
    assert all("ema" in s for s in loaded["state"].values()), "the saved optimizer state has no shadows"
    print(f"wheel check: ema_optim {installed} from {package}, torch {torch.__version__}: quick start ran")


if __name__ == "__main__":
    main()
