"""The model on vLLM's layers, its config and checkpoint layout, and how a pass announces its
phase to attention."""
