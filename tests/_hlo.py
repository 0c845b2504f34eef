"""Finding weight-gradient dots in a compiled training step (HLO text) or in its jaxpr.

A weight gradient is a dot that sums over the tokens into one kernel's worth of numbers:
``contracted · batch == tokens`` with ``batch · kernel_size`` results (per-batch-element
gradients, summed afterwards), or, for per-expert kernels whose expert axis is a batch axis of
the dot, ``contracted == tokens`` with ``kernel_size`` results. The factored path must have
none; the same search finds those of the naive recipe (autodiff through W + s·AᵀB), which
keeps the check from passing vacuously. Pick sizes so that the token count differs from every
kernel axis and from the rank.
"""

from __future__ import annotations

import math
import re

import jax
import jax.extend

_HLO_DEF = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*[a-z0-9]+\[([\d,]*)\]")
_HLO_DOT = re.compile(r"\sdot\([^%)]*%([\w.\-]+),[^%)]*%([\w.\-]+)\)")


def _dims(attr: str, line: str) -> tuple[int, ...]:
  found = re.search(attr + r"=\{([\d,]*)\}", line)
  return tuple(int(d) for d in found.group(1).split(",") if d) if found else ()


def is_weight_gradient(lhs, rhs, result, l_con, r_con, l_batch, kernel_size: int,
                       tokens: int) -> bool:
  """Whether a dot of these shapes and dimension numbers is a weight gradient."""
  contracted = math.prod(lhs[d] for d in l_con)
  assert contracted == math.prod(rhs[d] for d in r_con)
  batch = math.prod(lhs[d] for d in l_batch)
  size = math.prod(result)
  # Something must be summed: a dot batched over every token that contracts nothing is an
  # outer product per token (an activation gradient such as d(einsum('ted,te->td'))/dy).
  per_example = contracted > 1 and contracted * batch == tokens and size == batch * kernel_size
  per_expert = contracted == tokens and size == kernel_size
  return per_example or per_expert


def hlo_weight_gradient_dots(hlo: str, kernel_size: int, tokens: int) -> list[str]:
  """The weight-gradient dots of an HLO module's text (every computation, fusions included)."""
  shapes, dots = {}, []
  for line in hlo.splitlines():
    defined = _HLO_DEF.match(line)
    if defined:
      shapes[defined.group(1)] = tuple(int(d) for d in defined.group(2).split(",") if d)
    if _HLO_DOT.search(line):
      dots.append(line)
  assert dots, "no dot in the HLO: is the parser out of date?"
  found = []
  for line in dots:
    name = _HLO_DEF.match(line).group(1)
    lhs, rhs = (shapes[n] for n in _HLO_DOT.search(line).groups())
    if is_weight_gradient(lhs, rhs, shapes[name], _dims("lhs_contracting_dims", line),
                          _dims("rhs_contracting_dims", line), _dims("lhs_batch_dims", line),
                          kernel_size, tokens):
      found.append(line.strip()[:160])
  return found


def jaxpr_weight_gradient_dots(jaxpr, kernel_size: int, tokens: int) -> list[str]:
  """The weight-gradient dot_generals of a jaxpr, nested jaxprs (jit, remat, scan, cond,
  custom_vjp) included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (l_con, r_con), (l_batch, _) = eqn.params["dimension_numbers"]
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      if is_weight_gradient(lhs, rhs, eqn.outvars[0].aval.shape, l_con, r_con, l_batch,
                            kernel_size, tokens):
        found.append(str(eqn)[:200])
  for sub in sub_jaxprs(jaxpr):
    found += jaxpr_weight_gradient_dots(sub, kernel_size, tokens)
  return found


def sub_jaxprs(jaxpr):
  """The jaxprs nested in `jaxpr`'s equations (jit, remat, scan, cond bodies), one level."""
  for eqn in jaxpr.eqns:
    for value in eqn.params.values():
      for v in value if isinstance(value, tuple) else (value,):
        if isinstance(v, jax.extend.core.ClosedJaxpr):
          yield v.jaxpr
        elif isinstance(v, jax.extend.core.Jaxpr):
          yield v
