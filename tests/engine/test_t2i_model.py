"""The text-to-image generator (r2d2.engine.tasks.t2i.model): the conditioning path, classifier-
free guidance, condition dropout, EMA, save/load, the latent (VAE) path, and its config checks."""

import sys

import pytest
import torch

from _helpers.t2i import PROMPTS, batch, small_generator
from r2d2.engine.errors import UsageError
from r2d2.engine.tasks.t2i.config import T2IConfig
from r2d2.engine.tasks.t2i.model import T2IModel, diffusers_module
from r2d2.engine.validate import ConfigError


@pytest.fixture(scope="module")
def gen():
    return small_generator(seed=0)


def test_same_prompt_and_seed_give_the_same_image_and_the_prompt_changes_it(gen):
    a = gen.sample(PROMPTS[:2], seed=3)
    b = gen.sample(PROMPTS[:2], seed=3)
    assert torch.equal(a, b)
    other = gen.sample([PROMPTS[2], PROMPTS[1]], seed=3)
    assert not torch.allclose(a[0], other[0], atol=1e-4)  # only the prompt changed
    torch.testing.assert_close(a[1], other[1], atol=1e-5, rtol=0)  # its batch-mate did not
    assert not torch.allclose(a, gen.sample(PROMPTS[:2], seed=4), atol=1e-4)  # the seed matters
    assert a.shape == (2, 3, 16, 16) and a.min() >= 0 and a.max() <= 1


def test_empty_prompt_is_the_null_condition(gen):
    cond = gen.encode_prompts(["", PROMPTS[0]])
    null = gen.ema.null_condition(2, cond[0].shape[1])
    assert cond[2] is not None  # pooled conditioning is on by default
    for got, want in zip(cond, null):
        assert torch.equal(got[0], want[0]) and not torch.equal(got[1], want[1])


