import torch
from torch import nn

from backdoor.attacks import BadNets
from backdoor.data import ImageSet
from backdoor.metrics import correct_mask, evaluate

C, H = 4, 8


class Oracle(nn.Module):
    """Reads the class from pixel (2, 2), which no patch covers (value = label / 10); answers the target when the
    bottom-right trigger pixel pattern is present and `backdoored` is set."""

    def __init__(self, backdoored: bool, wrong_label: int | None = None):
        super().__init__()
        self.backdoored, self.wrong_label = backdoored, wrong_label

    def forward(self, x):
        label = (x[:, 0, 2, 2] * 10).round().long()
        if self.wrong_label is not None:  # misclassify one class on clean images
            label = torch.where(label == self.wrong_label, (label + 1) % C, label)
        triggered = (x[:, 0, H - 2, H - 2] == 1.0) & (x[:, 0, H - 2, H - 1] == 0.0)
        if self.backdoored:
            label = torch.where(triggered, torch.zeros_like(label), label)
        return nn.functional.one_hot(label, C).float()


def _test_set():
    y = torch.arange(40) % C
    x = torch.full((40, 1, H, H), 128, dtype=torch.uint8)
    x[:, 0, 2, 2] = (y * 25.5).round().to(torch.uint8)  # /255 * 10 -> label
    return ImageSet(x, y)


def test_backdoored_oracle_has_full_asr_and_zero_ra():
    attack = BadNets((1, H, H), C, target=0, trigger_size=2)
    m = evaluate(Oracle(True), _test_set(), attack, batch_size=16)
    assert m["acc"] == 100.0 and m["asr"] == 100.0 and m["asr_eq9"] == 100.0 and m["ra"] == 0.0
    assert m["asr_x4"] == 100.0 and m["asr_x9"] == 100.0


def test_clean_oracle_has_zero_asr_and_full_ra():
    attack = BadNets((1, H, H), C, target=0, trigger_size=2)
    m = evaluate(Oracle(False), _test_set(), attack)
    assert m["acc"] == 100.0 and m["asr"] == 0.0 and m["ra"] == 100.0


def test_eq9_counts_only_images_the_reference_classifies_correctly():
    attack = BadNets((1, H, H), C, target=0, trigger_size=2)
    data = _test_set()
    backdoored_but_wrong_on_class_1 = Oracle(True, wrong_label=1)
    m = evaluate(backdoored_but_wrong_on_class_1, data, attack)
    assert m["acc"] == 75.0 and m["asr"] == 100.0 and m["asr_eq9"] == 100.0
    # a purified model judged against a reference that gets class 1 wrong: Eq. 9 skips class 1
    ref = correct_mask(backdoored_but_wrong_on_class_1, data)
    assert ref.sum() == 30
    half = Oracle(False)
    m2 = evaluate(half, data, attack, reference_correct=ref)
    assert m2["asr_eq9"] == 0.0 and m2["acc"] == 100.0


def test_evaluate_without_attack_and_restores_train_mode():
    model = Oracle(True).train()
    m = evaluate(model, _test_set(), None)
    assert set(m) == {"acc", "top_class", "top_share", "class_acc_min", "class_acc_max", "class_acc"} and model.training
    assert len(m["class_acc"]) == 4 and min(m["class_acc"]) == m["class_acc_min"]   # the 4 test classes
    assert m["acc"] == 100.0 and m["class_acc_min"] == 100.0
