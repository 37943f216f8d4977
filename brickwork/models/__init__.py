"""Reference models built from bricks: component builders and their named presets.

Every model is a :class:`brickwork.nn.StackModel` (stem, tappable body, head), and takes
``in_shape`` and ``num_classes`` from the dataset.
"""

from brickwork.models import bert, minilm
from brickwork.models.bert import bert_encoder
from brickwork.models.cnn import cnn
from brickwork.models.mlp import mlp
from brickwork.models.moe import moe_lm, moe_mlp
from brickwork.models.nested import early_exit, nested_cnn, nested_lm, nested_mlp, nested_vit
from brickwork.models.presets import DATA_ARGS, preset
from brickwork.models.sparse_mlp import sparse_mlp
from brickwork.models.transformers import transformer_lm, transformer_stack, vit

__all__ = [
    "DATA_ARGS",
    "bert",
    "bert_encoder",
    "cnn",
    "early_exit",
    "minilm",
    "mlp",
    "moe_lm",
    "moe_mlp",
    "nested_cnn",
    "nested_lm",
    "nested_mlp",
    "nested_vit",
    "preset",
    "sparse_mlp",
    "transformer_lm",
    "transformer_stack",
    "vit",
]
