"""Knowledge distillation: losses over taps, taps by module path, teacher caching, the student wrapper.

- :mod:`~brickwork.train.distill.losses`: logit KD (Hinton), hints (FitNets), attention transfer,
  relational KD (distance, angle), DIST, each a plain function checked against a hand computation,
  and the ``distill_loss`` registry entries configs name;
- :mod:`~brickwork.train.distill.taps`: forward hooks by module path, frozen teachers, adapters;
- :mod:`~brickwork.train.distill.objective`: :class:`Term` (one weighted term) and
  :class:`Distiller` (a student trained by the ordinary loop against a teacher);
- :mod:`~brickwork.train.distill.cache`: the teacher's tensors computed once, in memory or a file;
- :mod:`~brickwork.train.distill.transfer` and :mod:`~brickwork.train.distill.flips`: Fantastic
  Gains' knowledge transfer between pretrained models (data partitioning) and its statistics.

Note for the owners of ``transfer.py`` / ``flips.py``: their public names are re-exported below;
a name added, renamed or removed there is changed here too (and in docs/api.md's section).
"""

from brickwork.train.distill.cache import TeacherCache, build_cache, check_cacheable
from brickwork.train.distill.flips import flips, transfer_stats
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
from brickwork.train.distill.transfer import TeacherAndSelf, partitioned_kd, teacher_mask, transfer, transfer_terms

__all__ = [
    "Distiller",
    "Tap",
    "TapRecorder",
    "TeacherAndSelf",
    "TeacherCache",
    "Term",
    "adapter",
    "attention_transfer",
    "build_cache",
    "check_cacheable",
    "dist_kd",
    "flips",
    "frozen_teacher",
    "hint",
    "kd_divergence",
    "logit_kd",
    "module_at",
    "partitioned_kd",
    "relational_kd",
    "rkd_angle",
    "rkd_distance",
    "teacher_mask",
    "transfer",
    "transfer_stats",
    "transfer_terms",
]
