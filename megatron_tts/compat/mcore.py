"""The single import point of megatron.core: every other module takes megatron names from here.

Importing this module checks the pinned versions and installs the import-time stand-in for
triton (sys.modules only) before megatron.core is imported, and defers two of megatron's
import-time costs while it imports (``cpu.defer_import_time_costs``, undone right after); it
leaves nothing patched in torch.
``megatron_tts.compat.activate()`` applies the CPU layer, in a training process only.
"""

from __future__ import annotations

import warnings

from megatron_tts.compat import check_versions
from megatron_tts.compat.cpu import defer_import_time_costs, prepare_import

check_versions()
prepare_import()
_undo_deferral = defer_import_time_costs()

# megatron-core warns at import about every optional kernel it falls back from (apex, TE);
# the training start-up line names the implementations in use instead.
warnings.filterwarnings("ignore", category=UserWarning, message=".*(Apex|Transformer Engine).*")
# ruff: noqa: E402 - megatron.core must come after the stand-in above
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel  # noqa: F401
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config  # noqa: F401
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace  # noqa: F401
from megatron.core.dist_checkpointing.mapping import (  # noqa: F401
    ShardedBase,
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
)
from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor  # noqa: F401
from megatron.core.distributed import param_and_grad_buffer  # noqa: F401 - launch.plan's layout
from megatron.core.distributed import (  # noqa: F401
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel  # noqa: F401
from megatron.core.models.gpt.gpt_layer_specs import (  # noqa: F401
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: F401
from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer  # noqa: F401
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: F401
from megatron.core.packed_seq_params import PackedSeqParams  # noqa: F401
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: F401
from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: F401
from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed  # noqa: F401
from megatron.core.transformer import TransformerConfig  # noqa: F401
from megatron.core.transformer.enums import AttnMaskType  # noqa: F401
from megatron.core.transformer.module import MegatronModule  # noqa: F401
from megatron.core.transformer.transformer_block import (  # noqa: F401
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.utils import divide  # noqa: F401

_undo_deferral()


def unwrap(model):
    """The module inside megatron's DistributedDataParallel (its state dict keys carry `module.`)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
