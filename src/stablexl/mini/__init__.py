"""The miniature world: a real emoji text-to-image dataset for a tiny SDXL trained on a CPU."""
