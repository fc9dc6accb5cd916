"""prm_det's scope in the registry tree, for configs that inherit ours.

A config whose base is ``'prm_det::configs/...'`` gets ``_scope_='prm_det'``
on each object that base defines without a scope of its own (mmengine's
rule for ``PKG::`` bases), and mmengine builds those from the registry of
scope ``prm_det`` (it imports ``prm_det.registry`` to find it). prm_det has
no kinds of objects of its own: each registry here is a child of mmdet's
of the same kind and imports what mmdet's imports, so a build in prm_det's
scope finds exactly what one in mmdet's scope finds (prm_det's own models
are in mmdet's and mmengine's ``MODELS``, :mod:`prm_det.models.registry`).
"""
from mmdet import registry as mmdet
from mmengine.registry import Registry

from .private_apis import registry_locations

SCOPE = 'prm_det'


def _child(parent: Registry) -> Registry:
    return Registry(parent.name, parent=parent, scope=SCOPE,
                    locations=registry_locations(parent) or ['prm_det'])


RUNNERS = _child(mmdet.RUNNERS)
RUNNER_CONSTRUCTORS = _child(mmdet.RUNNER_CONSTRUCTORS)
LOOPS = _child(mmdet.LOOPS)
HOOKS = _child(mmdet.HOOKS)
DATASETS = _child(mmdet.DATASETS)
DATA_SAMPLERS = _child(mmdet.DATA_SAMPLERS)
TRANSFORMS = _child(mmdet.TRANSFORMS)
MODELS = _child(mmdet.MODELS)
MODEL_WRAPPERS = _child(mmdet.MODEL_WRAPPERS)
WEIGHT_INITIALIZERS = _child(mmdet.WEIGHT_INITIALIZERS)
OPTIMIZERS = _child(mmdet.OPTIMIZERS)
OPTIM_WRAPPERS = _child(mmdet.OPTIM_WRAPPERS)
OPTIM_WRAPPER_CONSTRUCTORS = _child(mmdet.OPTIM_WRAPPER_CONSTRUCTORS)
PARAM_SCHEDULERS = _child(mmdet.PARAM_SCHEDULERS)
METRICS = _child(mmdet.METRICS)
EVALUATOR = _child(mmdet.EVALUATOR)
TASK_UTILS = _child(mmdet.TASK_UTILS)
VISUALIZERS = _child(mmdet.VISUALIZERS)
VISBACKENDS = _child(mmdet.VISBACKENDS)
LOG_PROCESSORS = _child(mmdet.LOG_PROCESSORS)
