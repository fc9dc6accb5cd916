"""attention_stages is one True/False flag per stage; anything else (a
string, a single bool) is the ValueError a tuple of the wrong length gets."""
import pytest
from mmdet.registry import MODELS


@pytest.mark.parametrize('stages', [
    'FFFF', 'TFTT', '', False, True, 1, (True, False),
    (True, 'F', True, True), ('yes', ) * 4, (True, None, True, True),
    (2, 1, 1, 1), {0: True, 1: True, 2: True, 3: True},
], ids=repr)
def test_anything_but_one_flag_per_stage_is_a_value_error(stages):
    with pytest.raises(ValueError) as info:
        MODELS.build(dict(type='PRMResNet', depth=18,
                          attention_stages=stages))
    message = str(info.value)
    assert 'attention_stages needs one flag per stage (4 for num_stages=4)'\
        in message
    assert f'got {stages!r}' in message
    assert '(False, True, True, True)' in message  # what a right one is


@pytest.mark.parametrize('stages', [(False, True, True, True),
                                    [0, 1, 1, 1]], ids=repr)
def test_a_tuple_or_list_of_flags_places_the_attention(stages):
    model = MODELS.build(dict(type='PRMResNet', depth=18,
                              attention_stages=stages))
    assert model.attention_stages == (False, True, True, True)
    assert not hasattr(model.layer1[0], 'prm')
    assert all(hasattr(getattr(model, f'layer{i}')[0], 'prm')
               for i in (2, 3, 4))


def test_num_stages_sets_how_many_flags():
    three = dict(type='PRMResNet', depth=18, num_stages=3,
                 strides=(1, 2, 2), dilations=(1, 1, 1), out_indices=(0, 1, 2))
    model = MODELS.build(dict(three, attention_stages=(True, False, True)))
    assert model.attention_stages == (True, False, True)
    assert [hasattr(getattr(model, f'layer{i}')[0], 'prm')
            for i in (1, 2, 3)] == [True, False, True]
    with pytest.raises(ValueError, match='3 for num_stages=3'):
        MODELS.build(dict(three, attention_stages='TFT'))
