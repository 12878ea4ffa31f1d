"""One exception type for user mistakes, so entry points can print a single line and exit,
and the one-line message for a missing optional package."""

from typing import Optional


class DanubeConfigError(ValueError):
    """Bad input from the user: the message names the problem and the fix, on one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


class DanubeRankError(DanubeConfigError):
    """A problem one rank meets on its own (it cannot reach the others, say): unlike a config
    error, which every rank finds alike and rank 0 reports, the rank that met it prints it."""

    exit_code = 2


class DanubePeerLost(DanubeRankError):
    """Another rank stopped answering mid-run (its node died, or it crashed): not bad input,
    so the exit code is 1."""

    exit_code = 1


# Optional modules -> the extra of this package that installs them.
EXTRAS = {
    "safetensors": "hf",
    "transformers": "hf",
    "tokenizers": "hf",
    "zstandard": "data",
    "pyarrow": "data",
    "datasets": "data",
    "mistral_common": "demo",
    "transformer_engine": "te",
    "lm_eval": "eval",
}


def missing_extra_message(exc: ModuleNotFoundError) -> Optional[str]:
    top = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return None
    return f'this needs the {top} package, which is not installed; pip install -e ".[{extra}]"'
