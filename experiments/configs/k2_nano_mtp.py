r"""k2_nano (the demo) plus one DeepSeek-V3 MTP layer, trained at lambda 0.3, 0.1 from step 400.

  python experiments/train.py --config=experiments/configs/k2_nano_mtp.py \
      --workdir=workdirs/k2_nano_mtp
  python benchmarks/decode.py --mtp_workdir=workdirs/k2_nano_mtp --only_speculative --markdown

The MTP layer then drafts for the model's own speculative decoding; its acceptance rate, the decode
speedup and the training cost are in benchmarks/RESULTS.md.
"""

import importlib.util
import pathlib


def get_config():
  spec = importlib.util.spec_from_file_location(
      "k2_nano", pathlib.Path(__file__).with_name("k2_nano.py"))
  k2_nano = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(k2_nano)
  c = k2_nano.get_config()
  c.model.num_nextn_predict_layers = 1
  c.loss.mtp = (0.3, 0.1, 400)  # (value, final, switch_step)
  return c
