"""SERE inside vLLM 0.32 (V1 engine): the plugin, the per-layer routing hook, CPU expert-parallel
fixes and the worker's Prometheus metrics. Imported only in processes that run vLLM."""
