"""The model families a scenario names: the built-in ones (one short module each, next to this
file) and a user's, named by import path; each has the family interface (`FAMILY_INTERFACE`)."""
from __future__ import annotations

import importlib
from typing import Any

from verify.scenarios import _hf, cs336, convnet, gpt, hf_gpt2, hf_llama, mlp, special

__all__ = ["FAMILIES", "CORE_FAMILIES", "HF_FAMILIES", "FAMILY_INTERFACE", "family_module",
           "is_family_path"]

# The families every install has; the default Hypothesis draws take only these, so a seed draws
# the same cases with or without the optional extras.
CORE_FAMILIES = {"mlp": mlp, "gpt": gpt, "cs336": cs336, "convnet": convnet, "special": special}
# HuggingFace transformers models from tiny configs: present only where transformers is
# importable (`pip install -e '.[hf]'`); drawn only when asked for by name.
HF_FAMILIES = {"hf_gpt2": hf_gpt2, "hf_llama": hf_llama} if _hf.AVAILABLE else {}
FAMILIES = {**CORE_FAMILIES, **HF_FAMILIES}

FAMILY_INTERFACE = ("DEFAULTS", "check", "build", "blocks", "make_batch", "loss")
_PATH_FAMILIES: dict[str, Any] = {}


def is_family_path(name: str) -> bool:
    """A user's family named by import path (``pkg.module`` or ``pkg.module:obj``)."""
    return "." in name or ":" in name


def family_module(name: str):
    """The module (or object) of a family: a built-in name, or an import path whose object has
    the family interface (`FAMILY_INTERFACE`; optionally ``strategy()``, a Hypothesis strategy
    of keyword-argument dicts). ValueError naming what is wrong."""
    if name in FAMILIES:
        return FAMILIES[name]
    if name in ("hf_gpt2", "hf_llama"):
        raise ValueError(f"family={name!r} needs transformers, which is not installed: "
                         "pip install -e '.[hf]'")
    if not is_family_path(name):
        raise ValueError(f"family={name!r}: allowed values are {list(FAMILIES)}, or a module of "
                         f"yours by import path (pkg.module, or {name}: for a top-level module)")
    if name not in _PATH_FAMILIES:
        module_name, _, attr = name.partition(":")
        try:
            obj = importlib.import_module(module_name)
            for part in attr.split(".") if attr else ():
                obj = getattr(obj, part)
        except Exception as exc:
            raise ValueError(f"family {name!r}: cannot import it ({type(exc).__name__}: {exc})")
        missing = [a for a in FAMILY_INTERFACE if not hasattr(obj, a)]
        if missing:
            raise ValueError(f"family {name!r} lacks {', '.join(missing)} of the family interface "
                             f"({', '.join(FAMILY_INTERFACE)}; see the README)")
        if not isinstance(obj.DEFAULTS, dict):
            raise ValueError(f"family {name!r}: DEFAULTS must be a dict of keyword arguments")
        _PATH_FAMILIES[name] = obj
    return _PATH_FAMILIES[name]

