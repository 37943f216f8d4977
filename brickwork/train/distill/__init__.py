"""Knowledge distillation: losses over taps, taps by module path, teacher caching, the student wrapper.

- :mod:`~brickwork.train.distill.losses`: logit KD (Hinton), hints (FitNets), attention transfer,
  relational KD (distance, angle), DIST, each a plain function checked against a hand computation,
  and the ``distill_loss`` registry entries configs name;
- :mod:`~brickwork.train.distill.taps`: forward hooks by module path, frozen teachers, adapters;
- :mod:`~brickwork.train.distill.objective`: :class:`Term` (one weighted term) and
  :class:`Distiller` (a student trained by the ordinary loop against a teacher);
- :mod:`~brickwork.train.distill.cache`: the teacher's tensors computed once, in memory or a file.

Note for ``transfer.py`` (Fantastic Gains' transfer, another engineer's module): once it exists,
import its public names here and add them to ``__all__`` (and to docs/api.md's section).
"""

from brickwork.train.distill.cache import TeacherCache, build_cache, check_cacheable
from brickwork.train.distill.losses import (
    attention_transfer,
    dist_kd,
    hint,
    kd_divergence,
    logit_kd,
    relational_kd,
    rkd_angle,
    rkd_distance,
)
from brickwork.train.distill.objective import Distiller, Term
from brickwork.train.distill.taps import Tap, TapRecorder, adapter, frozen_teacher, module_at

__all__ = [
    "Distiller",
    "Tap",
    "TapRecorder",
    "TeacherCache",
    "Term",
    "adapter",
    "attention_transfer",
    "build_cache",
    "check_cacheable",
    "dist_kd",
    "frozen_teacher",
    "hint",
    "kd_divergence",
    "logit_kd",
    "module_at",
    "relational_kd",
    "rkd_angle",
    "rkd_distance",
]
