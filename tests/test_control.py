"""SIMS distribution control (sims/stages/control*.py): composition rule, selection, judges, checks, report."""
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from sims.errors import ConfigError, InputError, MissingFileError, WeightsError
from sims.stages import control as C
from sims.stages.control_config import check_control
from sims.stages.control_judges import load_judge
from sims.stages.control_report import reweighted_moments, share_intervals, wilson_interval

UNIFORM = {g: 0.1 for g in range(10)}


# ------------------------------------------------------------------------------------ composition
def test_spec_example_prediction():
    """SPEC §1: b_0 = 0.10, a_0 = 0.02, others ≈ 0.109 → ≈ 21% zeros at ω = 0.5, ≈ 38% at ω = 1."""
    aux = {0: 0.02, **{g: 0.98 / 9 for g in range(1, 10)}}
    p_half = C.predicted_shares(UNIFORM, aux, 0.5)
    p_one = C.predicted_shares(UNIFORM, aux, 1.0)
    assert round(p_half[0], 2) == 0.21 and round(p_one[0], 2) == 0.38
    assert p_half[0] == pytest.approx(0.2236 / (0.2236 + 9 * 0.09583), abs=1e-3)
    assert sum(p_one.values()) == pytest.approx(1.0)
    assert C.predicted_shares(UNIFORM, aux, 0.0) == pytest.approx(UNIFORM)  # ω = 0 is the base


def test_composition_exact_at_design_omega_several_groups():
    base = {0: 0.05, 1: 0.15, 2: 0.30, 3: 0.20, 4: 0.30}
    target = {0: 0.15, 1: 0.10, 3: 0.30}  # raise 0 and 3, lower 1; 2 and 4 share the rest
    full = C.full_target(target, base)
    assert full == pytest.approx({0: 0.15, 1: 0.10, 2: 0.225, 3: 0.30, 4: 0.225})
    for omega in (0.25, 0.5, 1.0, 2.0):
        aux = C.compose_aux_shares(target, base, omega, floor=0.0)
        assert sum(aux.values()) == pytest.approx(1.0)
        assert C.predicted_shares(base, aux, omega) == pytest.approx(full, abs=1e-12)
        # over-represent what should be reduced, under-represent what should be raised
        assert aux[0] < base[0] and aux[3] < base[3] and aux[1] > base[1]
        # away from ω*, not exact: at ω*/2 a raised group lies strictly between base and target
        half = C.predicted_shares(base, aux, omega / 2)
        assert base[0] < half[0] < full[0]
    # a non-binding floor changes nothing
    assert C.compose_aux_shares(target, base, 1.0, floor=0.005) == pytest.approx(
        C.compose_aux_shares(target, base, 1.0, floor=0.0))


def test_unlisted_groups_share_the_rest_by_base_share():
    base = [0.2, 0.3, 0.5]
    assert C.full_target({0: 0.4}, base) == pytest.approx({0: 0.4, 1: 0.225, 2: 0.375})
    assert C.full_target({0: 0.4, 1: 0.6}, base) == pytest.approx({0: 0.4, 1: 0.6, 2: 0.0})
    with pytest.raises(InputError, match="sum to 0.9"):
        C.full_target({0: 0.3, 1: 0.3, 2: 0.3}, base)
    with pytest.raises(InputError, match="> 1"):
        C.full_target({0: 0.7, 1: 0.6}, base)


def test_group_counts_largest_remainder():
    aux = C.compose_aux_shares({0: 0.2}, UNIFORM, 1.0)  # a_0 ∝ b²/t: 0.05 vs 0.1125 → 0.04706, 0.10588
    assert aux[0] == pytest.approx(0.05 / 1.0625)
    counts = C.group_counts(aux, 1000)
    assert counts == {0: 47, **{g: 106 for g in range(1, 9)}, 9: 105}
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 3000):
        shares = dict(enumerate(rng.dirichlet(np.ones(6))))
        c = C.group_counts(shares, n)
        assert sum(c.values()) == n and all(abs(c[g] - shares[g] * n) < 1 for g in c)
    assert C.group_counts([0.5, 0.5], 3) == {0: 2, 1: 1}  # a tie goes to the smaller group id
    with pytest.raises(InputError):
        C.group_counts(UNIFORM, -1)


