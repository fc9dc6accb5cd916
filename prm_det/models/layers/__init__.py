from .factory import ATTENTION_TYPES, attention_cfg, build_attention
from .prm import PRM
from .se import SE

__all__ = ['PRM', 'SE', 'ATTENTION_TYPES', 'attention_cfg', 'build_attention']
