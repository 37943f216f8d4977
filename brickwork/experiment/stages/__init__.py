"""The stages a pipeline is made of: thin calls into ``train/``, ``ops/`` and ``analysis/``.

Every module of this package registers its stages on import; all are imported here, so a
new stage only needs a new module.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
