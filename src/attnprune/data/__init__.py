"""The data the measures read: HolisticBias prompts and splits, perplexity corpora."""
