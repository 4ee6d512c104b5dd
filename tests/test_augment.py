"""The batched on-device augmentation ops of nasiam_hf.data.augment, one by one (against torchvision where it has
the op)."""

import math
import random

import pytest
import torch
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from nasiam_hf.data import augment as A


def images(batch=6, size=12, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_mul32_and_hash_are_exact_32_bit_arithmetic():
    rng = random.Random(0)
    xs = [rng.randrange(1 << 32) for _ in range(200)] + [0, (1 << 32) - 1]
    for c in (0x85EBCA6B, 0xC2B2AE35, 3):
        got = A._mul32(torch.tensor(xs, dtype=torch.int64), c).tolist()
        assert got == [(x * c) % (1 << 32) for x in xs]
    h = A.hash_ints(7, torch.arange(5), 1)
    assert h.shape == (5,) and int(h.min()) >= 0 and int(h.max()) < 1 << 32 and len(set(h.tolist())) == 5
    assert A.hash_ints(-1, 2).item() != A.hash_ints(1, 2).item()  # the sign bits count


def test_uniforms_are_deterministic_in_range_and_keyed_by_every_int():
    index = torch.arange(256)
    u = A.uniforms(3, 0, index, 0)
    assert u.shape == (256, A.NUM_DRAWS) and u.dtype == torch.float32
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.std()) - math.sqrt(1 / 12)) < 0.01
    assert torch.equal(u, A.uniforms(3, 0, index, 0))
    for other in (A.uniforms(4, 0, index, 0), A.uniforms(3, 1, index, 0), A.uniforms(3, 0, index, 1),
                  A.uniforms(3, 0, index + 1, 0)):
        assert (other != u).float().mean() > 0.99
    # a sample's numbers do not depend on the other samples (or the tensor's length)
    assert torch.equal(A.uniforms(3, torch.tensor([0, 0]), torch.tensor([17, 4]), 0)[0], u[17])


def test_random_resized_crop_boxes_stay_inside_with_the_right_scale_and_ratio():
    u = torch.rand(4000, 4 * A.CROP_TRIES, generator=torch.Generator().manual_seed(1))
    height, width = 32, 32
    top, left, h, w = A.random_resized_crop_boxes(u, height, width, (0.2, 1.0)).unbind(1)
    assert bool(((top >= 0) & (left >= 0) & (h >= 1) & (w >= 1)).all())
    assert bool(((top + h <= height) & (left + w <= width)).all())
    assert torch.equal(top, top.round()) and torch.equal(w, w.round())
    area = h * w / (height * width)
    # rounding w and h to whole pixels moves the area and the ratio a little beyond the drawn ranges
    assert float(area.min()) >= 0.2 * (1 - 2 / math.sqrt(0.2 * 1024)) - 1e-6 and float(area.max()) <= 1.0
    ratio = w / h
    assert float(ratio.min()) >= 0.75 * 0.85 and float(ratio.max()) <= (4 / 3) / 0.85
    # the same distribution as torchvision's sampler (big areas with extreme ratios fail and are redrawn)
    torch.manual_seed(0)
    reference = [RandomResizedCrop.get_params(torch.zeros(3, 32, 32), (0.2, 1.0), (3 / 4, 4 / 3))
                 for _ in range(4000)]
    reference_area = torch.tensor([h * w / 1024 for _, _, h, w in reference])
    assert float(area.mean()) == pytest.approx(float(reference_area.mean()), abs=0.02)
    assert float(area.std()) == pytest.approx(float(reference_area.std()), abs=0.02)
    # no try fits -> torchvision's fallback: the central crop of the ratio-clamped image
    fallback = A.random_resized_crop_boxes(u[:3], 32, 32, scale=(2.0, 3.0))
    assert fallback.tolist() == [[0, 0, 32, 32]] * 3
    wide = A.random_resized_crop_boxes(u[:1], 10, 40, scale=(5.0, 6.0))
    assert wide.tolist() == [[0, 13, 10, 13]]  # h = 10, w = round(10 * 4/3) = 13, left (40 - 13) // 2


def test_crop_resize_is_exact_on_whole_pixel_boxes_of_the_output_size():
    x = images(3, 12)
    full = torch.tensor([[0.0, 0.0, 12.0, 12.0]] * 3)
    assert torch.allclose(A.crop_resize(x, full, 12), x, atol=1e-6)
    box = torch.tensor([[2.0, 3.0, 6.0, 6.0], [0.0, 0.0, 6.0, 6.0], [6.0, 6.0, 6.0, 6.0]])
    out = A.crop_resize(x, box, 6)
    assert torch.allclose(out[0], x[0, :, 2:8, 3:9], atol=1e-6)
    assert torch.allclose(out[2], x[2, :, 6:12, 6:12], atol=1e-6)
    # upscaling a constant crop stays constant
    const = torch.full((1, 3, 8, 8), 0.25)
    upscaled = A.crop_resize(const, torch.tensor([[1.0, 2.0, 3.0, 4.0]]), 16)
    assert torch.allclose(upscaled, torch.full((1, 3, 16, 16), 0.25))


