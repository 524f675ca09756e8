"""The native DeepSeek-V3 policy: config, model, hyper-connections and HF checkpoint I/O."""

from r1.model.config import PRESETS, V3Config, count_params, load_config
from r1.model.model import LatentCache, SharedPrefix, V3ForCausalLM, V3Output, expert_load_metrics, update_router_biases

__all__ = ["PRESETS", "LatentCache", "SharedPrefix", "V3Config", "V3ForCausalLM", "V3Output", "count_params",
           "expert_load_metrics", "load_config", "update_router_biases"]
