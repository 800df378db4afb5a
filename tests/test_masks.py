"""lab.masks: Jaccard overlap arithmetic, per-layer / per-module tables, packed storage, moved fraction."""
import pytest
import torch

from lab import masks, runs

NAMES = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"]


def _m(*rows):
    return [torch.tensor(r, dtype=torch.bool) for r in rows]


def test_jaccard_hand_values():
    a = _m([1, 1, 0, 0], [[1, 0], [0, 1]])
    b = _m([1, 0, 1, 0], [[1, 1], [0, 0]])
    # intersection: 1 (first) + 1 (second) = 2; union: 3 + 3 = 6
    assert masks.intersection_union(a, b) == (2, 6)
    assert masks.jaccard(a, b) == pytest.approx(2 / 6)
    assert masks.jaccard(a, a) == 1.0
    empty = _m([0, 0, 0, 0], [[0, 0], [0, 0]])
    assert masks.jaccard(empty, empty) == 0.0          # both empty: 0 by definition
    assert masks.jaccard(a, empty) == 0.0
    # numpy arrays work the same
    assert masks.jaccard([x.numpy() for x in a], [x.numpy() for x in b]) == pytest.approx(1 / 3)


def test_jaccard_rejects_mismatched_masks():
    with pytest.raises(ValueError, match="2 and 1 tensors"):
        masks.jaccard(_m([1], [1]), _m([1]))
    with pytest.raises(ValueError, match=r"shapes \(2,\) and \(3,\)"):
        masks.jaccard(_m([1, 0]), _m([1, 0, 1]))


def test_overlap_table_global_per_layer_and_module():
    t0 = _m([1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1])
    t1 = _m([1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0])
    t2 = _m([0, 0, 1, 1], [1, 0, 0, 0], [0, 0, 1, 1])
    df = masks.overlap_table({0: t0, 1: t1, 2: t2}, NAMES)
    assert list(df.columns) == runs.MASK_COLUMNS
    assert set(df["scope"]) == {"global", "layer.0", "layer.1", "module.embed", "module.mlp", "module.attn"}
    assert set(zip(df["task_a"], df["task_b"])) == {(0, 1), (0, 2), (1, 2)}
    get = df.set_index(["task_a", "task_b", "scope"])["jaccard"]
    # 0 vs 1: embed 1/2, mlp 1/2, attn 0/4 -> global (1+1+0)/(2+2+4) = 2/8
    assert get[(0, 1, "global")] == pytest.approx(2 / 8)
    assert get[(0, 1, "layer.0")] == pytest.approx(1 / 2) and get[(0, 1, "module.mlp")] == pytest.approx(1 / 2)
    assert get[(0, 1, "layer.1")] == 0.0 and get[(0, 1, "module.attn")] == 0.0
    # 1 vs 2: attn both... t1 attn empty, t2 attn 2 -> 0/2; embed 0/3; mlp 1/2 -> global 1/7
    assert get[(1, 2, "global")] == pytest.approx(1 / 7)
    assert get[(0, 2, "module.attn")] == pytest.approx(2 / 4)


def test_overlap_table_goes_into_a_run(tmp_path):
    df = masks.overlap_table({0: _m([1, 0]), 1: _m([1, 1])}, ["model.layers.0.mlp.down_proj.weight"])
    with runs.create_run({"kind": "continual"}, root=tmp_path) as run:
        run.log_masks(df)
    back = runs.load_run(run.path).masks
    assert back.set_index("scope").loc["global", "jaccard"] == pytest.approx(0.5)


def test_packed_storage_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    mask = [torch.rand(13, generator=g) > 0.5, torch.rand(3, 5, generator=g) > 0.3, torch.zeros(0, dtype=torch.bool)]
    names = ["a.weight", "model.layers.2.mlp.up_proj.weight", "empty"]
    path = tmp_path / "m.npz"
    masks.save_mask(path, mask, names)
    back, back_names = masks.load_mask(path)
    assert back_names == names
    for a, b in zip(mask, back):
        assert a.shape == b.shape and torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="no mask file"):
        masks.load_mask(tmp_path / "missing.npz")


def test_counts_union_active_and_moved_fraction():
    a, b = _m([1, 0, 0, 0], [1, 1]), _m([0, 0, 1, 0], [0, 1])
    assert [m.tolist() for m in masks.union(a, b)] == [[True, False, True, False], [True, True]]
    assert masks.active_fraction(a) == pytest.approx(3 / 6)
    counts = masks.mask_counts(a, ["model.layers.3.mlp.up_proj.weight", "lm_head.weight"], task=1)
    assert counts[["active", "numel"]].values.tolist() == [[1, 4], [2, 2]]
    assert counts["layer"].tolist()[0] == 3 and counts["module"].tolist() == ["mlp", "lm_head"]
    before = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([[0.0, 0.0]])]
    after = [torch.tensor([1.0, 2.5, 3.0]), torch.tensor([[0.0, -1.0]])]
    assert masks.moved_fraction(before, after) == pytest.approx(2 / 5)