def test_flip_flips_only_the_selected_samples():
    x = images(4)
    out = A.hflip(x, torch.tensor([True, False, True, False]))
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])
    assert torch.equal(out[2], x[2].flip(-1)) and torch.equal(out[3], x[3])


def test_grayscale_gives_equal_channels_and_spares_the_rest():
    x = images(3)
    out = A.random_grayscale(x, torch.tensor([True, False, True]))
    assert torch.equal(out[0, 0], out[0, 1]) and torch.equal(out[0, 1], out[0, 2])
    assert torch.allclose(out[0, 0], TF.rgb_to_grayscale(x[0])[0], atol=1e-3)
    assert torch.equal(out[1], x[1])


def test_colour_ops_match_torchvision_on_float_images():
    x = images(3)
    factor = torch.tensor([0.6, 1.0, 1.4])
    for ours, theirs in ((A.adjust_brightness, TF.adjust_brightness), (A.adjust_contrast, TF.adjust_contrast),
                         (A.adjust_saturation, TF.adjust_saturation)):
        out = ours(x.clone(), factor)
        for i, f in enumerate(factor.tolist()):
            assert torch.allclose(out[i], theirs(x[i], f), atol=2e-3), ours.__name__
    shift = torch.tensor([-0.1, 0.0, 0.07])
    out = A.adjust_hue(x, shift)
    for i, s in enumerate(shift.tolist()):
        assert torch.allclose(out[i], TF.adjust_hue(x[i], s), atol=1e-5)
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1.0
    green = A.adjust_hue(red, torch.tensor([1 / 3]))
    assert torch.allclose(green[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.0]), atol=1e-5)


def test_color_jitter_with_p_zero_is_the_identity_and_follows_the_order():
    x = images(4)
    factors = torch.tensor([[1.3, 0.7, 1.2, 0.05]] * 4)
    order = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(i)) for i in range(4)])
    assert torch.equal(A.color_jitter(x, torch.zeros(4, dtype=torch.bool), factors, order), x)
    # brightness alone (neutral others) is just brightness
    only_brightness = torch.tensor([[0.5, 1.0, 1.0, 0.0]] * 4)
    out = A.color_jitter(x, torch.ones(4, dtype=torch.bool), only_brightness, order)
    assert torch.allclose(out, (x * 0.5).clamp(0, 1), atol=1e-5)
    # each sample applies its own order: compare one sample with the ops applied by hand
    out = A.color_jitter(x, torch.ones(4, dtype=torch.bool), factors, order)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(4):
        expected = x[i]
        for op in order[i].tolist():
            expected = ops[op](expected, factors[i, op].item())
        assert torch.allclose(out[i], expected, atol=1e-4)


def test_gaussian_blur_matches_torchvision_and_spares_unselected_samples():
    x = images(3, 16)
    sigma = torch.tensor([0.5, 1.7, 1.0])
    out = A.gaussian_blur(x, sigma, torch.tensor([True, True, False]), kernel_size=5)
    for i in range(2):
        assert torch.allclose(out[i], TF.gaussian_blur(x[i], [5, 5], [sigma[i].item()] * 2), atol=1e-5)
    assert torch.allclose(out[2], x[2], atol=1e-7)


def test_normalize_and_eval_views():
    x = torch.full((2, 3, 4, 4), 128, dtype=torch.uint8)
    augmenter = A.BatchAugmenter("eval", "cifar", 4, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0), seed=0)
    out = augmenter({"pixel_values": x, "index": torch.tensor([0, 1]), "epoch": torch.tensor([0, 0])})
    assert set(out) == {"pixel_values", "pixel_values_2", "index", "epoch"}
    assert torch.equal(out["pixel_values"], out["pixel_values_2"])  # eval views carry no randomness
    expected = (torch.tensor(128 / 255) - torch.tensor([0.5, 0.25, 0.0])) / torch.tensor([0.5, 0.25, 1.0])
    assert torch.allclose(out["pixel_values"][0, :, 0, 0], expected)
    assert torch.allclose(A.normalize(torch.ones(1, 3, 1, 1), (0.5,) * 3, (0.25,) * 3), torch.full((1, 3, 1, 1), 2.0))
    with pytest.raises(ValueError, match="uint8"):
        augmenter({"pixel_values": x.float(), "index": torch.tensor([0, 1])})


def test_imagenet_policy_crops_the_decoded_square_to_the_training_size():
    from nasiam_hf.data import decode_size

    assert decode_size("imagenet", 224) == 256 and decode_size("cifar", 32) == 32
    augmenter = A.BatchAugmenter("ssl", "imagenet", 56, (0.5,) * 3, (0.25,) * 3, seed=1)
    assert augmenter.decode_size == 64 and augmenter.blur_kernel == 5
    x = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    out = augmenter({"pixel_values": x, "index": torch.arange(3), "epoch": torch.zeros(3, dtype=torch.long)})
    assert out["pixel_values"].shape == (3, 3, 56, 56) and out["pixel_values_2"].shape == (3, 3, 56, 56)
    assert torch.isfinite(out["pixel_values"]).all()
