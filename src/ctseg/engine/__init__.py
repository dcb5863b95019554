"""Training engine: segmentation losses, metrics, the LightningModule, checkpoints, callbacks, reports.

Modules are imported on use (``from ctseg.engine.checkpoint import load_inference_model``) so that
importing the package does not pull in Lightning.
"""
