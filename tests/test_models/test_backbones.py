"""prm_det's ResNets (PRM, SE, GC, GE, SGE, CBAM, SK in the blocks; BAM and
non-local between them; LR-Net's local relation layers in place of the
spatial convs): mmdet's ResNet with attention."""
import pytest
import torch
from helpers import tiny_backbone
from mmdet.models.backbones import ResNet
from mmdet.registry import MODELS
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._python_dispatch import TorchDispatchMode

from prm_det.models.backbones import GCResNet, PRMResNet, SEResNet
from prm_det.models.layers import PRM

# attention inside the blocks (the module's attribute in each block)
ABBR = dict(PRMResNet='prm', SEResNet='se', GCResNet='context_block',
            GEResNet='ge', SGEResNet='sge', CBAMResNet='cbam', SKResNet='sk')
# attention between blocks: its attributes on the backbone
STAGE_ATTENTION = dict(BAMResNet=('bam1', 'bam2', 'bam3'),
                       NLResNet=('nonlocal_block3', ))
# local relation layers in place of the spatial convs (LR-Net)
IN_PLACE_OF_CONVS = ['LRResNet']
BACKBONES = list(ABBR) + list(STAGE_ATTENTION) + IN_PLACE_OF_CONVS


@pytest.mark.parametrize('type_', BACKBONES)
@pytest.mark.parametrize('depth', [18, 34, 50, 101, 152])
def test_output_shapes_for_every_depth(type_, depth):
    model = tiny_backbone(type_, depth)
    model.eval()  # mmdet's ResNet.train() returns None: no chaining
    expansion = 1 if depth < 50 else 4
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 32))
    assert [tuple(o.shape) for o in outs] == [
        (1, 16 * expansion * 2**i, 64 // 2**(i + 2), 32 // 2**(i + 2))
        for i in range(4)
    ]


@pytest.mark.parametrize('type_', BACKBONES)
@pytest.mark.parametrize('out_indices', [(0, ), (1, 3), (0, 1, 2), (3, )])
def test_out_indices(type_, out_indices):
    model = tiny_backbone(type_, 50, out_indices=out_indices)
    model.eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 32, 32))
    assert [o.shape[1] for o in outs] == [64 * 2**i for i in out_indices]


@pytest.mark.parametrize('type_', list(ABBR))
@pytest.mark.parametrize('depth', [18, 50])
def test_attention_sits_in_the_stages_it_should(type_, depth):
    model = tiny_backbone(type_, depth)
    stages = (False, True, True, True) if type_ == 'GCResNet' else (True, ) * 4
    for i, on in enumerate(stages):
        for block in getattr(model, f'layer{i + 1}'):
            assert hasattr(block, ABBR[type_]) == on


@pytest.mark.parametrize('type_,depth', [('PRMResNet', 18),
                                         ('PRMResNet', 50),
                                         ('SEResNet', 50)])
def test_attention_runs_after_the_last_norm_before_the_add(type_, depth):
    model = tiny_backbone(type_, depth)
    model.eval()
    block = model.layer2[0]
    last_conv, last_norm = ((block.conv2, block.norm2) if depth < 50 else
                            (block.conv3, block.norm3))
    attention = getattr(block, ABBR[type_])
    seen = {}
    last_conv.register_forward_hook(lambda m, i, o: seen.update(conv=o))
    x = torch.randn(1, block.conv1.in_channels, 16, 16)
    with torch.no_grad():
        out = block(x)
        expected = torch.relu(
            attention(last_norm(seen['conv'])) + block.downsample(x))
    torch.testing.assert_close(out, expected)


def test_frozen_stages_freeze_their_attention_and_norms():
    model = MODELS.build(dict(type='PRMResNet', depth=50, frozen_stages=1,
                              norm_eval=False, attention=dict(groups=8)))
    model.train()
    for p in list(model.conv1.parameters()) + list(model.layer1.parameters()):
        assert not p.requires_grad
    assert not model.layer1[0].prm.theta.requires_grad
    assert all(not m.training for m in model.layer1.modules()
               if isinstance(m, _BatchNorm))
    assert model.layer2[0].prm.theta.requires_grad
    assert all(m.training for m in model.layer2.modules()
               if isinstance(m, _BatchNorm))


