"""Deployment recipes for serving SERE models with Ray Serve + vLLM (never imported by `sere`)."""

from deploy.app import build_app, build_llm_config
from deploy.args import AppArgs, parse_args

__all__ = ["AppArgs", "build_app", "build_llm_config", "parse_args"]
