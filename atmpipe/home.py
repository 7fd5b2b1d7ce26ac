"""Where atmpipe keeps converted models and evaluation caches ($ATMPIPE_HOME, default ~/.cache/atmpipe)."""

import os
from pathlib import Path


def atmpipe_home() -> Path:
    return Path(os.environ.get("ATMPIPE_HOME", Path.home() / ".cache" / "atmpipe"))
