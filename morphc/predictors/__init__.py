"""Predictors consulted by passes through the PassContext.

The SQLite records database (`records`) and the latency profiler (`profiler`) are the foundation;
the cost model, the tuner (`tuner`) and the cold-start layer profiles (`layer_profile`) build on them.

Latency cost model (issue 4): `spaces` (device profiles, config spaces: CpuConfig, GpuConfig),
`features` (OpGraph over the dataflow graph), `corpus` + `dataset` (profiling corpus, resumable
collection), `cost_model` (Flax NNX GNN, training, checkpoints; `cost_model.load_default()` for the
shipped CPU checkpoint; `predict`, `predict_many`, `embed`; `service`: the same over HTTP). Imported on
demand (jax is heavy).
GPU profile: `gpu_profiler` (measurement in one process at its MPS SM share) and `gpu_collect` (MPS
check, one worker process per share; scripts/collect_gpu_profile.py)."""