def test_floor_and_its_effect_on_the_prediction():
    # t_0 = 0.5 at ω* = 0.5 asks a_0 ≈ 0.00137 < floor: floored, prediction falls short of the target
    aux = C.compose_aux_shares({0: 0.5}, UNIFORM, 0.5, floor=0.005)
    assert aux[0] == 0.005 and sum(aux.values()) == pytest.approx(1.0)
    assert C.compose_aux_shares({0: 0.5}, UNIFORM, 0.5, floor=0.0)[0] == pytest.approx(0.1 ** 3 / 0.25 / (
        0.1 ** 3 / 0.25 + 9 * 0.1 ** 3 / (0.5 / 9) ** 2))
    p = C.predicted_shares(UNIFORM, aux, 0.5)
    assert 0.3 < p[0] < 0.5  # below target
    assert all(p[g] > 0.5 / 9 for g in range(1, 10))  # the others share the freed mass
    assert p[1] == pytest.approx(p[7])  # unfloored groups keep the target's ratios
    # several groups under the floor at once, one pushed under only by the rescaling
    base = {0: 0.001, 1: 0.004, 2: 0.0101, 3: 0.4849, 4: 0.5}  # 2 is above the floor until 0, 1 are raised
    a = C.compose_aux_shares({0: 0.001, 1: 0.004, 2: 0.0101}, base, 1.0, floor=0.01)
    assert a[0] == a[1] == a[2] == 0.01 and sum(a.values()) == pytest.approx(1.0)
    assert a[3] / a[4] == pytest.approx(0.4849 / 0.5)
    # a group the base never made gets no share and no floor; a positive target for it is refused
    a = C.compose_aux_shares({0: 0.3}, {0: 0.2, 1: 0.8, 2: 0.0}, 1.0)
    assert a[2] == 0.0
    with pytest.raises(InputError, match="no samples of group"):
        C.compose_aux_shares({2: 0.1}, {0: 0.2, 1: 0.8, 2: 0.0}, 1.0)
    # a zero target: those groups take the set, the rest is floored
    z = C.compose_aux_shares({0: 0.0}, UNIFORM, 1.0, floor=0.01)
    assert z[0] == pytest.approx(0.91) and z[5] == 0.01
    with pytest.raises(InputError, match="omega > 0"):
        C.compose_aux_shares({0: 0.2}, UNIFORM, 0.0)
    with pytest.raises(InputError, match="floor"):
        C.compose_aux_shares({0: 0.2}, UNIFORM, 1.0, floor=0.2)
    with pytest.raises(InputError, match="apply a floor"):
        C.predicted_shares(UNIFORM, {0: 0.0, 1: 1.0}, 1.0)


# -------------------------------------------------------------------------------------- selection
def test_select_synthetic_and_shortfalls():
    labels = np.array([0, 1, 1, -1, 2, 1, 0, 2, 1, 1])
    sel = C.select_synthetic(labels, {0: 2, 1: 3, 2: 1})
    assert sel.ok and sel.indices.tolist() == [0, 1, 2, 4, 5, 6]  # first of each group, in seed order
    short = C.select_synthetic(labels, {0: 3, 1: 2, 2: 4})
    assert not short.ok and short.indices is None and short.shortfalls == [(0, 2, 3), (2, 2, 4)]
    # a larger pool keeps every earlier choice
    grown = C.select_synthetic(np.concatenate([labels, [0, 2, 2]]), {0: 3, 1: 2, 2: 4})
    assert grown.ok and set(C.select_synthetic(labels, {0: 2, 1: 2, 2: 2}).indices) <= set(grown.indices)
    assert C.pool_size_needed(short.shortfalls, 10) == 20  # group 2: 4 needed at 2 per 10
    err = C.shortfall_error(short.shortfalls, 10, 10)
    msg = str(err)
    assert isinstance(err, ConfigError) and "\n" not in msg
    assert "needs 4 samples judged as group 2 but only 2 of 10" in msg and "group 0 2/3" in msg
    assert "sims.control.max_synthetic=10" in msg


def test_judge_labels_confidence_and_composition_from_labels():
    def probs(x):
        v = x.reshape(len(x), -1)[:, 0]
        return torch.stack([(v > 0).float() * 0.9 + 0.05, (v <= 0).float() * 0.9 + 0.05], 1)

    judge = C.Judge("toy", probs, 2, 0.5)
    x = torch.tensor([0.5, -0.5, 1.0, -1.0]).reshape(4, 1, 1, 1)
    assert C.judge_labels(judge, x).tolist() == [0, 1, 0, 1]
    assert C.judge_labels(judge, x, min_confidence=0.99).tolist() == [-1, -1, -1, -1]
    assert C.shares_from_labels([0, 1, 1, -1], 3) == pytest.approx({0: 1 / 3, 1: 2 / 3, 2: 0.0})


