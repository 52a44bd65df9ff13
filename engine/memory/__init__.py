"""ReLoop2's error memory: an LSH sketch of the base model's errors, its serving wrapper and feed."""
