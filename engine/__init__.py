"""Loadstar's core: plugin host, model folders, loader choice, generation. Never imports Gradio."""