@pytest.mark.parametrize('type_', BACKBONES)
def test_norm_eval_keeps_batchnorm_in_eval_mode_while_training(type_):
    model = tiny_backbone(type_, 18, norm_eval=True)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert bns and all(not m.training for m in bns)
    before = model.layer1[0].norm1.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(model.layer1[0].norm1.running_mean, before)


@pytest.mark.parametrize('type_', BACKBONES)
@pytest.mark.parametrize('depth', [18, 50])
def test_with_cp_gives_same_outputs_and_gradients(type_, depth):
    torch.manual_seed(0)
    plain = tiny_backbone(type_, depth, norm_eval=True)
    cp = tiny_backbone(type_, depth, norm_eval=True, with_cp=True)
    cp.load_state_dict(plain.state_dict())
    for m in (plain, cp):
        m.train()
    x = torch.randn(2, 3, 32, 32)
    outs_plain = plain(x.clone().requires_grad_())
    outs_cp = cp(x.clone().requires_grad_())
    for a, b in zip(outs_plain, outs_cp):
        torch.testing.assert_close(a, b)
    sum(o.sum() for o in outs_plain).backward()
    sum(o.sum() for o in outs_cp).backward()
    grads_cp = dict(cp.named_parameters())
    for name, p in plain.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads_cp[name].grad, p.grad,
                                       rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('type_', STAGE_ATTENTION)
@pytest.mark.parametrize('depth', [18, 50])
def test_stage_attention_sits_where_it_should(type_, depth):
    """BAM on the outputs of stages 1-3, non-local on the input of stage
    c4's last block; none inside the blocks."""
    model = tiny_backbone(type_, depth)
    assert model.attention_stages and model.attention is None
    names = STAGE_ATTENTION[type_]
    assert sorted(model.stage_attention_names.values()) == sorted(names)
    seen = []
    for name in names:
        getattr(model, name).register_forward_pre_hook(
            lambda m, args, name=name: seen.append((name, args[0].shape)))
    last = model.layer3[-1]
    last.register_forward_pre_hook(
        lambda m, args: seen.append(('layer3 last block', args[0].shape)))
    model.layer2.register_forward_hook(
        lambda m, args, out: seen.append(('layer2 out', out.shape)))
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    order = [name for name, _ in seen]
    if type_ == 'BAMResNet':
        assert order == ['bam1', 'layer2 out', 'bam2', 'layer3 last block',
                         'bam3']
    else:
        assert order == ['layer2 out', 'nonlocal_block3',
                         'layer3 last block']
        assert seen[1][1] == seen[2][1]


@pytest.mark.parametrize('type_', BACKBONES)
def test_every_attention_parameter_gets_a_gradient(type_):
    model = tiny_backbone(type_, 50, frozen_stages=-1)
    model.init_weights()
    model.train()
    outs = model(torch.randn(2, 3, 64, 64))
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    attention = set(model.attention_tensor_names())
    params = [(n, p) for n, p in model.named_parameters() if n in attention]
    if type_ == 'GEResNet':  # GE-theta-minus has no parameters
        assert params == [] and len(model.layer1[0].ge.state_dict()) == 0
        return
    assert params
    for name, p in params:
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def test_basicblock_depths_zero_init_their_last_norm():
    model = MODELS.build(dict(type='PRMResNet', depth=18,
                              attention=dict(groups=8)))
    model.init_weights()
    assert (model.layer1[0].norm2.weight == 0).all()
    assert (model.layer1[0].norm1.weight == 1).all()


