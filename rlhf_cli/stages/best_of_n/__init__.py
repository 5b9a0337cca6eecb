"""Stage 3 alternative: best-of-n rejection sampling, then SFT on the best answers (`rlhf best-of-n`)."""
