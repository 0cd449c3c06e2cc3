"""Serving: a Gradio demo (`slowfast-vlm demo`) and an OpenAI-compatible API (`slowfast-vlm serve`)."""