@pytest.mark.parametrize("g", [0.0, 1.0, 2.5])
def test_guidance(gen, g):
    torch.manual_seed(1)
    den = gen.ema
    x, t = torch.randn(3, 3, 16, 16), torch.randint(0, 1000, (3,))
    cond = gen.encode_prompts(PROMPTS)
    null = den.null_condition(3, cond[0].shape[1])
    with torch.no_grad():
        ec, eu = den(x, t, cond), den(x, t, null)
        got = gen.guided(den, x, t, cond, null, g)
    if g == 1:
        assert torch.equal(got, ec)  # guidance 1 is the conditional prediction, exactly
    elif g == 0:
        assert torch.equal(got, eu)
    else:
        torch.testing.assert_close(got, eu + g * (ec - eu), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooled", [True, False])
def test_cond_dropout_rate_and_rows(pooled):
    m = small_generator(cond_dropout=0.3, pooled=pooled)
    torch.manual_seed(0)
    n = 200_000
    rate = m.drop_mask(n, "cpu").float().mean().item()
    assert abs(rate - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5
    assert not small_generator(cond_dropout=0.0).drop_mask(1000, "cpu").any()
    assert small_generator(cond_dropout=1.0).drop_mask(1000, "cpu").all()
    # dropped rows carry exactly the null condition, the others the text's
    ids, mask = m.tokenize(PROMPTS)
    states, p = m.text_states(ids, mask)
    assert (p is not None) == pooled
    drop = torch.tensor([True, False, True])
    got = m.denoiser.condition(states, mask, p, drop)
    null = m.denoiser.null_condition(3, states.shape[1])
    full = m.denoiser.condition(states, mask, p)
    for part, n_, f in zip(got, null, full):
        if not pooled and f is None:
            assert part is None
            continue
        for i, d in enumerate(drop.tolist()):
            assert torch.equal(part[i], n_[i] if d else f[i])


def test_cond_dropout_one_makes_the_loss_blind_to_the_prompt():
    m = small_generator(cond_dropout=1.0).train()
    b1, b2 = batch(m, PROMPTS), batch(m, PROMPTS[::-1])
    b2["images"] = b1["images"]
    torch.manual_seed(5)
    l1 = m.loss(**b1)["loss"]
    torch.manual_seed(5)
    l2 = m.loss(**b2)["loss"]
    assert torch.equal(l1, l2)
    m0 = small_generator(cond_dropout=0.0).train()
    torch.manual_seed(5)
    l3 = m0.loss(**b1)["loss"]
    torch.manual_seed(5)
    assert not torch.equal(l3, m0.loss(**b2)["loss"])


def test_loss_trains_only_the_denoiser_unless_the_text_encoder_is_fine_tuned():
    m = small_generator().train()
    m.loss(**batch(m, PROMPTS))["loss"].backward()
    assert all(p.grad is not None for p in m.denoiser.parameters())
    assert all(p.grad is None for p in m.r2d2.parameters())
    assert all(not p.requires_grad for p in m.ema.parameters())
    f = small_generator(finetune_text=True).train()
    f.loss(**batch(f, PROMPTS))["loss"].backward()
    assert any(p.grad is not None for p in f.r2d2.text.parameters())
    assert all(p.grad is None for p in f.r2d2.visual.parameters())


def test_ema_update_follows_the_formula():
    m = small_generator(ema_decay=0.9, ema_warmup=False)
    before = [p.clone() for p in m.ema.parameters()]
    with torch.no_grad():
        for p in m.denoiser.parameters():
            p.add_(torch.randn_like(p))
    m.ema_update()
    for e0, e, w in zip(before, m.ema.parameters(), m.denoiser.parameters()):
        torch.testing.assert_close(e, 0.9 * e0 + 0.1 * w)
    assert int(m.ema_updates) == 1
    w = small_generator(ema_decay=0.999)  # warm-up: update 0 uses min(0.999, 1/10)
    e0 = [p.clone() for p in w.ema.parameters()]
    with torch.no_grad():
        for p in w.denoiser.parameters():
            p.add_(1.0)
    w.ema_update()
    for a, e, s in zip(e0, w.ema.parameters(), w.denoiser.parameters()):
        torch.testing.assert_close(e, 0.1 * a + 0.9 * s)


def test_save_pretrained_round_trip(tmp_path, gen):
    gen.save_pretrained(str(tmp_path / "g"))
    for name in ("config.json", "unet/config.json", "conditioner.safetensors", "scheduler"):
        assert (tmp_path / "g" / name).exists(), name
    assert (tmp_path / "g" / "r2d2" / "vocab.txt").exists()
    back = T2IModel.from_pretrained(str(tmp_path / "g"))
    assert torch.equal(back.sample(PROMPTS, seed=1), gen.sample(PROMPTS, seed=1))
    with pytest.raises(UsageError, match="not a text-to-image model"):
        T2IModel.from_pretrained(str(tmp_path / "g" / "r2d2"))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_other_samplers_are_deterministic(gen, sampler):
    a = gen.sample(PROMPTS[:1], seed=0, sampler=sampler, steps=3)
    assert torch.equal(a, gen.sample(PROMPTS[:1], seed=0, sampler=sampler, steps=3))


def _tiny_vae(path):
    d = diffusers_module()
    torch.manual_seed(0)
    vae = d.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    vae.save_pretrained(str(path))
    return str(path)


def test_latent_path_with_a_local_vae(tmp_path):
    vae = _tiny_vae(tmp_path / "vae")
    m = small_generator(space="latent", vae=vae).train()
    assert (m.channels, m.sample_size) == (4, 8)  # 16 pixels / 2 (two VAE levels)
    loss = m.loss(**batch(m, PROMPTS))["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in m.vae.parameters())
    assert not any(k.startswith("_vae") or "vae" in k for k in m.state_dict())  # never checkpointed
    m.eval()
    x = m.sample(PROMPTS[:2], seed=0)
    assert x.shape == (2, 3, 16, 16)
    m.save_pretrained(str(tmp_path / "g"))
    back = T2IModel.from_pretrained(str(tmp_path / "g"))
    assert torch.equal(back.sample(PROMPTS[:2], seed=0), x)


def test_missing_vae_folder_is_one_line(tmp_path):
    with pytest.raises(UsageError) as e:
        small_generator(space="latent", vae=str(tmp_path / "nope"))
    msg = str(e.value)
    assert "t2i.vae=" in msg and "nope" in msg and "\n" not in msg


def test_config_checks():
    with pytest.raises(ConfigError, match=r"t2i\.vae"):
        T2IConfig(space="latent")
    with pytest.raises(ConfigError, match="attention_levels"):
        T2IConfig(block_out_channels=[8, 16], attention_levels=[True])
    with pytest.raises(ConfigError, match="norm_groups"):
        T2IConfig(block_out_channels=[12, 16], attention_levels=[False, True], norm_groups=8)
    with pytest.raises(ConfigError, match="sampler"):
        T2IConfig(sampler="euler")


def test_missing_diffusers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(UsageError, match=r"pip install r2d2-engine\[t2i\]"):
        diffusers_module()


@pytest.mark.parametrize("kind", ["ddim", "dpm", "ddpm"])
def test_pixel_samplers_keep_x0_in_range_latent_ones_do_not(gen, kind):
    from r2d2.engine.tasks.t2i.model import sampler_scheduler

    on = sampler_scheduler(kind, gen.scheduler.config, pixel=True).config
    off = sampler_scheduler(kind, gen.scheduler.config, pixel=False).config
    key = "thresholding" if kind == "dpm" else "clip_sample"
    assert on[key] is True and off[key] is False
    # the first DPM-Solver++ step under the cosine schedule divides by alpha ~ 0.008: an eps
    # error of 0.1 becomes ~12 in x0; kept in range, the sample ends near [-1, 1] (the last
    # step still adds sqrt(1 - abar_0) eps, a few thousandths)
    sch = sampler_scheduler(kind, gen.scheduler.config, pixel=True)
    sch.set_timesteps(5)
    x = torch.randn(2, 3, 8, 8)
    for t in sch.timesteps:
        x = sch.step(
            torch.randn_like(x), t, x, generator=torch.Generator().manual_seed(0)
        ).prev_sample
    assert x.abs().max() < 1.1
