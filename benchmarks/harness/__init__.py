"""Test and benchmark harnesses for expert parallelism: process-group launcher, simulated
multi-node Ray cluster, routing traces and the trace-driven scale model. Not part of the package."""
