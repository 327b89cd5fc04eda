"""Learned next-layer expert predictor: features, Flax NNX model, optax training, Orbax checkpoints, evaluation."""
