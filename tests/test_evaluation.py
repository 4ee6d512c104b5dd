"""kNN monitor, feature extraction and linear probe (nasiam_hf.evaluation), on tiny hand-built inputs."""

import math
import warnings

import pytest
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndNoAttention

from nasiam_hf import NASiamConfig, NASiamModel
from nasiam_hf.evaluation import (
    KNNNeighbourhoodWarning,
    binomial_stderr,
    describe_accuracy,
    evaluate_knn,
    extract_features,
    few_queries_warning,
    knn_accuracy,
    knn_neighbourhood,
    knn_predict,
    wilson_interval,
)
from nasiam_hf.linear_probe import (
    LinearProbeConfig,
    evaluate_classifier,
    fit_probe_batch,
    loader_global_batch,
    train_linear_probe,
    train_linear_probe_on_images,
)
from nasiam_hf.optimization import cosine_factor

ERROR_KEYS = ("num_queries", "top1_stderr", "top1_ci95")


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


class IndexedImages(Dataset):
    """Image i is filled with the value i (channel c with i + c); label i % 3; extra keys the code must ignore."""

    def __init__(self, n: int, size: int = 8):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        pixels = torch.stack([torch.full((self.size, self.size), float(i + c)) for c in range(3)])
        return {"pixel_values": pixels, "labels": torch.tensor(i % 3), "index": i, "pixel_values_2": -pixels}


class MeanEncoder(nn.Module):
    """Per-channel mean of the image in bf16 (exact for small integers); records the mode of each call."""

    def __init__(self, return_output: bool = False):
        super().__init__()
        self.dropout = nn.Dropout(0.5)  # would change the features if the encoder ran in train mode
        self.return_output = return_output
        self.modes = []

    def forward(self, pixel_values):
        self.modes.append(self.training)
        features = self.dropout(pixel_values.mean(dim=(2, 3))).to(torch.bfloat16)
        if self.return_output:
            return BaseModelOutputWithPoolingAndNoAttention(last_hidden_state=pixel_values, pooler_output=features)
        return features


