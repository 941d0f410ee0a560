"""SFT: config.init_from a training workdir or a Hugging Face directory restores the weights and
tokenizer with a fresh optimizer; a short SFT run lowers the masked loss on held-out
conversations; an SFT workdir resumes its own checkpoint; mismatches are one-line errors."""

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import k2jax.hf
from k2jax import agentic, chat, data
from k2jax.train import ConfigError, default_config, train
from k2jax.train import workdir as workdir_lib
from k2jax.train.loop import Run
from k2jax.train.step import make_eval_step

REPO = pathlib.Path(__file__).parents[1]
pytestmark = pytest.mark.slow  # pretraining and SFT runs: make test runs them, make test-fast not.
TINY_MODEL = dict(hidden_size=64, num_hidden_layers=2, n_routed_experts=8, num_experts_per_tok=2)


def _config(**sections):
  c = default_config()
  c.model.update(TINY_MODEL)
  c.train.update(dict(steps=4, batch_size=4, seq_len=64, log_every=1, eval_every=0))
  c.optimizer.update(dict(lr=1e-2, warmup_steps=2))
  c.checkpoint.update(dict(every_steps=0, keep=1, async_save=False))
  c.data.update(dict(read_threads=0, prefetch_batches=0, shuffle_window=0))
  c.mesh.data = 1
  c.sample.num_tokens = 0
  for name, values in sections.items():
    if isinstance(values, dict):
      c[name].update(values)
    else:
      c[name] = values
  return c


@pytest.fixture(scope="module")
def setup(corpus, tmp_path_factory):
  """(root, pretrained workdir, SFT config factory): a K2-format BPE trained on the text corpus
  and the conversations, a 4-step pretraining on the corpus, conversations in JSONL."""
  root = tmp_path_factory.mktemp("sft")
  chats = root / "chats.jsonl"
  agentic.write_jsonl(str(chats), agentic.make_tasks("train", 80, seed=2))
  texts = [chat.render(r["messages"], r["tools"]) for r in agentic.read_jsonl(str(chats))]
  code = [p.read_text() for p in sorted(pathlib.Path(corpus).glob("*.py"))]
  tok = data.train_bpe(texts + code, 1024)
  tok.save(root / "tokenizer")
  pretrained = root / "pretrained"
  train(_config(data=dict(source=corpus, tokenizer="kimi", tokenizer_path=str(root / "tokenizer"))),
        str(pretrained))

  def sft(**train_fields):
    return _config(init_from=str(pretrained),
                   train=dict(dict(seq_len=767, eval_every=10, eval_batches=2), **train_fields),
                   data=dict(source=str(chats), format="chat", val_fraction=0.2))

  return root, pretrained, sft


def test_sft_starts_from_the_checkpoint_with_a_fresh_optimizer(setup, tmp_path):
  root, pretrained, sft = setup
  _, variables, tok, _ = workdir_lib.load_latest(pretrained)
  run = Run(sft(), str(tmp_path / "sft"))
  try:
    assert int(run.state.step) == 0
    for key in ("params", "router"):
      jax.tree.map(np.testing.assert_array_equal, getattr(run.state, key), variables[key])
    jax.tree.map(np.testing.assert_array_equal, run.state.opt_state,
                 run.tx.init(run.state.params))  # not the pretraining run's moments
    assert run.tokenizer.vocab_size == tok.vocab_size
    saved = data.KimiTokenizer.from_dir(tmp_path / "sft" / "tokenizer")
    assert saved.encode("Order 2 Naan") == tok.encode("Order 2 Naan")
  finally:
    run.close()


@pytest.fixture(scope="module")
def sft_run(setup, tmp_path_factory):
  """(workdir, masked eval loss before, after) of a 30-step SFT run."""
  _, _, sft = setup
  workdir = tmp_path_factory.mktemp("sft_run")
  config = sft(steps=30)
  run = Run(config, str(workdir))
  with jax.set_mesh(run.mesh):
    try:
      evaluate = make_eval_step(run.cfg)
      before = np.mean([float(evaluate(run.state.params, run.state.router, b)["loss"])
                        for b in run.eval_batches])
      run.loop()
    finally:
      run.close()
    summary = run.report()
  return workdir, before, summary


def test_a_short_sft_run_lowers_the_masked_loss(sft_run):
  workdir, before, summary = sft_run
  assert summary["step"] == 30 and "eval_bits_per_byte" not in summary
  assert summary["eval_loss"] < before - 1.0, (before, summary)


