"""Writing a model card (``manifest.yaml``): one comment line, then the card as YAML.

The one place of the card's text format (``yaml.safe_dump`` in the card's own key order, 110 columns,
unicode as is), for the trainers that write cards (:mod:`triaged.lab.train`,
:mod:`triaged.lab.train_multiscale`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import yaml

from triaged.domain import RESEARCH_NOTE

#: The first line of the cards :mod:`triaged.lab.train` writes (multitask, consolidation-em).
HEADER: Final[str] = "# Model card of a triaged learned pipeline (research use only).\n"
#: The first line of the cards :mod:`triaged.lab.train_multiscale` writes (with :data:`RESEARCH_NOTE`).
HEADER_WITH_NOTE: Final[str] = "# Model card of a triaged learned pipeline (" + RESEARCH_NOTE + ")\n"


def save_card(path: Path, card: dict[str, Any], header: str = HEADER) -> None:
    """Write ``card`` to ``path`` (UTF-8): ``header``, then the card as YAML."""
    path.write_text(
        header + yaml.safe_dump(card, sort_keys=False, width=110, allow_unicode=True),
        encoding="utf-8",
    )


__all__ = ["HEADER", "HEADER_WITH_NOTE", "save_card"]
