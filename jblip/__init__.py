"""jblip: InstructBLIP and BLIP-2 in JAX/Flax."""
from jblip.config import ModelConfig, Precision, from_hf_config, preset  # noqa: F401
from jblip.pretrained import VisionLanguageModel, load_pretrained  # noqa: F401

__version__ = "0.1.0"
