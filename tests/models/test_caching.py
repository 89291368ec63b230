"""Feature caching (nrdm.models.caching): interval 1 is the uncached computation bit for bit on
every backbone; larger intervals skip the deep section on the steps between full evaluations
(counted in block calls, not seconds) and reuse what the last full evaluation stored."""
import pytest
import torch

from nrdm.diffusion import VPSchedule, eps_predictor, sample
from nrdm.models import build_model
from nrdm.models.caching import FeatureCache, feature_cache

BACKBONES = {
    "flow": dict(backbone="flow", width=32, depth=4, heads=2, patch_size=2),
    "u-transformer": dict(backbone="u-transformer", width=32, depth=5, heads=2, patch_size=2),
    "unet": dict(backbone="unet", width=16, depth=1, heads=1, channel_mult=(1, 2), attention_resolution=4),
    "video": dict(backbone="video", width=32, depth=4, heads=2, patch_size=2, num_frames=3),
    "multires": dict(backbone="multires", width=32, depth=3, heads=2, patch_size=2, branch_widths=(16,),
                     branch_depths=(1,), variant="nrdm"),
    "unet-video": dict(backbone="unet", width=16, depth=1, heads=1, channel_mult=(1, 2), attention_resolution=4,
                       num_frames=3),
}


def _model(name):
    torch.manual_seed(0)
    model = build_model(None, image_size=8, in_channels=1, num_classes=3, **BACKBONES[name]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))              # off the zero init, so every layer matters
    return model


def _run(model, interval, steps=6):
    schedule = VPSchedule("linear")
    x = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(1))
    eps_fn = eps_predictor(model, schedule, torch.tensor([0, 2]), cfg_scale=2.0)
    with feature_cache(model, interval) as cache:
        stepped = eps_fn if cache is None else (lambda x, t: cache.step() or eps_fn(x, t))
        return sample(stepped, x, schedule, "dpm++2m", steps)


def _count_leaf_blocks(model):
    """Calls of the modules that hold gated units' branches (attention / MLP / conv stages)."""
    calls = []
    units = [m for m in model.modules() if type(m).__name__ == "GatedResidual"]
    handles = [u.register_forward_hook(lambda *_: calls.append(1)) for u in units]
    return calls, handles


@pytest.mark.parametrize("name", list(BACKBONES))
def test_interval_one_is_the_uncached_computation(name):
    model = _model(name)
    assert torch.equal(_run(model, 1), _run(model, 1)) and model.feature_cache is None
    plain = _run(model, 1)
    cache = FeatureCache(1)                                  # a cache that is always full
    model.feature_cache = cache
    schedule = VPSchedule("linear")
    x = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(1))
    eps_fn = eps_predictor(model, schedule, torch.tensor([0, 2]), cfg_scale=2.0)
    forced = sample(lambda x, t: cache.step() or eps_fn(x, t), x, schedule, "dpm++2m", 6)
    model.feature_cache = None
    assert torch.equal(forced, plain)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_cached_steps_skip_the_deep_section(name):
    model = _model(name)
    calls, handles = _count_leaf_blocks(model)
    _run(model, 1)
    full = len(calls)
    calls.clear()
    cached = _run(model, 3)
    for h in handles:
        h.remove()
    assert len(calls) < full * (1 / 3 + 2 / 3 * 0.75), (len(calls), full)   # 4 of 6 steps skip >= 25% of units
    close = (cached - _run(model, 1)).abs().max() / _run(model, 1).abs().max()
    assert close < 0.5                                          # an approximation of the same samples


def test_reuse_adds_the_stored_change():
    """On a reusing step the section is not run: its input plus the change stored at the last
    full step comes out; a batch of another shape is computed (and stored) afresh."""
    model = _model("flow")
    runs = []
    section = lambda z: runs.append(z.shape) or z * 2
    cache = FeatureCache(2)
    model.feature_cache = cache
    z1, z2 = torch.ones(2, 3), torch.full((2, 3), 5.0)
    cache.step()
    assert torch.equal(model.cached("s", z1, section), z1 * 2)
    cache.step()
    assert torch.equal(model.cached("s", z2, section), z2 + z1)        # change stored at z1: + z1
    assert torch.equal(model.cached("s", torch.ones(4, 3), section), torch.full((4, 3), 2.0))   # new shape: computed
    assert len(runs) == 2
    model.feature_cache = None
    with pytest.raises(ValueError, match="cache interval must be >= 1"):
        FeatureCache(0)