# ----------------------------------------------------------------------------------------- judges
@pytest.fixture
def user_judges(monkeypatch):
    """A user's judge package, 'simsctl_judges:...', as it would be installed."""
    mod = types.ModuleType("simsctl_judges")

    def good(weights, device):
        w = weights["w"].to(device) if weights else torch.zeros(64, 10, device=device)
        return lambda x: torch.softmax(x.reshape(len(x), -1)[:, :64] @ w, dim=1)

    def three(weights, device):
        return lambda x: torch.full((len(x), 3), 1 / 3)

    def logits(weights, device):
        return lambda x: torch.randn(len(x), 10) * 5

    mod.good, mod.three, mod.logits, mod.not_callable = good, three, logits, 42
    monkeypatch.setitem(sys.modules, "simsctl_judges", mod)
    return mod


def test_entry_point_judge(user_judges, tmp_path):
    from safetensors.torch import save_file

    w = torch.zeros(64, 10)
    w[0, 3] = 50.0  # pixel 0 bright → class 3
    weights = str(tmp_path / "judge.safetensors")
    save_file({"w": w}, weights)
    judge = load_judge("simsctl_judges:good", device="cpu", num_classes=10, weights=weights)
    x = torch.full((4, 1, 8, 8), -1.0)
    x[:2, 0, 0, 0] = 1.0
    p = judge.probabilities(x)
    assert judge.name == "good" and judge.num_classes == 10 and p.shape == (4, 10)
    assert p.argmax(1).tolist()[:2] == [3, 3] and p[2].max() < 0.5
    assert load_judge("simsctl_judges:good", device="cpu", num_classes=10).probabilities(x) == pytest.approx(
        torch.full((4, 10), 0.1))
    with pytest.raises(InputError, match="has 3 classes, the data has 10"):
        load_judge("simsctl_judges:three", device="cpu", num_classes=10).probabilities(x)
    with pytest.raises(InputError, match="not probabilities"):
        load_judge("simsctl_judges:logits", device="cpu", num_classes=10).probabilities(x)
    for spec, match in [("nosuchpkg_xyz.mod:f", "no module named 'nosuchpkg_xyz'"),
                        ("simsctl_judges:missing", "has no 'missing'"),
                        ("simsctl_judges:not_callable", "not a function"),
                        ("simsctl_judges.good", "package.module:function")]:
        with pytest.raises(ConfigError, match=match):
            load_judge(spec, device="cpu", num_classes=10)
    torch.save({"w": w}, tmp_path / "judge.pt")  # a pickle: refused, never opened by torch.load
    with pytest.raises(WeightsError, match="never a pickle"):
        load_judge("simsctl_judges:good", device="cpu", num_classes=10, weights=str(tmp_path / "judge.pt"))
    with pytest.raises(MissingFileError):
        load_judge("simsctl_judges:good", device="cpu", num_classes=10, weights=str(tmp_path / "none.safetensors"))
    with pytest.raises(ConfigError, match="10 digit classes"):
        load_judge("digits", device="cpu", num_classes=5)


def test_pixel_judge_accuracy_and_agreement_with_cnn():
    from sklearn.model_selection import train_test_split

    from sims.data.digits import load_digits_arrays
    from sims.metrics.pixel_judge import load_pixel_digits_info

    images, labels = load_digits_arrays(8)
    _, idx_te = train_test_split(np.arange(len(labels)), test_size=0.25, stratify=labels.numpy(), random_state=0)
    pixel = load_judge("pixel-digits", device="cpu", num_classes=10)
    cnn = load_judge("digits", device="cpu", num_classes=10)
    p = pixel.probabilities(images)
    assert p.shape == (1797, 10) and torch.allclose(p.sum(1), torch.ones(1797), atol=1e-5)
    pred = p.argmax(1)
    acc = float((pred[idx_te] == labels[idx_te]).float().mean())
    print(f"pixel judge held-out accuracy {acc:.4f}")
    assert acc >= 0.96 and acc == pytest.approx(load_pixel_digits_info()["test_accuracy"], abs=1e-6)
    agree = float((pred == cnn.probabilities(images).argmax(1)).float().mean())
    print(f"pixel judge agrees with the CNN on {agree:.4f} of the real digits")
    assert agree >= 0.95
    up = load_digits_arrays(16)[0]  # 16×16 inputs are pooled to 8×8 first
    assert (pixel.probabilities(up).argmax(1) == labels).float().mean() > 0.95


