"""Every early-exit network erde trains, by name: the families (``resnet``, ``airnet``) register their
architectures on import, one small builder each (``list_archs()``); a config travels with the weights in every
checkpoint (``config_from_dict``). The shared parts are in ``net.py``; each family is a module of its own.
"""

from __future__ import annotations

from . import airnet, resnet  # noqa: F401 (registers the families and their architectures)
from .net import (EarlyExitNet, ExitHead, ModelConfig, build_model, config_from_dict, keep_exits,  # noqa: F401
                  list_archs, model_config, parse_exits)
from .resnet import default_exits  # noqa: F401