def official_prm_resnet50_keys():
    """Backbone keys of the official prm_resnet50 (torchvision ResNet-50
    naming plus ``prm.*`` in every Bottleneck), without ``fc.*``."""

    def bn(name):
        return [f'{name}.{k}' for k in ('weight', 'bias', 'running_mean',
                                        'running_var', 'num_batches_tracked')]

    keys = ['conv1.weight'] + bn('bn1')
    for layer, blocks in zip(range(1, 5), (3, 4, 6, 3)):
        for i in range(blocks):
            p = f'layer{layer}.{i}.'
            for j in (1, 2, 3):
                keys += [f'{p}conv{j}.weight'] + bn(f'{p}bn{j}')
            keys += [p + 'prm.' + k for k in ('weight', 'bias', 'one', 'zero',
                                              'theta', 'scale')]
            if i == 0:
                keys += [p + 'downsample.0.weight'] + bn(p + 'downsample.1')
    return keys


def test_state_dict_keys_equal_official_prm_resnet50():
    model = MODELS.build(dict(type='PRMResNet', depth=50))
    assert sorted(model.state_dict()) == sorted(official_prm_resnet50_keys())
    # an official checkpoint: DataParallel's prefix and a classifier head
    official = {'module.' + k: v.clone()
                for k, v in model.state_dict().items()}
    official['module.fc.weight'] = torch.zeros(1000, 2048)
    official['module.fc.bias'] = torch.zeros(1000)
    stripped = {k[len('module.'):]: v for k, v in official.items()
                if not k.startswith('module.fc.')}
    result = model.load_state_dict(stripped, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize('kwargs,match', [
    (dict(attention_stages=(True, False)), 'one flag per stage'),
    (dict(attention=dict(groups=48)), 'divisible by groups'),
    (dict(attention=dict(mode='dot')), 'mode must be one of'),
    (dict(depth=42), 'depth must be one of'),
])
def test_bad_backbone_configuration_raises_value_error(kwargs, match):
    cfg = dict(type='PRMResNet', depth=50)
    cfg.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MODELS.build(cfg)


def test_attention_options_and_stages_are_arguments():
    model = MODELS.build(dict(type='PRMResNet', depth=50,
                              attention=dict(groups=32, mode='cosine'),
                              attention_stages=(False, False, True, True)))
    assert not hasattr(model.layer2[0], 'prm')
    assert isinstance(model.layer3[0].prm, PRM)
    assert model.layer3[0].prm.groups == 32
    assert model.layer3[0].prm.mode == 'cosine'
    se = MODELS.build(dict(type='AttentionResNet', depth=18, attention='se'))
    assert hasattr(se.layer1[0], 'se')
    assert issubclass(PRMResNet, ResNet) and issubclass(SEResNet, ResNet)
    assert issubclass(GCResNet, ResNet)


@pytest.mark.parametrize('depth', [18, 50])
@pytest.mark.parametrize('bn_training', [True, False])
def test_fused_block_tail_equals_norm_prm_add_relu(depth, bn_training,
                                                  backend):
    """The PRM block computes relu(prm(norm(conv(x))) + shortcut) in one
    Function (normalized map recomputed in backward): same outputs,
    gradients and BatchNorm running statistics as the plain composition."""
    import copy
    torch.manual_seed(0)
    model = tiny_backbone('PRMResNet', depth).double()
    block = model.layer2[0]
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    block.train(bn_training)
    plain = copy.deepcopy(block)
    norm_name = 'norm2' if depth < 50 else 'norm3'
    conv_name = 'conv2' if depth < 50 else 'conv3'

    def plain_forward(x):
        out = plain.relu(plain.norm1(plain.conv1(x)))
        if depth >= 50:
            out = plain.relu(plain.norm2(plain.conv2(out)))
        c = getattr(plain, conv_name)(out)
        return torch.relu(plain.prm(getattr(plain, norm_name)(c)) +
                          plain.downsample(x))

    x = torch.randn(2, block.conv1.in_channels, 12, 10, dtype=torch.float64)
    upstream = torch.randn(2, block.prm.in_channels, 6, 5,
                           dtype=torch.float64)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    y1 = block(x1)
    y2 = plain_forward(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-10)
    (y1 * upstream).sum().backward()
    (y2 * upstream).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-10)
    grads_plain = dict(plain.named_parameters())
    for name, p in block.named_parameters():
        torch.testing.assert_close(p.grad, grads_plain[name].grad,
                                   rtol=1e-9, atol=1e-10, msg=name)
    norm, norm_plain = getattr(block, norm_name), getattr(plain, norm_name)
    for key in ('running_mean', 'running_var', 'num_batches_tracked'):
        torch.testing.assert_close(getattr(norm, key),
                                   getattr(norm_plain, key), msg=key)


