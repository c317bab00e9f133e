"""Wan2.1/Wan2.2 video diffusion in pure PyTorch: model, loaders, sequence parallelism, pipeline.

Nothing in this package imports Ray or FastAPI.
"""
