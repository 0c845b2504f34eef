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
from jlora.config import LoraConfig as LoraConfig
from jlora.factored import wrap as wrap
from jlora.merge import delta as delta
from jlora.merge import merge as merge
from jlora.merge import num_params as num_params
from jlora.merge import unmerge as unmerge
from jlora.optim import labels as labels
from jlora.optim import lora_plus as lora_plus
from jlora.rank_search import RankSearchResult as RankSearchResult
from jlora.rank_search import search_rank as search_rank
from jlora.roles import AxisRoles as AxisRoles
from jlora.summary import summary as summary

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AxisRoles",
    "LoraConfig",
    "LoraFactors",
    "RankSearchResult",
    "amplification",
    "delta",
    "effective_rank",
    "init",
    "labels",
    "lora_plus",
    "merge",
    "num_params",
    "numerical_rank",
    "search_rank",
    "subspace_similarity",
    "subspace_similarity_grid",
    "summary",
    "unmerge",
    "wrap",
]
