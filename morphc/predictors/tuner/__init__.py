"""Meta-learned serving-config tuner (Morphling's idea): a MAML meta-model over configs and a model
embedding, an SMBO loop that starts from it and adapts after each measurement, baselines on the same
spaces, and exhaustive ground-truth tables to compare them on.

Modules: space (configs, features, objective), sources (models lowerable at any batch), embedding,
groundtruth (exhaustive tables in the records DB), maml (meta-model), smbo (the loop), baselines.
jax/optax/optuna/sklearn are imported only by the modules that need them.
"""
