import os
import sys

import pytest

# Tests never reach the hub: every model, tokenizer and video is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def transformers_deprecations(monkeypatch):
    """Messages transformers emits about deprecated names during the test (its FutureWarnings and the
    `warning_once` of its output classes, which renames `past_key_values` -> `cache` from 5.24)."""
    import warnings

    import transformers.utils.generic

    logged: list[str] = []
    monkeypatch.setattr(
        transformers.utils.generic.logger, "warning_once", lambda message, *a, **k: logged.append(message)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield logged
    logged.extend(
        str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
    )
