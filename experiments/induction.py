"""Does a small K2 learn to copy by content (an induction head), and how fast?

  python experiments/induction.py                                  # forms at about step 500
  python experiments/induction.py --hidden_size=256                # no copying by step 800
  python experiments/induction.py --lr=1e-2                        # no copying by step 800
  python experiments/induction.py --workdir=workdirs/sft_demo/sft  # probe a trained model

Trains k2_nano with dense FFNs (MLA as in K2) from random weights on k2jax.data.copying's rows:
spans of 6-32 ids uniform over --ids, each written twice, the loss on the predictable copy tokens
only. Every --log_every steps it prints that loss (ln(ids) at chance, near 0 once copying works)
and the copy probe: argmax accuracy on 40-id spans written twice, a length never trained on.
With --workdir it only probes that run's latest checkpoint, with ids over its whole vocabulary.
The measurements are in experiments/REPORT.md, "Why values were not copied".
"""

import functools
import time

import jax
import numpy as np
import optax
from absl import app, flags

import k2jax
from k2jax import presets
from k2jax.data import copying
from k2jax.model.transformer import Transformer, init_variables
from k2jax.train import losses
from k2jax.train.workdir import load_latest

_WORKDIR = flags.DEFINE_string("workdir", None, "Only probe this training run's latest checkpoint.")
_IDS = flags.DEFINE_integer("ids", 64, "Distinct token ids of the rows (the model's vocabulary).")
_LAYERS = flags.DEFINE_integer("layers", 2, "Decoder layers (all with dense FFNs).")
_HIDDEN = flags.DEFINE_integer("hidden_size", 128, "Model width (FFN 3x).")
_Q_LORA = flags.DEFINE_integer("q_lora_rank", 0, "Query latent rank (0: full-rank queries).")
_KV_LORA = flags.DEFINE_integer("kv_lora_rank", 32, "Key/value latent rank.")
_THETA = flags.DEFINE_float("rope_theta", 10000.0, "RoPE base.")
_OPTIMIZER = flags.DEFINE_enum("optimizer", "muonclip", ["muonclip", "adamw"], "Optimizer.")
_LR = flags.DEFINE_float("lr", 3e-3, "Peak learning rate (20 warmup steps, then constant).")
_STEPS = flags.DEFINE_integer("steps", 800, "Updates.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Rows per update.")
_LENGTH = flags.DEFINE_integer("seq_len", 128, "Tokens per row.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 50, "Steps between reports.")
_SEED = flags.DEFINE_integer("seed", 0, "Init and data seed.")


def probe_workdir(workdir: str) -> float:
  cfg, variables, _, _ = load_latest(workdir)
  model = Transformer(cfg)
  return copying.copy_accuracy(jax.jit(lambda t: model.apply(variables, t)[0]),
                               (0, cfg.vocab_size))


def train() -> None:
  cfg = presets.get("k2_nano", vocab_size=_IDS.value, num_hidden_layers=_LAYERS.value,
                    first_k_dense_replace=_LAYERS.value, hidden_size=_HIDDEN.value,
                    intermediate_size=3 * _HIDDEN.value, q_lora_rank=_Q_LORA.value or None,
                    kv_lora_rank=_KV_LORA.value, rope_theta=_THETA.value, dtype=_DTYPE.value)
  model, variables = Transformer(cfg), init_variables(cfg, _SEED.value)
  schedule = optax.warmup_constant_schedule(0.0, _LR.value, 20)
  tx = (k2jax.muonclip(schedule, model_config=cfg) if _OPTIMIZER.value == "muonclip"
        else k2jax.adamw(schedule))

  def loss_fn(params, batch):
    logits, aux = model.apply({**variables, "params": params}, **losses.model_inputs(batch))
    w_BT = losses.target_weights(batch)
    logp_BT = losses.token_log_probs(logits, losses.targets(batch))
    return -(w_BT * logp_BT).sum() / w_BT.sum(), aux["max_logits"]

  @jax.jit
  def step(params, opt_state, batch):
    (loss, max_logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, max_logits=max_logits)
    return optax.apply_updates(params, updates), opt_state, loss

  probe = jax.jit(lambda params, t: model.apply({**variables, "params": params}, t)[0])
  params, rng, start = variables["params"], np.random.default_rng(_SEED.value), time.time()
  opt_state = tx.init(params)
  print(f"k2_nano dense: {_LAYERS.value} layers, hidden {_HIDDEN.value}, {_IDS.value} ids, "
        f"{_OPTIMIZER.value} lr {_LR.value:g}; chance loss ln({_IDS.value}) = "
        f"{np.log(_IDS.value):.2f}", flush=True)
  for i in range(1, _STEPS.value + 1):
    batch = copying.repeat_rows(rng, _BATCH.value, _LENGTH.value + 1, (0, _IDS.value))
    params, opt_state, loss = step(params, opt_state, batch)
    if i % _LOG_EVERY.value == 0 or i == _STEPS.value:
      acc = copying.copy_accuracy(functools.partial(probe, params), (0, _IDS.value))
      print(f"step {i} | copy loss {float(loss):.3f} | copy probe {acc:.3f} | "
            f"{time.time() - start:.0f}s", flush=True)


def main(argv):
  del argv
  if _WORKDIR.value:
    print(f"{_WORKDIR.value}: copy probe {probe_workdir(_WORKDIR.value):.3f}")
  else:
    train()


if __name__ == "__main__":
  app.run(main)
