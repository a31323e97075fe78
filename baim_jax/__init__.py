"""baim_jax: the edge-cloud BAIM framework of Tian et al. (IEEE Network 2024) in JAX/Flax NNX."""