def test_prm_block_keeps_no_normalized_copy_for_backward(backend):
    """Tensors saved for backward by a PRM block: no more of the feature
    map's size than a plain ResNet block saves."""
    def saved_bytes(model, x):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return sum(seen.values())

    torch.manual_seed(0)
    plain = MODELS.build(dict(type='ResNet', depth=50, norm_eval=False))
    prm = MODELS.build(dict(type='PRMResNet', depth=50, norm_eval=False))
    plain.train()
    prm.train()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    ratio = saved_bytes(prm.layer1, plain.maxpool(plain.relu(plain.norm1(
        plain.conv1(x))))) / saved_bytes(plain.layer1, plain.maxpool(
            plain.relu(plain.norm1(plain.conv1(x)))))
    # PRM's own state is [b*g, h*w] per tensor (c/g = 4 times smaller than
    # the map in the first stage); a saved normalized map would add ~25%
    assert ratio < 1.12, ratio


def test_channels_last_backbone_matches_contiguous(backend):
    torch.manual_seed(0)
    model = tiny_backbone('PRMResNet', 50)
    model.train()
    x = torch.randn(2, 3, 32, 32)
    outs = model(x)
    outs_cl = model.to(memory_format=torch.channels_last)(
        x.to(memory_format=torch.channels_last))
    for a, b in zip(outs, outs_cl):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class Recorder(TorchDispatchMode):
    """The ops that run inside it, by name."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_prm_blocks_run_the_fused_batchnorm_kernel_on_cpu():
    """On CPU each PRM block's tail (BatchNorm, PRM, add, ReLU) is one
    kernel op each way, in training and in inference."""
    model = tiny_backbone('PRMResNet', 50, norm_eval=False)
    num_blocks = sum(len(getattr(model, name)) for name in model.res_layers)
    x = torch.randn(2, 3, 64, 64)
    model.train()
    with Recorder() as rec:
        sum(o.sum() for o in model(x)).backward()
    assert rec.ops.count('prm_det.bn_prm_forward') == num_blocks
    assert rec.ops.count('prm_det.bn_prm_backward') == num_blocks
    model.eval()
    with Recorder() as rec, torch.no_grad():
        model(x)
    # inference writes each tail's result over its conv's output
    assert rec.ops.count('prm_det.bn_prm_eval_') == num_blocks
    assert rec.ops.count('prm_det.bn_prm_forward') == 0
    # torch runs the other norms only: the stem's, the first two of each
    # block and the four downsample shortcuts'
    torch_norms = [op for op in rec.ops
                   if 'batch_norm' in op and not op.startswith('prm_det.')]
    assert len(torch_norms) == 1 + 2 * num_blocks + 4, torch_norms


@pytest.mark.parametrize('depth', [18, 50])
def test_inference_block_equals_norm_prm_add_relu(depth, backend):
    """Inference (eval, no_grad), where the kernel writes the tail's result
    over the conv's output: the same result as the plain composition."""
    import copy
    torch.manual_seed(0)
    model = tiny_backbone('PRMResNet', depth).double()
    model.eval()  # (mmdet's ResNet.train returns None)
    block = model.layer2[0]
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        for m in block.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
    plain = copy.deepcopy(block)
    norm_name = 'norm2' if depth < 50 else 'norm3'
    conv_name = 'conv2' if depth < 50 else 'conv3'
    x = torch.randn(2, block.conv1.in_channels, 12, 10, dtype=torch.float64)
    with torch.no_grad():
        out = plain.relu(plain.norm1(plain.conv1(x)))
        if depth >= 50:
            out = plain.relu(plain.norm2(plain.conv2(out)))
        c = getattr(plain, conv_name)(out)
        expected = torch.relu(plain.prm(getattr(plain, norm_name)(c)) +
                              plain.downsample(x))
        x_before = x.clone()
        y = block(x)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    assert torch.equal(x, x_before)  # the block's input is left alone


