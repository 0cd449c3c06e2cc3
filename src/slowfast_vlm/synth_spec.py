"""The synthetic benchmark's fixed sizes (docs/synth.md), apart from its generator (`synth`, which needs
numpy and PyAV) so that the command line (`commands`) can name them in `--help` without importing either."""

SPLITS = ("train", "val", "test")
MIN_FRAMES = 64  # below this, 4-frame pooling gives fewer than min_fast_frames (16) windows
NUM_OBJECTS = 3  # bouncing squares per clip
CATEGORIES = ("digit_touching_wall", "digit_away_from_wall")  # the two digits a square flashes
QUESTIONS_PER_CLIP = NUM_OBJECTS * len(CATEGORIES)
