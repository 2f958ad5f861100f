"""Learned models of triaged (adapter layer: torch modules and the weights they load from ``models/``).

Modules (import what you need; nothing heavy is imported here):

``unet2d``
    Slice-wise residual 2D U-Net (seed 004's backbone and lung network).
``multitask``
    Seed 004's multitask network: shared U-Net → lesion segmentation head + 3D pyramid-pooling
    classification head (P(COVID-19)).
``wu``
    Seed 001's 2.5D UNet (UNet-1 infection, UNet-2 consolidation), the φ2 prior and the hard-EM E-step.
``weights``
    Model folders ``models/<name>/`` with ``manifest.yaml``: sha256 checked before loading.
``preprocess``
    The lungs' bounding-box crop and the z slab resampling the pipelines (and training) apply.
``pipelines``
    The ``multitask`` and ``consolidation-em`` analysis pipelines and :func:`register_learned`.

Training, its data loaders and the model cards live in :mod:`triaged.lab` (``python -m triaged.lab.train``);
nothing here imports the lab.

Research use only - not for diagnosis.
"""