def _eval_tail_case(case):
    """A PRM module, a BatchNorm2d in eval, c and identity, arranged as
    ``case`` says (what the kernel's inference op can or cannot take)."""
    from prm_det.models.layers import PRM
    torch.manual_seed(7)
    prm = PRM(32, groups=8)
    norm = torch.nn.BatchNorm2d(
        32, track_running_stats=case != 'batch statistics in eval')
    with torch.no_grad():
        for p in list(prm.parameters()) + list(norm.parameters()):
            p.add_(torch.randn_like(p) * 0.3)
        if norm.running_mean is not None:
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2)
    norm.train(case == 'norm in training')
    c = torch.randn(2, 32, 7, 9)
    identity = torch.randn(2, 32, 7, 9)
    if case == 'channels-last c':
        c = c.contiguous(memory_format=torch.channels_last)
    if case == 'strided identity':
        identity = torch.randn(2, 32, 7, 18)[..., ::2]
    if case == 'float64':
        prm, norm = prm.double(), norm.double()
        c, identity = c.double(), identity.double()
    return prm, norm, c, identity


@pytest.mark.parametrize('case', [
    'float32', 'float64', 'norm in training', 'batch statistics in eval',
    'channels-last c', 'strided identity'])
def test_inference_tail_equals_norm_prm_add_relu_and_writes_over_c_where_it_can(
        case):
    """PRM.forward_norm_residual under no_grad on CPU: the kernel's
    inference op, writing over c, for a contiguous float map and a norm in
    eval with running statistics (a strided identity is copied first); the
    kernel's forward op otherwise. Always relu(prm(norm(c)) + id), and the
    norm's running statistics move exactly as norm(c) moves them."""
    import copy

    prm, norm, c, identity = _eval_tail_case(case)
    plain_norm = copy.deepcopy(norm)
    with torch.no_grad():
        expected = torch.relu(prm(plain_norm(c.clone())) + identity)
    over_c = case in ('float32', 'float64', 'strided identity')
    scratch = c.clone()
    with torch.no_grad(), Recorder() as rec:
        y = prm.forward_norm_residual(scratch, norm, identity, reuse_c=True)
    assert rec.ops.count('prm_det.bn_prm_eval_') == int(over_c), rec.ops
    assert rec.ops.count('prm_det.bn_prm_forward') == int(not over_c)
    tol = dict(rtol=1e-5, atol=1e-5) if case != 'float64' else dict(
        rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, expected, **tol)
    if over_c:
        assert y.data_ptr() == scratch.data_ptr()  # written over c
    for key in ('running_mean', 'running_var', 'num_batches_tracked'):
        torch.testing.assert_close(getattr(norm, key),
                                   getattr(plain_norm, key), msg=key)


@pytest.mark.parametrize('where', ['norm3', 'prm'])
@pytest.mark.parametrize('kind', ['forward hook', 'pre-hook'])
def test_hooks_on_the_last_norm_and_on_prm_fire_as_in_resnet(
        where, kind, backend):
    """Feature capture and visualization tools hook a block's last norm or
    its attention: the block then calls them as a plain block does (the
    hook fires once per forward, and a forward hook sees the module's
    output), with the same result as without the hook."""
    torch.manual_seed(0)
    model = tiny_backbone('PRMResNet', 50)
    model.eval()
    block = model.layer1[0]
    module = getattr(block, where)
    seen = []
    if kind == 'forward hook':
        handle = module.register_forward_hook(
            lambda m, args, out: seen.append((args[0].clone(), out.clone())))
    else:
        handle = module.register_forward_pre_hook(
            lambda m, args: seen.append((args[0].clone(), None)))
    x = torch.randn(2, block.conv1.in_channels, 9, 11)
    with torch.no_grad():
        y_hooked = block(x)
    handle.remove()
    with torch.no_grad():
        y = block(x)
    assert len(seen) == 1
    torch.testing.assert_close(y_hooked, y, rtol=1e-5, atol=1e-6)
    inputs, output = seen[0]
    with torch.no_grad():
        out = block.relu(block.norm2(block.conv2(block.relu(block.norm1(
            block.conv1(x))))))
        expected_input = block.conv3(out)
        if where == 'prm':
            expected_input = block.norm3(expected_input)
    torch.testing.assert_close(inputs, expected_input, rtol=1e-5, atol=1e-6)
    if output is not None:
        torch.testing.assert_close(output, module(expected_input),
                                   rtol=1e-5, atol=1e-6)