def gaussian_clusters(num_classes, per_class, dim, spread, seed, noise_seed=None):
    """Points around ``num_classes`` centres (drawn from ``seed``); ``noise_seed`` draws another sample of them."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g) * 3
    if noise_seed is not None:
        g.manual_seed(noise_seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = centres[labels] + spread * torch.randn(labels.shape[0], dim, generator=g)
    perm = torch.randperm(labels.shape[0], generator=g)
    return features[perm], labels[perm]


# ---------------------------------------------------------------------------------------------------------------- kNN


def test_knn_two_clusters_and_k1():
    memory = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.95, -0.1], [0.0, 1.0], [0.1, 0.9], [-0.1, 0.95]])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    queries = torch.tensor([[2.0, 0.1], [0.05, 3.0]])  # scale must not matter (cosine)
    scores = knn_predict(memory, labels, queries, num_classes=2, k=3)
    assert scores.shape == (2, 2)
    assert scores.argmax(1).tolist() == [0, 1]

    # one class-1 point sits right on the query, three class-0 points are a bit further away
    memory = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6], [0.7, 0.7]])
    labels = torch.tensor([1, 0, 0, 0])
    query = torch.tensor([[1.0, 0.01]])
    assert knn_predict(memory, labels, query, 2, k=1).argmax(1).item() == 1
    assert knn_predict(memory, labels, query, 2, k=4, temperature=1.0).argmax(1).item() == 0


def test_knn_weights_follow_temperature_and_break_ties():
    # k=2: one neighbour of each class, so an unweighted vote ties; cosine 0.9 (class 0) vs 0.5 (class 1)
    memory = torch.tensor([[0.9, math.sqrt(1 - 0.81)], [0.5, -math.sqrt(0.75)], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    scores = knn_predict(memory, labels, query, num_classes=2, k=2, temperature=0.2)
    torch.testing.assert_close(scores[0], torch.tensor([math.exp(0.9 / 0.2), math.exp(0.5 / 0.2)]))
    assert scores[0, 0] > scores[0, 1]
    hot = knn_predict(memory, labels, query, num_classes=2, k=2, temperature=1e4)
    assert hot[0, 0] / hot[0, 1] == pytest.approx(1.0, abs=1e-3)  # weights become uniform: back to a tie


def test_knn_k_capped_at_memory_size():
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 2])
    scores = knn_predict(memory, labels, torch.tensor([[1.0, 0.0]]), num_classes=4, k=200, temperature=0.5)
    expected = torch.tensor([[math.exp(2.0), 1.0, math.exp(-2.0), 0.0]])
    torch.testing.assert_close(scores, expected)


def test_knn_neighbourhood_rule():
    labels = torch.arange(5000) % 10  # 500 per class
    assert knn_neighbourhood(200, labels) == (200, None)
    used, note = knn_neighbourhood(200, labels[:1000])  # 100 per class
    assert used == 200 and "above the average class size of the memory (100.0 images: 1000 over 10 classes)" in note
    assert "use a larger memory or --knn_k 100 or less" in note
    used, note = knn_neighbourhood(200, labels[:64])
    assert used == 64 and "--knn_k 200 is more than the 64 memory images: the vote uses k=64" in note


def test_an_accuracy_comes_with_its_error_and_query_count():
    # 6 right of 20: p = 0.3, standard error sqrt(0.3 * 0.7 / 20) = 0.10247, in points
    assert binomial_stderr(30.0, 20) == pytest.approx(10.247, abs=1e-3)
    assert binomial_stderr(50.0, 10000) == pytest.approx(0.5)
    low, high = wilson_interval(30.0, 20)  # Wilson's interval, worked by hand: centre 0.3322, half-width 0.1868
    assert (low, high) == (pytest.approx(14.55, abs=0.01), pytest.approx(51.90, abs=0.01))
    assert describe_accuracy(30.0, 20) == "30.00% ± 10.25 (95 % CI 14.5-51.9, 20 queries)"
    warning = few_queries_warning(20, "kNN monitor top-1", max_eval_samples=20)
    assert "measured on 20 images only: one image moves it by 5.00 points" in warning
    assert "--validation_file" in warning and "--max_eval_samples 20 keeps only that many" in warning
    assert few_queries_warning(200, "kNN monitor top-1") is None


def test_a_tiny_memory_gives_every_query_the_majority_class_and_says_so():
    memory = torch.randn(12, 4)
    labels = torch.tensor([0] * 7 + [1] * 3 + [2] * 2)
    queries, query_labels = torch.randn(30, 4), torch.arange(30) % 3
    with pytest.warns(KNNNeighbourhoodWarning, match="the vote uses k=12"):
        result = knn_accuracy(memory, labels, queries, query_labels, num_classes=3, k=200, temperature=100.0)
    assert result["k"] == 12
    assert result["top1"] == pytest.approx(100.0 / 3)  # every query voted class 0: exactly the queries of class 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        knn_accuracy(memory, labels, queries, query_labels, num_classes=3, k=2, warn=True)  # 2 <= 4 per class


def test_knn_chunked_equals_unchunked():
    memory, labels = torch.randn(50, 16), torch.randint(0, 7, (50,))
    queries = torch.randn(23, 16)
    full = knn_predict(memory, labels, queries, num_classes=7, k=10, chunk_size=1024)
    chunked = knn_predict(memory, labels, queries, num_classes=7, k=10, chunk_size=4)
    assert full.shape == (23, 7)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-6)


def test_knn_accuracy_top5_only_with_five_classes():
    memory, labels = gaussian_clusters(6, 10, 8, spread=0.1, seed=1)
    queries, query_labels = gaussian_clusters(6, 3, 8, spread=0.1, seed=1, noise_seed=100)
    result = knn_accuracy(memory, labels, queries, query_labels, num_classes=6, k=5)
    assert set(result) == {"top1", "top5", "k", *ERROR_KEYS} and result["k"] == 5
    assert result["top1"] == pytest.approx(100.0) and result["top5"] == pytest.approx(100.0)
    assert result["num_queries"] == 18 and result["top1_stderr"] == 0.0  # 18 of 18 right: sqrt(1 * 0 / 18)
    assert result["top1_ci95"][0] == pytest.approx(100 * 18 / (18 + 1.96 ** 2))  # Wilson's lower bound at p = 1
    wrong = knn_accuracy(memory, labels, queries, (query_labels + 1) % 6, num_classes=6, k=5)
    assert wrong["top1"] == pytest.approx(0.0)

    keep = labels < 3
    few = knn_accuracy(memory[keep], labels[keep], queries[query_labels < 3], query_labels[query_labels < 3], 3, k=5)
    assert set(few) == {"top1", "k", *ERROR_KEYS}


# ----------------------------------------------------------------------------------------------- feature extraction


@pytest.mark.parametrize("return_output", [False, True])
def test_extract_features_order_dtype_mode_and_partial_batch(accelerator, return_output):
    loader = accelerator.prepare(DataLoader(IndexedImages(10), batch_size=4, shuffle=False))  # 4 + 4 + 2
    encoder = MeanEncoder(return_output).train()
    features, labels = extract_features(encoder, loader, accelerator)
    assert features.shape == (10, 3) and labels.shape == (10,)
    assert features.dtype == torch.float32 and labels.dtype == torch.long
    assert features.device.type == "cpu"
    torch.testing.assert_close(features[:, 0], torch.arange(10.0))  # loader order, no dropout (eval mode)
    torch.testing.assert_close(features[:, 2], torch.arange(10.0) + 2)
    assert labels.tolist() == [i % 3 for i in range(10)]
    assert encoder.modes == [False, False, False]  # ran in eval mode ...
    assert encoder.training  # ... and got train mode back

    encoder.eval()
    extract_features(encoder, loader, accelerator)
    assert not encoder.training


def test_extract_features_normalize(accelerator):
    loader = DataLoader(IndexedImages(5), batch_size=2)
    features, _ = extract_features(MeanEncoder(), loader, accelerator, normalize=True)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(5))
    raw, _ = extract_features(MeanEncoder(), loader, accelerator)
    torch.testing.assert_close(features, raw / raw.norm(dim=1, keepdim=True))


# ---------------------------------------------------------------------------------------------------- linear probe


def test_linear_probe_separable_reaches_100_and_loss_decreases():
    features, labels = gaussian_clusters(4, 30, 16, spread=0.3, seed=0)
    eval_features, eval_labels = gaussian_clusters(4, 10, 16, spread=0.3, seed=0, noise_seed=100)
    config = LinearProbeConfig(epochs=15, batch_size=32)
    classifier, history = train_linear_probe(features, labels, 4, config, eval_features, eval_labels)
    assert len(history) == 15
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["train_top1"] == pytest.approx(100.0)
    assert history[-1]["eval_top1"] == pytest.approx(100.0)
    assert "eval_top5" not in history[-1]  # 4 classes
    assert history[-1]["lr"] < history[0]["lr"] <= config.effective_lr  # cosine decay
    # the normalisation is inside the classifier: it takes raw features
    assert isinstance(classifier[0], nn.BatchNorm1d) and not classifier[0].affine
    assert not classifier.training
    assert evaluate_classifier(classifier, eval_features, eval_labels)["top1"] == pytest.approx(100.0)


def test_linear_probe_invariant_to_feature_scale():
    features, labels = gaussian_clusters(5, 40, 32, spread=8.0, seed=3)  # overlapping: accuracy well below 100
    test_features, test_labels = gaussian_clusters(5, 40, 32, spread=8.0, seed=3, noise_seed=100)
    config = LinearProbeConfig(epochs=10, batch_size=32)
    results = []
    for scale in (1.0, 100.0, 0.01):
        classifier, _ = train_linear_probe(features * scale, labels, 5, config)
        results.append(evaluate_classifier(classifier, test_features * scale, test_labels)["top1"])
    assert 40.0 < results[0] < 95.0  # a task where the probe can be better or worse
    assert abs(results[1] - results[0]) <= 3.0
    assert abs(results[2] - results[0]) <= 3.0


def test_linear_probe_is_seeded():
    features, labels = gaussian_clusters(3, 10, 8, spread=1.0, seed=5)
    config = LinearProbeConfig(epochs=3, batch_size=8, seed=7)
    a, _ = train_linear_probe(features, labels, 3, config)
    b, _ = train_linear_probe(features, labels, 3, config)
    c, _ = train_linear_probe(features, labels, 3, LinearProbeConfig(epochs=3, batch_size=8, seed=8))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a[1].weight, c[1].weight)


def test_evaluate_classifier_top5_and_mode():
    classifier = nn.Linear(6, 6)
    with torch.no_grad():
        classifier.weight.copy_(torch.eye(6))
        classifier.bias.zero_()
    # logits = features: the best class is 2x, the second best 1x; the last row puts class 0 strictly last
    features = torch.eye(6)[[0, 1, 2, 3]] * 2 + torch.eye(6)[[1, 2, 3, 4]]
    features[3, 0] = -1.0
    labels = torch.tensor([0, 2, 3, 0])  # ranked first, second, second, sixth
    result = evaluate_classifier(classifier, features, labels)
    assert result["top1"] == pytest.approx(25.0)
    assert result["top5"] == pytest.approx(75.0)
    classifier.train()
    evaluate_classifier(classifier, features, labels)
    assert classifier.training
    assert set(evaluate_classifier(nn.Linear(6, 4), features, labels % 4)) == {"top1", *ERROR_KEYS}
    assert result["num_queries"] == 4 and result["top1_stderr"] == pytest.approx(100 * (0.25 * 0.75 / 4) ** 0.5)


def test_linear_probe_config_validation():
    with pytest.raises(ValueError):
        LinearProbeConfig(feature_norm="layernorm")
    assert LinearProbeConfig(batch_size=512).effective_lr == pytest.approx(2 * LinearProbeConfig().effective_lr)
    assert LinearProbeConfig(feature_norm="none").effective_lr == 30.0
    assert LinearProbeConfig(lr=0.5).effective_lr == 0.5


def test_cached_probe_uses_a_labelled_set_smaller_than_its_batch(capsys):
    features, labels = gaussian_clusters(4, 10, 8, spread=0.3, seed=2)  # 40 samples, batch 256
    config = LinearProbeConfig(epochs=3, batch_size=256)
    _, history = train_linear_probe(features, labels, 4, config)
    assert history[0]["lr"] == pytest.approx(0.03 * 40 / 256)  # one step per epoch over the 40 samples used
    assert "linear probe" in capsys.readouterr().err  # the epoch progress bar


def test_fit_probe_batch_for_few_labels():
    assert fit_probe_batch(200, 256) == 200
    assert fit_probe_batch(200, 256, num_processes=2) == 100
    assert fit_probe_batch(5000, 256, num_processes=4) == 256
    for n, processes in ((1, 1), (3, 2)):
        with pytest.raises(ValueError, match=f"at least 2 labelled images per process; got {n} images"):
            fit_probe_batch(n, 256, processes)


def test_loader_global_batch_counts_every_process():
    from accelerate.data_loader import prepare_data_loader

    plain = DataLoader(ClassMeanImages(32, 0), batch_size=8)
    assert loader_global_batch(plain, num_processes=3, default=99) == 24
    sharded = prepare_data_loader(DataLoader(ClassMeanImages(32, 0), batch_size=8), num_processes=2,
                                  process_index=0, put_on_device=False)
    assert loader_global_batch(sharded, num_processes=1, default=99) == 16


class ClassMeanImages(Dataset):
    """Image of class c: noise around a per-class colour, so the per-channel mean separates the classes."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 3
        colours = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
        self.images = colours[self.labels][:, :, None, None] + 0.5 * torch.randn(n, 3, 8, 8, generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


def test_linear_probe_on_images_trains_only_the_classifier(accelerator):
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten()).train()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    train_loader = accelerator.prepare(DataLoader(ClassMeanImages(30, 0), batch_size=8, shuffle=True))
    eval_loader = accelerator.prepare(DataLoader(ClassMeanImages(15, 1), batch_size=8))
    classifier, history = train_linear_probe_on_images(
        encoder, train_loader, 3, LinearProbeConfig(epochs=6, batch_size=8, lr=0.1), accelerator, eval_loader
    )
    assert len(history) == 6 and "eval_top1" in history[-1]
    assert history[-1]["loss"] < history[0]["loss"]
    assert encoder.training  # mode restored
    for key, value in encoder.state_dict().items():  # frozen: no weight moved, no BN running stat updated
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in encoder.parameters())  # no gradient ever reached the encoder
    assert isinstance(classifier, nn.Sequential) and not classifier.training
    assert classifier[1].weight.shape == (3, 8)


