"""Where the lab finds the shared real data (the one owner of that rule).

The real CT volumes and slices live only on development machines, outside the checkout:
``$TRIAGED_REAL_DATA`` when set, else ``../shared/data/real`` next to the checkout.  A set variable is taken
as given even when it names no folder (callers then report the data as absent; the tests skip), so
``TRIAGED_REAL_DATA=/nonexistent`` behaves like a machine without the data.  Resolved at call time: nothing
here touches the filesystem on import.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

#: Environment variable naming the real data root.
DATA_ENV: Final[str] = "TRIAGED_REAL_DATA"


def real_data_root() -> Path:
    """``$TRIAGED_REAL_DATA`` when set (even to a missing folder), else ``../shared/data/real`` next to the
    checkout."""
    explicit = os.environ.get(DATA_ENV, "")
    if explicit:
        return Path(explicit)
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "real"


__all__ = ["DATA_ENV", "real_data_root"]