def test_inference_leaves_a_hooked_conv_output_alone():
    """A forward hook that keeps the last conv's output sees it unchanged:
    with a hook there, the result goes to a new map."""
    torch.manual_seed(0)
    model = tiny_backbone('PRMResNet', 50)
    model.eval()
    block = model.layer1[0]
    kept = []
    handle = block.conv3.register_forward_hook(
        lambda module, args, output: kept.append((output, output.clone())))
    x = torch.randn(2, block.conv1.in_channels, 16, 16)
    with torch.no_grad():
        y_hooked = block(x)
    handle.remove()
    with torch.no_grad():
        y = block(x)
    (output, copy_at_hook), = kept
    assert torch.equal(output, copy_at_hook)
    torch.testing.assert_close(y_hooked, y, rtol=0, atol=0)


BACKWARD_HOOKS = {
    'full backward hook': lambda m, seen: m.register_full_backward_hook(
        lambda mod, grad_in, grad_out: seen.append(grad_out[0].clone())),
    'backward pre-hook': lambda m, seen: m.register_full_backward_pre_hook(
        lambda mod, grad_out: seen.append(grad_out[0].clone())),
}


@pytest.mark.parametrize('depth, where', [(50, 'norm3'), (50, 'prm'),
                                          (18, 'norm2'), (18, 'prm')])
@pytest.mark.parametrize('kind', sorted(BACKWARD_HOOKS))
@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_backward_hooks_on_the_last_norm_and_on_prm_fire(
        depth, where, kind, mode):
    """Gradient inspection hooks a block's last norm or its attention: the
    hook fires once per backward and sees the gradient of the module's
    output, as in a block that calls every module; the block's output and
    its input's gradient are those of the unhooked block."""
    torch.manual_seed(0)
    model = tiny_backbone('PRMResNet', depth)
    model.train(mode == 'train')
    block = model.layer1[0]
    module = getattr(block, where)
    x = torch.randn(2, block.conv1.in_channels, 9, 11)

    def run():
        inp = x.clone().requires_grad_()
        y = block(inp)
        y.backward(torch.ones_like(y))
        return y.detach(), inp.grad

    y, grad = run()
    seen = []
    handle = BACKWARD_HOOKS[kind](module, seen)
    y_hooked, grad_hooked = run()
    handle.remove()
    assert len(seen) == 1
    torch.testing.assert_close(y_hooked, y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_hooked, grad, rtol=1e-4, atol=1e-5)
    # the gradient of the module's output, kept by a forward hook (which
    # the block honours already: it calls every module then)
    kept = []

    def keep(mod, args, out):
        out.retain_grad()
        kept.append(out)

    handle = module.register_forward_hook(keep)
    run()
    handle.remove()
    torch.testing.assert_close(seen[0], kept[0].grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('type_', ['ResNet'] + BACKBONES)
@pytest.mark.parametrize('depth', [18, 50])
def test_an_empty_batch_trains_as_in_resnet(type_, depth):
    """A batch of 0 images (a sampler's last, empty, batch): empty outputs
    and gradients, as mmdet's ResNet, in training mode with the norms
    training too."""
    model = tiny_backbone(type_, depth, norm_eval=False)
    model.train()
    x = torch.randn(0, 3, 64, 32, requires_grad=True)
    outs = model(x)
    expansion = 1 if depth < 50 else 4
    assert [tuple(o.shape) for o in outs] == [
        (0, 16 * expansion * 2**i, 64 // 2**(i + 2), 32 // 2**(i + 2))
        for i in range(4)]
    sum(o.sum() for o in outs).backward()
    assert x.grad.shape == x.shape