def test_check_control(user_judges, tmp_path):
    good = {"enabled": True, "target": {0: 0.2}, "omega": 1.0, "floor": 0.005, "judge": "digits",
            "judge_weights": None, "max_synthetic": 6000, "independent_judge": "pixel-digits"}
    check_control(good, 10, data_shape=(1, 8, 8), num_synthetic=3000)
    check_control(OmegaConf.create({**good, "target": {"0": 0.2}}), 10)  # string keys from overrides
    check_control(SimpleNamespace(**good), 10)
    check_control({**good, "enabled": False, "omega": -1}, 10)  # disabled: not checked
    check_control({**good, "judge": "simsctl_judges:good", "independent_judge": None}, 10, data_shape=(1, 8, 8))
    bad = [({"target": {0: 1.5}}, "sims.control.target.0=1.5"),
           ({"target": {0: 0.6, 1: 0.6}}, "sum to 1.2 > 1"),
           ({"target": {10: 0.1}}, "sims.control.target.10: unknown group"),
           ({"target": {}}, "sims.control.target must map"),
           ({"target": {g: 0.05 for g in range(10)}}, "not 1"),
           ({"omega": 0}, "sims.control.omega"),
           ({"floor": 0.5}, "sims.control.floor"),
           ({"judge": "nosuchpkg_xyz:f"}, "no module named"),
           ({"judge": "simsctl_judges:three"}, "has 3 classes, the data has 10"),
           ({"judge": "simsctl_judges:good", "judge_weights": str(tmp_path / "no.safetensors")}, "no such file"),
           ({"judge_weights": str(tmp_path / "no.safetensors")}, "only for a judge given as"),
           ({"max_synthetic": 1000}, "below sims.num_synthetic=3000"),
           ({"independent_judge": "digits"}, "is the judge that composes"),
           ({"independent_judge": "simsctl_judges:missing"}, "has no 'missing'")]
    for change, match in bad:
        with pytest.raises(InputError, match=match) as info:
            check_control({**good, **change}, 10, data_shape=(1, 8, 8), num_synthetic=3000)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="10 digit classes"):
        check_control({**good, "target": {0: 0.2}}, 5)
    with pytest.raises(ConfigError, match="8x8 or 16x16"):
        check_control(good, 10, data_shape=(3, 32, 32))


# ----------------------------------------------------------------------------------------- report
def test_wilson_intervals():
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    table = share_intervals([30, 70])
    assert table[1]["share"] == 0.7 and table[1]["low"] < 0.7 < table[1]["high"]
    lo, hi = wilson_interval(30, 100)
    assert table[0]["low"] == lo and hi - lo < 0.2
    with pytest.raises(InputError):
        share_intervals([0, 0])


def test_reweighted_moments_by_hand():
    x = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    mu, sigma = reweighted_moments(x, [0, 0, 1], {0: 0.5, 1: 0.5})
    # weights 0.25, 0.25, 0.5; μ = (0.5, 2); Σ w d dᵀ = [[0.75, −1], [−1, 4]], / (1 − 0.375)
    assert mu == pytest.approx([0.5, 2.0])
    assert sigma == pytest.approx(np.array([[1.2, -1.6], [-1.6, 6.4]]))
    rng = np.random.default_rng(0)
    f = rng.normal(size=(40, 3))
    lab = np.repeat([0, 1], 20)
    mu, sigma = reweighted_moments(torch.from_numpy(f), lab, {0: 0.5, 1: 0.5})  # = the shares: plain moments
    assert mu == pytest.approx(f.mean(0)) and sigma == pytest.approx(np.cov(f, rowvar=False))
    mu, _ = reweighted_moments(f, lab, {0: 1.0, 1: 0.0})  # t = 0 drops a group
    assert mu == pytest.approx(f[:20].mean(0))
    with pytest.raises(InputError, match="no target share"):
        reweighted_moments(f, lab, {0: 1.0})
    with pytest.raises(InputError, match="no real item"):
        reweighted_moments(f, lab, {0: 0.5, 1: 0.25, 2: 0.25})
