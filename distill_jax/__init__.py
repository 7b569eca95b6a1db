"""distill_jax: distil image classifiers into readable students and explain them."""
