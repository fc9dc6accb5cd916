"""GE, SGE, CBAM, BAM and the SK block equal the official code in float64:
outputs, input gradients, every parameter's gradient and, in training, the
BatchNorm running statistics (``../shared/golden/attention_official.pt``,
computed by PytorchInsight's and attention-module's classes), the official
parameter names mapped by :mod:`prm_det.models.official_names`."""
import pytest
import torch
from torch import nn

from prm_det.models.backbones.sk_resnet import SKBottleneck
from prm_det.models.layers import BAM, CBAM, GE, SGE
from prm_det.models.official_names import OFFICIAL_NAMES, rename_official

KINDS = ('sge', 'cbam', 'bam', 'sk_bottleneck', 'ge_theta_minus')


def build(kind, args):
    if kind == 'sge':
        return SGE(args['channels'], groups=args['groups']), 'sge'
    if kind == 'cbam':
        return CBAM(args['channels'], ratio=1. / args['reduction']), 'cbam'
    if kind == 'bam':
        return BAM(args['channels']), 'bam'
    if kind == 'ge_theta_minus':
        return GE(args['channels']), 'ge'
    inplanes, planes = args['inplanes'], args['planes']
    downsample = nn.Sequential(
        nn.Conv2d(inplanes, planes * 4, 1, stride=args['stride'],
                  bias=False),
        nn.BatchNorm2d(planes * 4)) if args['downsample'] else None
    block = SKBottleneck(inplanes, planes, stride=args['stride'],
                         downsample=downsample)
    return block, 'sk'


def ours(state, names):
    return {rename_official(key, names): value for key, value in state.items()}


def cases_of(golden, kind):
    cases = [c for c in golden['cases'] if c['kind'] == kind]
    assert cases, f'no {kind} case in the golden file'
    return cases


@pytest.mark.parametrize('kind', KINDS)
def test_module_equals_the_official_code_in_float64(attention_golden, kind):
    for case in cases_of(attention_golden, kind):
        module, names_key = build(kind, case['args'])
        names = OFFICIAL_NAMES[names_key]
        module = module.double().train(case['train'])
        module.load_state_dict(ours(case['state'], names), strict=True)
        x = case['x'].clone().requires_grad_()
        y = module(x)
        (y * case['upstream']).sum().backward()
        where = f"{kind} {case['args']} train={case['train']}"
        torch.testing.assert_close(y, case['y'], rtol=1e-9, atol=1e-12,
                                   msg=lambda m: f'{where}: {m}')
        torch.testing.assert_close(x.grad, case['grad_x'], rtol=1e-9,
                                   atol=1e-12, msg=lambda m: f'{where}: {m}')
        grads = ours(case['grad_params'], names)
        params = dict(module.named_parameters())
        assert set(grads) == set(params), where
        for name, grad in grads.items():
            # a bias right before a training BatchNorm has gradient 0 in
            # exact arithmetic; both sides hold rounding of order 1e-12
            torch.testing.assert_close(params[name].grad, grad, rtol=1e-9,
                                       atol=1e-10,
                                       msg=lambda m: f'{where} {name}: {m}')
        if case['train']:
            after = ours(case['state_after'], names)
            state = module.state_dict()
            for name, value in after.items():
                torch.testing.assert_close(state[name], value, rtol=1e-9,
                                           atol=1e-12,
                                           msg=lambda m: f'{where} {name}: {m}')

