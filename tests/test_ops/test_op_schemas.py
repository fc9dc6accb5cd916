"""The registered ops' schemas stay as released.

torch.compile keeps compiled graphs on disk (Inductor's FX graph cache,
AOTAutograd's cache, under ``/tmp/torchinductor_$USER`` unless
``TORCHINDUCTOR_CACHE_DIR`` says otherwise) and a graph compiled with an
earlier prm_det calls ``prm_det::block_tail`` and
``prm_det::block_tail_backward`` with the arguments they had then; the
backward op is called from the op's autograd, which the cache key does not
see. A changed schema therefore breaks a user's cached compile after an
upgrade. This test fails on any change, so that the change is made on
purpose: register the changed op under a new name (``block_tail_v2``)
and leave the old one working, then update the pinned schema here."""
import pytest
import torch

import prm_det.ops.library  # noqa: F401  (registers the ops)

# (name, type, keyword-only) per argument, then the number of outputs;
# ints are SymInt in newer torch's inferred schemas, int in older ones
PINNED = {
    'block_tail': (
        'c:Tensor, identity:Tensor?, bn_weight:Tensor?, bn_bias:Tensor?, '
        'running_mean:Tensor?, running_var:Tensor?, weight:Tensor, '
        'bias:Tensor, one:Tensor, zero:Tensor, theta:Tensor, scale:Tensor, '
        '*has_norm:bool, *bn_training:bool, *bn_momentum:float, '
        '*bn_eps:float, *relu:bool, *groups:int, *use_position:bool, '
        '*use_norm:bool, *normalized_positions:bool, *eps:float, '
        '*backend:str', 9),
    'block_tail_backward': (
        'grad_y:Tensor, c:Tensor, y:Tensor?, bn_weight:Tensor?, '
        'bn_bias:Tensor?, running_mean:Tensor?, running_var:Tensor?, '
        'save_mean:Tensor, save_invstd:Tensor, weight:Tensor, bias:Tensor, '
        'one:Tensor, zero:Tensor, theta:Tensor, scale:Tensor, '
        'query_index:Tensor, query:Tensor, context:Tensor, stats:Tensor, '
        '*has_norm:bool, *bn_training:bool, *bn_eps:float, '
        '*has_identity:bool, *groups:int, *use_position:bool, '
        '*use_norm:bool, *normalized_positions:bool, *eps:float, '
        '*backend:str, *need_c:bool, *need_bn_weight:bool, '
        '*need_bn_bias:bool', 10),
}


def _arguments(schema) -> str:
    return ', '.join(
        ('*' if arg.kwarg_only else '') + f'{arg.name}:' +
        str(arg.type).replace('SymInt', 'int').replace(
            'Optional[Tensor]', 'Tensor?') for arg in schema.arguments)


@pytest.mark.parametrize('name', sorted(PINNED))
def test_the_op_schema_is_the_released_one(name):
    schema = getattr(torch.ops.prm_det, name).default._schema
    arguments, outputs = PINNED[name]
    assert (_arguments(schema), len(schema.returns)) == (arguments, outputs), (
        f'prm_det::{name} changed its schema: a torch.compile cache made '
        f'with the released prm_det would call it as it was. Register the '
        f'changed op under a new name and keep this one, then update '
        f'PINNED (this file\'s docstring says why).\n  now: {schema}')
