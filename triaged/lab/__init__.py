"""The lab: everything that makes and checks the node's models but never runs in the node.

Training (:mod:`triaged.lab.train`, ``python -m triaged.lab.train``; its data I/O in :mod:`triaged.lab.data`),
synthetic phantoms (:mod:`triaged.lab.phantom`), labelled phantom datasets and demo studies
(:mod:`triaged.lab.datasets`), the real labelled evaluation sets (:mod:`triaged.lab.realsets`, data root in
:mod:`triaged.lab.paths`) and the evaluation metrics (:mod:`triaged.lab.metrics`).  The lab may import the
node's pure and adapter layers (analysis, nets, encode, volume, domain); the node never imports the lab,
which an import-linter contract in ``pyproject.toml`` enforces ("The node never imports the lab") — only the
offline commands of :mod:`triaged.cli` use it, and they import it lazily.
"""
