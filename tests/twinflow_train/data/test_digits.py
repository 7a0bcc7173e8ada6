import numpy as np
import pytest
import torch

from twinflow_train.data.digits import NULL_LABEL, NUM_CLASSES, eval_prompts, load_digits_split


def test_split_is_deterministic_and_depends_on_seed():
    a = load_digits_split(val_fraction=0.1, split_seed=0)
    b = load_digits_split(val_fraction=0.1, split_seed=0)
    c = load_digits_split(val_fraction=0.1, split_seed=1)
    assert torch.equal(a.val_images, b.val_images) and torch.equal(a.train_labels, b.train_labels)
    assert np.array_equal(a.val_index, b.val_index)
    assert not np.array_equal(a.val_index, c.val_index)


def test_split_is_disjoint_and_covers_the_dataset():
    s = load_digits_split(val_fraction=0.1, split_seed=3)
    assert np.intersect1d(s.train_index, s.val_index).size == 0
    assert np.array_equal(np.sort(np.concatenate([s.train_index, s.val_index])), np.arange(1797))
    assert s.train_images.shape[0] + s.val_images.shape[0] == 1797


@pytest.mark.parametrize("fraction", [0.1, 0.25])
def test_split_is_stratified(fraction):
    s = load_digits_split(val_fraction=fraction, split_seed=0)
    all_labels = torch.cat([s.train_labels, s.val_labels])
    for c in range(NUM_CLASSES):
        n_c = int((all_labels == c).sum())
        assert int((s.val_labels == c).sum()) == round(fraction * n_c)


def test_images_and_labels_format():
    s = load_digits_split(val_fraction=0.1, split_seed=0)
    for x, y in ((s.train_images, s.train_labels), (s.val_images, s.val_labels)):
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8)
        assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
        assert float(x.min()) == -1.0 and float(x.max()) == 1.0
        assert set(y.unique().tolist()) == set(range(NUM_CLASSES))
    # pixel 16 maps to 1, 0 to -1, 8 to 0: the scale is pixel / 16 * 2 - 1
    from sklearn.datasets import load_digits
    raw = load_digits().images[s.val_index[0]]
    assert torch.allclose(s.val_images[0, 0], torch.from_numpy(raw / 16 * 2 - 1).float())


def test_bad_fraction_is_rejected():
    with pytest.raises(ValueError, match="val_fraction"):
        load_digits_split(val_fraction=0.0, split_seed=0)
    with pytest.raises(ValueError, match="val_fraction"):
        load_digits_split(val_fraction=0.999, split_seed=0)


def test_eval_prompts_order():
    p = eval_prompts(per_class=3)
    assert p.dtype == torch.int64
    assert p.tolist() == [c for c in range(NUM_CLASSES) for _ in range(3)]
    assert NULL_LABEL == NUM_CLASSES and NULL_LABEL not in p.tolist()
    with pytest.raises(ValueError, match="per_class"):
        eval_prompts(per_class=0)
