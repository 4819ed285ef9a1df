"""Predictors consulted by passes through the PassContext.

Here now: the SQLite records database (`records`) and the latency profiler (`profiler`), the
foundation the cost-model, tuner and load-schedule issues build on. Features, the GNN cost model
and the meta-learned tuner come with their own issues."""
