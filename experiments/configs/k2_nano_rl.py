r"""RL in the tool worlds after agentic SFT (K2's recipe in miniature, k2jax.rl):

  python experiments/rl.py --config=experiments/configs/k2_nano_rl.py --workdir=workdirs/rl
  ... --config.rl.objective=grpo         GRPO's clipped surrogate instead of K1.5's objective
  ... --config.rl.ptx_weight=0           without the PTX loss
  ... --config.rl.budget=160             with a token budget per sample

k2_nano from the SFT checkpoint of k2_nano_sft.py, K1.5's objective with MuonClip, the PTX loss
on the SFT conversations, a temperature decaying 1.0 -> 0.6 and no token budget. Sized for 2 CPU
cores: 25 updates of 4 tasks x 8 samples, one optimizer step per update, a greedy held-out
evaluation (48 seen-domain + 12 held-out-domain tasks) before the first update
and every 5 updates; one device (the decoder is not sharded). The results are in
experiments/REPORT.md, "RL".
"""

from k2jax.rl import default_config

SFT = "workdirs/sft_demo"
# k2_nano_sft.py's model (dense FFNs): init_from requires the same shapes.
MODEL = dict(hidden_size=128, intermediate_size=384, first_k_dense_replace=4)


def get_config():
  c = default_config()
  c.init_from = f"{SFT}/sft"
  c.model.preset = "k2_nano"
  c.model.dtype = "bfloat16"
  c.model.update(MODEL)
  c.optimizer.update(dict(name="muonclip", lr=5e-4, schedule="constant", warmup_steps=0))
  c.train.update(dict(steps=25, batch_size=4, seq_len=639, log_every=1, eval_every=5,
                      eval_batches=2))
  c.checkpoint.update(dict(every_steps=5, keep=2))
  c.sample.num_tokens = 0
  c.mesh.data = 1
  c.data.update(dict(source=f"{SFT}/data/train.jsonl", format="chat", val_fraction=0.02))
  c.rl.update(dict(objective="kimi", tau=1.0, prompts=4, samples=8, max_new_tokens=96,
                   temperature=1.0, final_temperature=0.6, temperature_decay_steps=20,
                   ptx_weight=0.1, eval_heldout=48, eval_heldout_domain=12))
  return c
