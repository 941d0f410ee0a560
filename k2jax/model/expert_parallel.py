"""Expert-parallel dispatch: routed experts under a (data, fsdp, expert, tensor) mesh.

Inside `jax.shard_map` each device holds its own tokens (the batch is split over data x fsdp x
expert) and E / expert of the routed experts, their width F split over tensor:

1. every (token, expert) assignment goes to the expert shard that owns its expert: a send buffer
   [expert, C, D] with C rows per destination, exchanged by `all_to_all` over `expert`;
2. the received rows run through the local experts with the single-device dispatch
   (`k2jax.model.dispatch`, "sort" or "ragged"), their weights all-gathered over the axes that
   FSDP-shard the model width (the transpose reduce-scatters the gradients); partial outputs of a
   tensor-split width are summed with `psum` over tensor;
3. a second `all_to_all` brings the outputs home, where they are weighted and summed per token.

This is the padded form: `ragged_all_to_all` is unimplemented on CPU. Buffers have a static C:
dropless (C = the device's assignments, the worst case; cfg.moe_dispatch "sort" or "ragged"),
or C = ceil(capacity_factor * assignments / expert) ("capacity"; beyond C a destination drops,
in token order). The dropless form is exact but pads the exchange and the expert compute by a
factor `expert`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from k2jax import sharding
from k2jax.model.dispatch import (
    buffer_rows,
    capacity,
    capacity_layout,
    routed_experts,
    sort_assignments,
)


def active_mesh(num_tokens: int):
  """The context mesh when the routed experts should run expert-parallel, else None.

  That is a k2jax mesh of more than one device (`sharding.context_mesh`) whose batch axes divide
  the tokens (a one-token decode step stays on the single-device path).
  """
  mesh = sharding.context_mesh()
  if mesh is None or mesh.size == 1:
    return None
  if num_tokens % math.prod(mesh.shape[a] for a in sharding.BATCH_AXES):
    return None
  return mesh


def send_capacity(num_assignments: int, ep: int, dispatch: str, capacity_factor: float) -> int:
  """Rows per destination shard of the exchange: all the device's assignments when dropless,
  else a capacity share."""
  if dispatch != "capacity":
    return num_assignments
  return capacity(num_assignments, ep, capacity_factor)


def routed_rows(num_assignments: int, num_experts: int, ep: int, dispatch: str,
                capacity_factor: float, block_size: int = 0) -> int:
  """Rows one device pushes through its experts (padding included) for `num_assignments` of its
  own, expert-parallel over `ep` shards: what the memory plan counts."""
  if ep == 1:
    return buffer_rows(num_assignments, num_experts, dispatch, capacity_factor, block_size)
  received = ep * send_capacity(num_assignments, ep, dispatch, capacity_factor)
  return buffer_rows(received, num_experts // ep, "ragged" if dispatch == "ragged" else "sort",
                     capacity_factor, block_size)


def _varying(xs, axes):
  """Marks each of `xs` varying over those of `axes` it does not vary over yet.

  Tokens meet tensor-split weights and weights meet per-device tokens; the single-device
  dispatch's custom VJP wants its inputs typed like its gradients. The transpose of the cast sums
  the cotangents over those axes: the gradient reduction of a replicated input.
  """
  return tuple(jax.lax.pcast(x, tuple(a for a in axes if a not in jax.typeof(x).mat.varying),
                             to="varying") for x in xs)


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def expert_parallel_experts(x_TD, idx_TK, w_TK, wg_EDF, wu_EDF, wd_EFD, *, mesh, dispatch: str,
                            capacity_factor: float = 1.25, block_size: int = 0,
                            dtype=jnp.float32):
  """Same contract as `dispatch.routed_experts`: (y_TD float32, dropped_frac) over `mesh`."""
  T, D = x_TD.shape
  ep = mesh.shape["expert"]
  tok_spec = sharding.logical_spec(("batch", None), (T, D), mesh.shape)
  wi_spec = sharding.logical_spec(("expert", "embed", "moe_mlp"), wg_EDF.shape, mesh.shape,
                                  "experts/gate")
  wo_spec = sharding.logical_spec(("expert", "moe_mlp", "embed"), wd_EFD.shape, mesh.shape,
                                  "experts/down")
  token_axes = _axes(tok_spec[0])
  if "expert" not in token_axes and ep > 1:
    raise ValueError(f"expert parallelism needs the tokens ({T}) split over mesh axis expert")
  gather_axes, tensor_axes = _axes(wi_spec[1]), _axes(wi_spec[2])

  def body(x_TD, idx_TK, w_TK, wg_EDF, wu_EDF, wd_EFD):
    if gather_axes:
      wg_EDF, wu_EDF = (jax.lax.all_gather(w, gather_axes, axis=1, tiled=True)
                        for w in (wg_EDF, wu_EDF))
      wd_EFD = jax.lax.all_gather(wd_EFD, gather_axes, axis=2, tiled=True)
    wg_EDF, wu_EDF, wd_EFD = _varying((wg_EDF, wu_EDF, wd_EFD), token_axes)
    if ep == 1:  # no exchange: the device's tokens through all the experts.
      x_TD, w_TK = _varying((x_TD, w_TK), tensor_axes)
      y_TD, dropped = routed_experts(x_TD, idx_TK, w_TK, wg_EDF, wu_EDF, wd_EFD,
                                     dispatch=dispatch, capacity_factor=capacity_factor,
                                     block_size=block_size, dtype=dtype)
      dropped = dropped * idx_TK.size
    else:
      y_TD, dropped = _exchange(x_TD, idx_TK, w_TK, wg_EDF, wu_EDF, wd_EFD, ep=ep,
                                tensor_axes=tensor_axes, dispatch=dispatch,
                                capacity_factor=capacity_factor, block_size=block_size,
                                dtype=dtype)
    if tensor_axes:
      y_TD = jax.lax.psum(y_TD, tensor_axes)
    if token_axes:
      dropped = jax.lax.psum(dropped, token_axes)
    return y_TD, dropped / (T * idx_TK.shape[1])

  return jax.shard_map(body, mesh=mesh, in_specs=(tok_spec, tok_spec, tok_spec, wi_spec, wi_spec,
                                                  wo_spec),
                       out_specs=(tok_spec, P()))(x_TD, idx_TK, w_TK, wg_EDF, wu_EDF, wd_EFD)


def _exchange(x_TD, idx_TK, w_TK, wg_EDF, wu_EDF, wd_EFD, *, ep: int, tensor_axes, dispatch: str,
              capacity_factor: float, block_size: int, dtype):
  """all_to_all to the experts' shards and back; (y_TD partial over tensor, dropped count)."""
  Tl, K = idx_TK.shape
  El = wg_EDF.shape[0]
  num_assign = Tl * K
  cap = send_capacity(num_assign, ep, dispatch, capacity_factor)
  # The exchange is the capacity layout with expert shards for experts: cap rows per shard.
  lay = capacity_layout(sort_assignments(idx_TK // El, ep), cap)
  send_RD = jnp.take(x_TD.astype(dtype), lay.src_R // K, axis=0, mode="fill", fill_value=0)
  send_R = jnp.where(lay.src_R < num_assign,
                     jnp.take(idx_TK.reshape(-1), lay.src_R, mode="clip") % El, El)

  recv_RD = jax.lax.all_to_all(send_RD, "expert", 0, 0, tiled=True)
  recv_R = jax.lax.all_to_all(send_R, "expert", 0, 0, tiled=True)
  valid_R = recv_R < El
  recv_RD, valid_R1 = _varying((recv_RD, valid_R.astype(jnp.float32)[:, None]), tensor_axes)
  # Empty rows (zero input, zero weight) spread over the local experts, so that the padding
  # does not overload one expert and push the dropless dispatch off its capacity layout.
  fill_R = jnp.arange(recv_R.shape[0]) % El
  y_RD, _ = routed_experts(recv_RD, jnp.where(valid_R, recv_R, fill_R)[:, None], valid_R1,
                           wg_EDF, wu_EDF, wd_EFD,
                           dispatch="ragged" if dispatch == "ragged" else "sort",
                           block_size=block_size, dtype=dtype)
  back_RD = jax.lax.all_to_all(y_RD, "expert", 0, 0, tiled=True)
  y_TKD = jnp.take(back_RD, lay.dest_A, axis=0, mode="fill", fill_value=0).reshape(Tl, K, -1)
  y_TD = jnp.einsum("tkd,tk->td", y_TKD, w_TK.astype(jnp.float32))
  return y_TD, jnp.sum(lay.dest_A >= ep * cap).astype(jnp.float32)
