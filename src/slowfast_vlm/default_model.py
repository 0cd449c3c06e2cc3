"""The small demo model shipped with the package, used when no `--model` is given."""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).parent / "data" / "demo_model"
DEMO_CLIP = Path(__file__).parent / "data" / "demo_clip.mp4"


def default_model_path() -> Path:
    """The shipped demo model's directory; `OSError` if this installation carries none."""
    if not (DEMO_MODEL_DIR / "config.json").exists():
        raise OSError(f"no demo model shipped at {DEMO_MODEL_DIR}; pass --model PATH_OR_ID")
    return DEMO_MODEL_DIR