def tiny_encoder():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_image_probe_uses_200_labels_with_a_batch_of_256(accelerator):
    images = ClassMeanImages(200, 3)
    config = LinearProbeConfig(epochs=2, batch_size=256)
    full_batch = DataLoader(images, batch_size=config.batch_size, shuffle=True, drop_last=True)
    with pytest.raises(ValueError, match="yields no batches.*fit_probe_batch"):
        train_linear_probe_on_images(tiny_encoder(), full_batch, 3, config, accelerator)
    batch = fit_probe_batch(len(images), config.batch_size, accelerator.num_processes)
    loader = accelerator.prepare(DataLoader(images, batch_size=batch, shuffle=True, drop_last=True))
    _, history = train_linear_probe_on_images(tiny_encoder(), loader, 3, config, accelerator)
    assert len(history) == 2
    assert history[0]["lr"] == pytest.approx(0.03 * 200 / 256)  # the rate of the 200 images actually used


def test_image_probe_lr_follows_the_global_batch(accelerator):
    from accelerate.data_loader import prepare_data_loader

    # this process's shard of a 2-process loader: 8 images per process, 16 per step in all
    loader = prepare_data_loader(DataLoader(ClassMeanImages(64, 0), batch_size=8), num_processes=2,
                                 process_index=0, put_on_device=False)
    _, history = train_linear_probe_on_images(tiny_encoder(), loader, 3, LinearProbeConfig(epochs=1, batch_size=8),
                                              accelerator)
    steps = len(loader)
    assert history[0]["lr"] == pytest.approx(0.03 * 16 / 256 * cosine_factor(steps - 1, 0, steps))


