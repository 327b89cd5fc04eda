"""specmd-jax: expert caching and speculative expert prefetching for Mixture-of-Experts models, in JAX."""

__version__ = "0.1.0"
