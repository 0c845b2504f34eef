"""jlora: LoRA for JAX and Flax as pure functions over parameter pytrees.

>>> import jax, jax.numpy as jnp, flax.linen as nn, jlora
>>> model = nn.Dense(8)
>>> x = jnp.ones((2, 16))
>>> variables = model.init(jax.random.key(0), x)
>>> config = jlora.LoraConfig(rank=4, alpha=8.0, targets=".*/kernel")
>>> adapter = jlora.init(jax.random.key(1), variables, config)
>>> y = jlora.wrap(model.apply)(variables, adapter, x)
>>> y.shape
(2, 8)
"""

from jlora.adapter import Adapter as Adapter
from jlora.adapter import LoraFactors as LoraFactors
from jlora.adapter import init as init
from jlora.analysis import amplification as amplification
from jlora.analysis import effective_rank as effective_rank
from jlora.analysis import numerical_rank as numerical_rank
from jlora.analysis import subspace_similarity as subspace_similarity
from jlora.analysis import subspace_similarity_grid as subspace_similarity_grid
from jlora.checkpoint import CheckpointError as CheckpointError
from jlora.checkpoint import Restored as Restored
from jlora.checkpoint import checkpoint_manager as checkpoint_manager
from jlora.checkpoint import restore as restore
from jlora.checkpoint import save as save
from jlora.combine import Truncation as Truncation
from jlora.combine import combine as combine
from jlora.combine import truncate as truncate
from jlora.config import LoraConfig as LoraConfig
from jlora.factored import MergedUseWarning as MergedUseWarning
from jlora.factored import wrap as wrap
from jlora.merge import delta as delta
from jlora.merge import merge as merge
from jlora.merge import num_params as num_params
from jlora.merge import unmerge as unmerge
from jlora.multi import AdapterStack as AdapterStack
from jlora.multi import route as route
from jlora.multi import select as select
from jlora.multi import stack as stack
from jlora.optim import labels as labels
from jlora.optim import lora_plus as lora_plus
from jlora.peft import export_peft as export_peft
from jlora.peft import import_peft as import_peft
from jlora.quant import QuantizedArray as QuantizedArray
from jlora.quant import dequantize as dequantize
from jlora.quant import quantize as quantize
from jlora.rank_search import RankSearchResult as RankSearchResult
from jlora.rank_search import search_rank as search_rank
from jlora.roles import AxisRoles as AxisRoles
from jlora.sharding import init_sharded as init_sharded
from jlora.sharding import opt_state_shardings as opt_state_shardings
from jlora.sharding import shardings as shardings
from jlora.summary import summary as summary
from jlora.validate import check_finite as check_finite

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterStack",
    "AxisRoles",
    "CheckpointError",
    "LoraConfig",
    "LoraFactors",
    "MergedUseWarning",
    "QuantizedArray",
    "RankSearchResult",
    "Restored",
    "Truncation",
    "amplification",
    "check_finite",
    "checkpoint_manager",
    "combine",
    "delta",
    "dequantize",
    "effective_rank",
    "export_peft",
    "import_peft",
    "init",
    "init_sharded",
    "labels",
    "lora_plus",
    "merge",
    "num_params",
    "numerical_rank",
    "opt_state_shardings",
    "quantize",
    "restore",
    "route",
    "save",
    "search_rank",
    "select",
    "shardings",
    "stack",
    "subspace_similarity",
    "subspace_similarity_grid",
    "summary",
    "truncate",
    "unmerge",
    "wrap",
]
