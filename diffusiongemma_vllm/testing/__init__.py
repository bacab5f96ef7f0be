"""Test and reference helpers, never imported by the serving path: transformers' generate
replaying the plugin's draws, the standalone runner, tiny checkpoints and tokenizers."""
