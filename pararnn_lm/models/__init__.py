"""HF-native language models built from shared blocks and a registry of mixers.

    from pararnn_lm.models import ParaRNNLMConfig, ParaRNNLMForCausalLM
    model = ParaRNNLMForCausalLM(ParaRNNLMConfig(mixer="paragru", hidden_size=256, ...))
    model = ParaRNNLMForCausalLM(config_for("paragru", "400m"))   # paper size presets (configs/size/)

Registered with ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` under model_type ``pararnn_lm``.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import ParaRNNCache
from .configuration import KNOWN_MIXERS, ParaRNNLMConfig
from .decode import StaticDecoder
from .inference import InferenceState, RecurrentState, TokenPosition
from .modeling import (
    ParaRNNLMForCausalLM,
    ParaRNNLMModel,
    ParaRNNLMOutput,
    ParaRNNLMPreTrainedModel,
    build_synthetic_model,
    check_tokenizer,
)
from .presets import PRESET_SIZES, config_for, count_parameters
from .registry import MIXERS, build_mixer, register_mixer

assert set(MIXERS) == set(KNOWN_MIXERS), "configuration.KNOWN_MIXERS and the mixer registry disagree"

AutoConfig.register(ParaRNNLMConfig.model_type, ParaRNNLMConfig, exist_ok=True)
AutoModel.register(ParaRNNLMConfig, ParaRNNLMModel, exist_ok=True)
AutoModelForCausalLM.register(ParaRNNLMConfig, ParaRNNLMForCausalLM, exist_ok=True)

__all__ = [
    "ParaRNNLMConfig", "ParaRNNLMModel", "ParaRNNLMForCausalLM", "ParaRNNLMPreTrainedModel", "ParaRNNLMOutput",
    "ParaRNNCache", "MIXERS", "register_mixer", "build_mixer", "build_synthetic_model", "check_tokenizer",
    "config_for", "count_parameters", "PRESET_SIZES", "StaticDecoder", "InferenceState", "RecurrentState",
    "TokenPosition",
]
