"""COCO box AP as prm_det's tools report it: the six numbers of the
paper's Table 4, in %, from the metrics mmdet's ``CocoMetric`` returns."""
from typing import Dict, Optional

# (name in the paper's table, the CocoMetric key after its prefix)
AP_KEYS = (('AP', 'bbox_mAP'), ('AP50', 'bbox_mAP_50'),
           ('AP75', 'bbox_mAP_75'), ('APs', 'bbox_mAP_s'),
           ('APm', 'bbox_mAP_m'), ('APl', 'bbox_mAP_l'))


def box_ap(metrics: dict) -> Dict[str, Optional[float]]:
    """The six COCO box AP numbers of the evaluator's ``metrics`` in %, by
    name ('AP', 'AP50', ...); None where COCO reports -1 (the split has no
    object of that size). Empty when the metrics have no box AP."""
    if not any(k.endswith('bbox_mAP') for k in metrics):
        return {}
    prefix = next((k.rsplit('/', 1)[0] + '/' for k in metrics
                   if k.endswith('bbox_mAP')), '')
    # the evaluator's 3 decimals are 1 in %
    return {name: round(100 * metrics[prefix + key], 1)
            if metrics[prefix + key] >= 0 else None
            for name, key in AP_KEYS}


def format_ap_table(metrics: dict) -> str:
    """The six COCO box AP numbers in %, one header row, one value row."""
    ap = box_ap(metrics)
    values = [f'{v:.1f}' if v is not None else 'n/a' for v in ap.values()]
    return ('| ' + ' | '.join(ap) + ' |\n|' + '---|' * len(ap) +
            '\n| ' + ' | '.join(values) + ' |')