def test_an_sft_workdir_resumes_its_own_checkpoint(setup, sft_run, tmp_path):
  root, pretrained, sft = setup
  workdir, _, summary = sft_run
  moved = tmp_path / "pretrained_moved"
  shutil.copytree(pretrained, moved)
  shutil.rmtree(pretrained)  # the init is gone: resuming must not need it.
  try:
    again = train(sft(steps=30), str(workdir))
    assert again["start_step"] == 30 and again["step"] == 30
    cfg, variables, tok, _ = workdir_lib.load_latest(workdir)
    assert tok.vocab_size == cfg.vocab_size == 1024
  finally:
    shutil.copytree(moved, pretrained)


def test_init_from_a_hugging_face_directory(setup, tmp_path):
  root, pretrained, sft = setup
  cfg, variables, tok, _ = workdir_lib.load_latest(pretrained)
  k2jax.hf.save(tmp_path / "hf", cfg, variables, tokenizer=tok)
  config = sft()
  config.init_from = str(tmp_path / "hf")
  run = Run(config, str(tmp_path / "sft"))
  try:
    jax.tree.map(np.testing.assert_array_equal, run.state.params, variables["params"])
    jax.tree.map(np.testing.assert_array_equal, run.state.router, variables["router"])
  finally:
    run.close()


def test_mismatches_are_one_line_errors(setup, tmp_path):
  root, pretrained, sft = setup
  config = sft()
  config.model.hidden_size = 96
  with pytest.raises(ConfigError, match=r"init_from .*pretrained: its model has hidden_size=64, "
                                        r"this config 96"):
    Run(config, str(tmp_path / "a"))
  config = sft()
  config.init_from = str(tmp_path)
  with pytest.raises(ConfigError, match="neither a training workdir"):
    Run(config, str(tmp_path / "b"))
  cfg, variables, tok, _ = workdir_lib.load_latest(pretrained)
  small = data.train_bpe(["a few words of text, and some more words to merge"] * 3, 520)
  k2jax.hf.save(tmp_path / "hf", cfg, variables)
  small.save(tmp_path / "hf")  # a tokenizer that is not the model's
  config = sft()
  config.init_from = str(tmp_path / "hf")
  with pytest.raises(ConfigError, match=r"init_from .*hf: its model has vocab_size=1024, this "
                                        r"config 576"):
    Run(config, str(tmp_path / "c"))


def test_synthesize_cli_writes_conversations_and_a_tokenizer(corpus, tmp_path):
  out = tmp_path / "data"
  cmd = [sys.executable, str(REPO / "experiments" / "synthesize.py"), f"--out={out}",
         "--train=40", "--heldout_domain=6", "--tokenizer_vocab=600",
         f"--tokenizer_corpus={corpus}", "--tokenizer_conversations=20"]
  run = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
  assert run.returncode == 0, run.stderr
  records = list(agentic.read_jsonl(str(out / "train.jsonl")))
  assert len(records) == 40 and {r["split"] for r in records} == {"train"}
  assert {r["domain"] for r in agentic.read_jsonl(str(out / "heldout_domain.jsonl"))} == {
    agentic.HELDOUT_DOMAIN}
  tok = data.KimiTokenizer.from_dir(out / "tokenizer")
  assert tok.vocab_size == 600 and tok.chat_template is not None
  again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
  assert again.returncode == 0 and "tokenizer: kept" in again.stdout


def test_agent_eval_cli_reports_a_workdir(sft_run, tmp_path):
  workdir, _, _ = sft_run
  run = subprocess.run(
    [sys.executable, str(REPO / "experiments" / "agent_eval.py"), f"--workdir={workdir}",
     "--heldout=3", "--heldout_domain=2", "--max_new_tokens=8", "--batch_size=2",
     "--transcripts=1", f"--out={tmp_path}"], capture_output=True, text=True, cwd=REPO)
  assert run.returncode == 0, run.stderr
  assert "heldout_domain  library" in run.stdout and "-> " in run.stdout
  report = json.loads((tmp_path / "eval.json").read_text())
  summary = report["results"][str(workdir)]
  assert summary["heldout"]["all"]["episodes"] == 3
  assert set(summary["heldout_domain"]["by_domain"]) == {agentic.HELDOUT_DOMAIN}
  assert (tmp_path / "success_by_domain.png").stat().st_size > 5_000
