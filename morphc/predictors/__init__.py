"""Predictors consulted by passes through the PassContext: features, profiling records, the GNN
latency cost model and the meta-learned tuner (built in their own issues)."""
