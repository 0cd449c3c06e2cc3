import os
import sys

# Tests never reach the hub: every model, tokenizer and video is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))
