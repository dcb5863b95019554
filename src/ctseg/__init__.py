"""ctseg: Contrastive Transformer (CT) for semantic segmentation of aerial and satellite imagery.

Sub-packages (imported lazily so that ``import ctseg`` and ``ctseg --help`` stay fast):

* :mod:`ctseg.contrastive` the patch-level contrastive loss (CT)
* :mod:`ctseg.models`      segmentation models and backbones, with a registry
* :mod:`ctseg.data`        protocols, prepare steps, datasets, augmentation, synthetic scenes
* :mod:`ctseg.engine`      Lightning training, metrics, reports
* :mod:`ctseg.inference`   sliding-window prediction of large scenes, export
"""

__version__ = "0.1.0"
