"""SERE on Hugging Face transformers MoE models: the adapter, calibration of the sidecars, the
substitution test and lock-step batch-decoding evaluation (offline tools, no vLLM)."""
