"""Bridge to Hugging Face DeepseekV3 / Kimi K2: configs, state dicts, checkpoint directories."""

from k2jax.hf.config import config_from_hf, config_to_hf
from k2jax.hf.io import load, load_tokenizer, save
from k2jax.hf.state_dict import from_torch_state_dict, to_torch_state_dict

__all__ = ["config_from_hf", "config_to_hf", "from_torch_state_dict", "load", "load_tokenizer",
           "save", "to_torch_state_dict"]
