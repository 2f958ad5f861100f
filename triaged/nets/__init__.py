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
``data``
    Phantom datasets and the real 8-bit COVID-19 slices, on the ≈ 2 mm working grid.
``train``
    Seeded, resumable training loops, evaluation (phantom test sets, held-out real slices) and the
    model cards; ``python -m triaged.nets.train``.
``pipelines``
    The ``multitask`` and ``consolidation-em`` analysis pipelines and :func:`register_learned`.

Research use only - not for diagnosis.
"""