# ------------------------------------------------------------------------------------------------------ end to end


def test_evaluate_knn_end_to_end_with_nasiam_model(accelerator):
    model = NASiamModel(NASiamConfig(backbone="resnet18"))
    images = torch.randn(20, 3, 8, 8)
    labels = torch.arange(20) % 5

    def batches(lo, hi):
        return [{"pixel_values": images[i : min(i + 4, hi)], "labels": labels[i : min(i + 4, hi)]}
                for i in range(lo, hi, 4)]

    memory_loader, query_loader = batches(0, 14), batches(14, 20)  # both end with a partial batch
    with pytest.warns(KNNNeighbourhoodWarning, match="more than the 14 memory images: the vote uses k=14"):
        result = evaluate_knn(model, memory_loader, query_loader, accelerator, num_classes=5, k=200,
                              temperature=0.2)
    assert set(result) == {"top1", "top5", "k", *ERROR_KEYS} and result["k"] == 14 and result["num_queries"] == 6
    assert 0.0 <= result["top1"] <= 100.0
    assert result["top5"] == pytest.approx(100.0)  # 5 classes: every label is in the top 5

    # the backbone alone (a plain tensor output) gives the same features as the model's pooler_output
    memory, memory_labels = extract_features(model.backbone, memory_loader, accelerator, normalize=True)
    query, query_labels = extract_features(model.backbone, query_loader, accelerator, normalize=True)
    assert memory.shape == (14, 512) and query.shape == (6, 512)
    assert memory_labels.tolist() == labels[:14].tolist()
    expected = knn_accuracy(memory, memory_labels, query, query_labels, num_classes=5, warn=False)
    assert result == pytest.approx(expected)
