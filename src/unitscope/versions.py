"""Versions recorded with every artefact (run.json, eval JSON), so results can be traced to the code."""

from __future__ import annotations

import platform


def versions() -> dict[str, str]:
    import torch
    import transformers

    from . import __version__

    return {"unitscope": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}
