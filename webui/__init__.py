"""The Gradio web UI: thin handlers over engine/."""
