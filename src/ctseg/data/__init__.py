"""Data: named protocols, the prepared-folder layout, prepare steps, datasets, augmentation, synthetic scenes."""
