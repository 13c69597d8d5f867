"""The numpy edge encoder reproduces the torch edge half + AlignedVQ.encode, and its streams decode."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edge_client.bitstream import decode_stream, encode_stream, read_header
from edge_client.bundle import SUPPORTED_ACTIVATIONS, EdgeBundle
from edge_client.encoder import EdgeEncoder, activation
from edge_client.errors import ImageError
from edge_client.preprocess import ImageSpec
from models.quantizer import AlignedVQ, kmeans
from models.split import EdgeHalf, split_llava
from tests.conftest import TINY_QUANTIZER, build_tiny_model_dir

SITES = ["preln", "embed", "block:1"]


@dataclass
class Case:
    edge: EdgeHalf
    quantizer: AlignedVQ
    encoder: EdgeEncoder


def _case(loaded: object, quantizer: AlignedVQ) -> Case:
    from models.export import export_edge_bundle

    edge, _ = split_llava(loaded.model, quantizer.config.site)
    return Case(edge, quantizer, EdgeEncoder(EdgeBundle.from_bytes(export_edge_bundle(loaded, quantizer))))


@pytest.fixture(scope="module")
def cases(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    from models.store import load_model

    out = {}
    for site in SITES:
        if site == "preln":
            directory, name = tiny_model_dir, TINY_QUANTIZER
        else:
            directory = build_tiny_model_dir(tmp_path_factory.mktemp("enc") / "llava-tiny", site=site)
            name = f"{site.replace(':', '')}-16"
        loaded = load_model(str(directory))
        out[site] = _case(loaded, AlignedVQ.load(loaded.quantizer_path(name)))
    return out


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth random images (blocks of colour plus noise), more photo-like than white noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, 4, 4, 3)).repeat(size // 4, 1).repeat(size // 4, 2)
    return np.clip(coarse + rng.normal(0, 20, coarse.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("site", SITES)
def test_numpy_encoder_matches_torch(cases: dict[str, Case], site: str) -> None:
    case = cases[site]
    pixels = np.stack([case.encoder.pixel_values(image) for image in _images(24, 32)])
    with torch.no_grad():
        hidden = case.edge(torch.from_numpy(pixels))
        indices, levels = case.quantizer.encode(hidden)
    ours = [case.encoder.encode_pixels(p) for p in pixels]
    np_indices = np.stack([i for i, _ in ours])
    assert np_indices.dtype == np.uint16 and np_indices.shape == (24, 17, 1, 1)
    np.testing.assert_allclose(
        np.stack([case.encoder.hidden_states(p) for p in pixels]), hidden.numpy(), atol=1e-4, rtol=1e-4
    )
    assert (np_indices == indices.numpy()).mean() >= 0.99
    if site == "block:1":
        np_levels = np.stack([lv for _, lv in ours]).astype(np.int64)
        assert np_levels.shape == (24, 17, 2) and (np_levels == levels.numpy()).mean() >= 0.99
        assert np.abs(np_levels - levels.numpy()).max() <= 1
    else:
        assert levels is None and all(lv is None for _, lv in ours)


@pytest.mark.parametrize("site", SITES)
def test_stream_decodes_to_the_indices(cases: dict[str, Case], site: str) -> None:
    encoder = cases[site].encoder
    bundle = encoder.bundle
    image = _images(1, 48, seed=3)[0]  # not the model size: resized and cropped like the cloud
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    stream = encoder.encode_image(png.getvalue())
    assert stream == encoder.encode_image(Image.fromarray(image)) == encoder.encode_image(image)

    indices, levels = encoder.encode_pixels(encoder.pixel_values(image))
    decoded = decode_stream(stream, bundle.freqs)
    np.testing.assert_array_equal(decoded.indices, indices)
    if levels is None:
        assert decoded.stats is None
    else:
        np.testing.assert_array_equal(decoded.stats, levels)
    header = decoded.header
    assert (header.model, header.split_site, header.tokens) == ("llava-tiny", site, 17)
    assert header.matches_codebook(bundle.codebook_hash) and header.stat_bits == bundle.stat_bits
    assert stream == encode_stream(bundle.stream_header(), indices, levels, freqs=bundle.freqs)
    packed = encoder.encode_image(image, entropy=False)
    assert read_header(packed).coder == "packed"
    np.testing.assert_array_equal(decode_stream(packed).indices, indices)


@pytest.mark.parametrize("name", sorted(SUPPORTED_ACTIVATIONS))
def test_activations_match_transformers(name: str) -> None:
    from transformers.activations import ACT2FN

    x = np.linspace(-8, 8, 4001, dtype=np.float32)
    expected = ACT2FN[name](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(activation(name)(x), expected, atol=2e-6, rtol=1e-5)


def test_bad_inputs_are_refused(cases: dict[str, Case]) -> None:
    encoder = cases["preln"].encoder
    with pytest.raises(ValueError, match=r"expected pixel_values of shape \(3, 32, 32\), got \(3, 64, 64\)"):
        encoder.encode_pixels(np.zeros((3, 64, 64), np.float32))
    with pytest.raises(ImageError, match="expected an \\(H, W, 3\\) uint8 array, got float32"):
        encoder.encode_image(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ImageError, match="could not be decoded"):
        encoder.encode_image(b"not an image")
    with pytest.raises(TypeError, match="got str"):
        encoder.encode_image("photo.jpg")


def test_llava15_geometry_stream_size() -> None:
    """577 tokens x 1024 at preln, one 4096-entry codebook: 866 bytes of indices, header <= 64."""
    from transformers import LlavaForConditionalGeneration

    from models.architectures import llava15_geometry_config
    from models.config import QuantizerConfig
    from models.export import export_edge_bundle
    from models.store import LLAVA15_PROMPT, LoadedModel

    torch.manual_seed(0)
    config = llava15_geometry_config(vision_layers=1, text_layers=1)
    text = config.text_config  # the edge never touches the language model: keep it tiny
    text.hidden_size, text.intermediate_size, text.head_dim = 32, 64, 8
    text.num_attention_heads = text.num_key_value_heads = 4
    model = LlavaForConditionalGeneration(config).eval()
    spec = ImageSpec(size=336)
    loaded = LoadedModel("llava-1.5-7b", model, None, LLAVA15_PROMPT, spec, Path("."))
    edge, _ = split_llava(model, "preln")
    with torch.no_grad():
        features = edge(torch.randn(8, 3, 336, 336))  # 8 x 577 = 4616 >= 4096 vectors for k-means
    quantizer = AlignedVQ(QuantizerConfig(dim=1024, tokens=577, codebook_size=4096, code_dim=32))
    # Random down projection, k-means codebook (init_from_features' SVD is slow on multi-threaded CPU).
    with torch.no_grad():
        projected = quantizer.project(features)[:, :, 0].flatten(0, 1)
        quantizer.codebooks[0, 0] = kmeans(
            projected, 4096, iters=1, generator=torch.Generator().manual_seed(0)
        )
    encoder = EdgeEncoder(EdgeBundle.from_bytes(export_edge_bundle(loaded, quantizer)))

    image = _images(1, 336, seed=5)[0]
    stream = encoder.encode_image(image)
    header = read_header(stream)
    assert header.tokens == 577 and header.bits_per_index == 12 and header.coder == "packed"
    assert header.nbytes <= 64
    assert len(stream) - header.nbytes == 866
    pixels = encoder.pixel_values(image)
    with torch.no_grad():
        expected, _ = quantizer.encode(edge(torch.from_numpy(pixels)[None]))
    assert (decode_stream(stream).indices == expected[0].numpy()).mean() >= 0.99


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_variable_rate_ranked_bundle_matches_torch_and_decodes(tiny_model_dir: Path, rate: float) -> None:
    """Gated refinement + neighbour ranks (+ rate control, lambda = rate x threshold): same indices
    as torch, a ranked stream, exact decode."""
    from edge_client.preprocess import preprocess
    from models.config import QuantizerConfig
    from models.store import load_model

    loaded = load_model(str(tiny_model_dir))
    edge, _ = split_llava(loaded.model, "preln")

    def _pixels(image: np.ndarray) -> np.ndarray:
        return preprocess(Image.fromarray(image), loaded.image_spec)

    def flat(n: int, seed: int) -> np.ndarray:  # one colour per image: neighbours repeat codes
        colours = np.random.default_rng(seed).integers(0, 256, (n, 1, 1, 3), dtype=np.uint8)
        return np.broadcast_to(colours, (n, 32, 32, 3)).copy()

    with torch.no_grad():
        calibration = np.concatenate([_images(64, 32, seed=4), flat(64, seed=6)])
        hidden = edge(torch.from_numpy(np.stack([_pixels(image) for image in calibration])))

    def fitted(**kw) -> AlignedVQ:
        q = AlignedVQ(QuantizerConfig(dim=hidden.shape[-1], codebook_size=16, code_dim=8, stages=2, **kw))
        q.init_from_features(hidden, iters=5)
        return q.eval()

    plain = fitted()
    first = plain.codebooks[0, 0][plain.encode(hidden)[0][..., 0, 0]]
    with torch.no_grad():
        threshold = float((plain.project(hidden)[..., 0, :] - first).pow(2).sum(-1).median())
    q = fitted(refine_threshold=threshold, rank_tokens=17, rate_lambda=rate * threshold)
    q.calibrate(hidden)
    case = _case(loaded, q)
    bundle = case.encoder.bundle
    assert bundle.refine_threshold == threshold and bundle.ranking is not None
    assert bundle.rate_lambda == rate * threshold

    images = np.concatenate([_images(4, 32, seed=5), flat(4, seed=7)])
    with torch.no_grad():
        expected = q.encode(edge(torch.from_numpy(np.stack([_pixels(image) for image in images]))))[0]
    ours = np.stack([case.encoder.encode_pixels(_pixels(image), rate_controlled=True)[0] for image in images])
    assert (ours == expected.numpy()).mean() >= 0.99
    nearest = np.stack([case.encoder.encode_pixels(_pixels(image))[0] for image in images])
    assert (ours != nearest).any() if rate else (ours == nearest).all()  # rate control is on or off
    assert 0 < (ours[..., 1] == 0).mean() < 1  # some tokens skip refinement, some do not
    coders = []
    for image, indices in zip(images, ours, strict=True):
        stream = case.encoder.encode_image(image)
        coders.append(read_header(stream).coder)
        np.testing.assert_array_equal(decode_stream(stream, bundle.freqs, bundle.ranking).indices, indices)
    assert coders[4:] == ["ranked"] * 4  # flat images rank-code below packing


def test_background_suppressing_bundle_matches_torch_and_decodes(tiny_model_dir: Path) -> None:
    """Tokens within the background norm go out as the pinned zero code on the numpy edge too, and
    the rANS stream of a mostly-background image is smaller than one without suppression."""
    from dataclasses import replace

    from edge_client.preprocess import preprocess
    from models.config import QuantizerConfig
    from models.store import load_model

    loaded = load_model(str(tiny_model_dir))
    edge, _ = split_llava(loaded.model, "preln")

    def pixels(images: np.ndarray) -> np.ndarray:
        return np.stack([preprocess(Image.fromarray(image), loaded.image_spec) for image in images])

    with torch.no_grad():
        hidden = edge(torch.from_numpy(pixels(_images(128, 32, seed=4))))
    plain = AlignedVQ(QuantizerConfig(dim=hidden.shape[-1], codebook_size=16, code_dim=8, stages=2))
    plain.init_from_features(hidden, iters=5)
    with torch.no_grad():
        norms = plain.project(hidden).pow(2).sum(-1)
    median = float(norms.median())
    q = AlignedVQ(replace(plain.config, refine_threshold=median, background_norm=median)).eval()
    q.load_state_dict(plain.state_dict())
    q.calibrate(hidden)
    plain.eval().calibrate(hidden)
    case = _case(loaded, q)
    assert case.encoder.bundle.background_norm == median

    images = _images(6, 32, seed=5)
    with torch.no_grad():
        expected = q.encode(edge(torch.from_numpy(pixels(images))))[0].numpy()
    ours = np.stack([case.encoder.encode_pixels(p)[0] for p in pixels(images)])
    assert (ours == expected).mean() >= 0.99
    assert 0.2 < (ours == 0).all(-1).mean() < 0.8  # about half the tokens are background
    unsuppressed = _case(loaded, plain).encoder
    smaller = 0
    for image, indices in zip(images, ours, strict=True):
        stream = case.encoder.encode_image(image)
        np.testing.assert_array_equal(decode_stream(stream, case.encoder.bundle.freqs).indices, indices)
        smaller += len(stream) < len(unsuppressed.encode_image(image))
    assert smaller >= 5
