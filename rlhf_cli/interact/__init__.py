"""Using checkpoints: `chat` (talk, compare, record preferences) and `generate` (K answers per prompt);
their flags in `args`."""
