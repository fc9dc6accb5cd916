from .bam import BAM
from .cbam import CBAM
from .factory import ATTENTION_TYPES, attention_cfg, build_attention
from .gate_norm import GateBatchNorm1d, GateBatchNorm2d
from .gc import GC
from .ge import GE
from .local_relation import LocalRelation2d
from .prm import PRM
from .se import SE
from .sge import SGE
from .sk import SelectiveKernel

__all__ = [
    'PRM', 'SE', 'GC', 'GE', 'SGE', 'CBAM', 'BAM', 'SelectiveKernel',
    'LocalRelation2d',
    'GateBatchNorm1d', 'GateBatchNorm2d', 'ATTENTION_TYPES', 'attention_cfg',
    'build_attention'
]
