"""AlignedVQ: geometry, k-means init, straight-through training, restarts, and verified files."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from edge_client.ranking import max_book
from models.config import QuantizerConfig
from models.quantizer import AlignedVQ, QuantizerFileError, kmeans

DIM, TOKENS = 32, 9


def _features(n: int = 200, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    position = torch.randn(TOKENS, DIM, generator=g) * 3  # a strong per-position component
    return torch.randn(n, TOKENS, DIM, generator=g) + position


def _fitted(**kw) -> AlignedVQ:
    config = QuantizerConfig(dim=DIM, tokens=TOKENS, **({"codebook_size": 16, "code_dim": 8} | kw))
    q = AlignedVQ(config)
    q.init_from_features(_features(), iters=5)
    return q.eval()


def _rate_controlled(x: torch.Tensor, **kw) -> tuple[AlignedVQ, AlignedVQ]:
    """A gated, ranked quantizer calibrated on ``x``, and its lambda-20 copy calibrated there too."""
    plain = _fitted(refine_threshold=100.0, rank_tokens=TOKENS, **kw)
    plain.calibrate(x)
    q = AlignedVQ(replace(plain.config, rate_lambda=20.0))
    q.load_state_dict(plain.state_dict())
    q.calibrate(x)
    return plain, q


@pytest.mark.parametrize(("groups", "stages"), [(1, 1), (2, 1), (1, 3), (2, 2)])
def test_encode_decode_shapes_and_determinism(groups: int, stages: int) -> None:
    q = _fitted(groups=groups, stages=stages)
    x = _features(4, seed=1)
    indices, levels = q.encode(x)
    assert indices.shape == (4, TOKENS, groups, stages) and levels is None
    assert indices.max() < 16 and indices.min() >= 0
    assert torch.equal(indices, q.encode(x)[0])
    assert q.decode(indices).shape == x.shape
    assert q.config.bits_per_token == groups * stages * 4


def test_more_stages_reconstruct_better() -> None:
    x = _features(8, seed=2)
    errors = [((_fitted(stages=s).decode(_fitted(stages=s).encode(x)[0]) - x) ** 2).mean() for s in (1, 2, 3)]
    assert errors[0] > errors[1] > errors[2]


def test_kmeans_beats_random_codes() -> None:
    x = torch.randn(2000, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([5.0, 1.0, 1.0, 0.1])
    centroids = kmeans(x, 16, iters=10, generator=torch.Generator().manual_seed(0))
    random_codes = x[:16]

    def err(c):
        return torch.cdist(x, c).min(1).values.pow(2).mean()

    assert err(centroids) < 0.7 * err(random_codes)


def test_kmeans_needs_enough_vectors() -> None:
    with pytest.raises(ValueError, match="at least k=16 vectors, got 8"):
        kmeans(torch.randn(8, 2), 16)


def test_position_centring_is_removed_and_restored() -> None:
    q = _fitted()
    assert q.token_mean.shape == (TOKENS, DIM)
    with pytest.raises(ValueError, match=f"expected {TOKENS} tokens per image, got 3"):
        q.encode(torch.randn(1, 3, DIM))


def test_straight_through_gradients_reach_projections_and_codebooks() -> None:
    q = _fitted().train()
    x = _features(4, seed=3)
    out = q(x)
    (out.hidden_states.pow(2).mean() + out.loss).backward()
    assert q.down.weight.grad.abs().sum() > 0
    assert q.up.weight.grad.abs().sum() > 0
    assert q.codebooks.grad.abs().sum() > 0


def test_ema_codebooks_move_without_gradients() -> None:
    q = _fitted(ema_decay=0.9).train()
    before = q.codebooks.detach().clone()
    q(_features(16, seed=4))
    assert not q.codebooks.requires_grad
    assert not torch.equal(before, q.codebooks)


def test_dead_codes_are_restarted_onto_live_residuals() -> None:
    q = _fitted().train()
    q.usage.zero_()
    q.usage[0, 0, :4] = 10.0
    restarted = q.restart_dead_codes(_features(4, seed=5))
    assert restarted == 12
    assert (q.usage[0, 0] > 0).all()


def test_block_sites_send_quantized_statistics() -> None:
    config = QuantizerConfig(dim=DIM, split_site="block:2", codebook_size=16, code_dim=8, stat_bits=8)
    q = AlignedVQ(config)
    x = _features() * 4 + 2
    q.init_from_features(x, iters=3)
    indices, levels = q.encode(x[:2])
    assert levels.shape == (2, TOKENS, 2) and levels.max() <= 255
    rebuilt = q.decode(indices, levels)
    # The per-token mean travels in 8 bits, so it is restored to within one level.
    step = (q.stats_range[0, 1] - q.stats_range[0, 0]) / 255
    assert (rebuilt.mean(-1) - x[:2].mean(-1)).abs().max() <= step
    with pytest.raises(ValueError, match="needs the per-token stat levels"):
        q.decode(indices)


def test_config_rejects_impossible_geometry() -> None:
    with pytest.raises(ValueError, match="codebook_size"):
        QuantizerConfig(dim=8, codebook_size=1)
    with pytest.raises(ValueError, match="stat_bits"):
        QuantizerConfig(dim=8, split_site="block:1")
    with pytest.raises(ValueError, match="exceeds the feature dim"):
        AlignedVQ(QuantizerConfig(dim=8, code_dim=16))


def test_save_load_round_trip_keeps_hash_and_codes(tmp_path: Path) -> None:
    q = _fitted(groups=2, stages=2)
    q.calibrate(_features(8))
    digest = q.save(tmp_path / "q.safetensors")
    loaded = AlignedVQ.load(tmp_path / "q.safetensors")
    assert loaded.content_hash() == digest == q.content_hash()
    x = _features(3, seed=6)
    assert torch.equal(loaded.encode(x)[0], q.encode(x)[0])
    assert torch.equal(loaded.freqs, q.freqs)


def _tamper(path: Path, change) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop("codebooks"), "missing tensors \\['codebooks'\\]"),
        (lambda t: t.update(extra=torch.zeros(1)), "unexpected \\['extra'\\]"),
        (lambda t: t.update(codebooks=torch.zeros(1, 1, 8, 8)), "tensor codebooks has shape"),
        (lambda t: t["codebooks"].add_(1.0), "content hash"),
    ],
)
def test_load_fails_loudly_on_a_wrong_file(tmp_path: Path, change, message: str) -> None:
    path = tmp_path / "q.safetensors"
    _fitted().save(path)
    _tamper(path, change)
    with pytest.raises(QuantizerFileError, match=message):
        AlignedVQ.load(path)


def test_load_refuses_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(QuantizerFileError, match="not found"):
        AlignedVQ.load(tmp_path / "nope.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(QuantizerFileError, match="expected format alignedvq-quantizer"):
        AlignedVQ.load(tmp_path / "other.safetensors")


def test_gated_refinement_sends_zero_code_for_small_residuals() -> None:
    with pytest.raises(ValueError, match="refine_threshold"):
        QuantizerConfig(dim=DIM, refine_threshold=1.0)  # one stage: nothing to gate
    x = _features(16, seed=7)
    plain, gated = _fitted(stages=2), _fitted(stages=2, refine_threshold=100.0)
    assert gated.config.name == "preln-r2x16-t100"
    assert torch.equal(gated.codebooks[0, 1, 0], torch.zeros(8))  # code 0 of stage 2 is zero
    idx = gated.encode(x)[0]
    first = gated.codebooks[0, 0][idx[..., 0, 0]]
    small = (gated.project(x)[..., 0, :] - first).pow(2).sum(-1) <= 100.0
    assert small.any() and (~small).any()
    assert (idx[..., 0, 1][small] == 0).all()  # no refinement where stage 1 was close enough
    error = lambda q: (q.decode(q.encode(x)[0]) - x).pow(2).mean()  # noqa: E731
    assert error(gated) < error(_fitted(stages=1))  # refinement still helps where it is sent
    assert error(plain) <= error(gated) * 1.5

    gated.train()
    out = gated(x)
    (out.hidden_states.pow(2).mean() + out.loss).backward()
    assert gated.codebooks.grad[0, 1, 0].abs().max() == 0  # the pinned code never learns


def test_background_suppression_sends_the_pinned_zero_code(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="background_norm"):
        QuantizerConfig(dim=DIM, background_norm=-1.0)
    x = _features(16, seed=7)
    q = _fitted(stages=2, refine_threshold=100.0, background_norm=150.0)
    assert q.config.name == "preln-r2x16-t100-b150"
    assert torch.equal(q.books()[0, 0, 0], torch.zeros(8))  # code 0 of stage 1 is zero too
    z = q.project(x)
    background = z.pow(2).sum(-1) <= 150.0  # (images, tokens, groups)
    assert background.any() and (~background).any()
    idx = q.encode(x)[0]
    assert (idx[background] == 0).all()  # zero in every stage: the token reconstructs the mean
    assert (idx[..., 0, 0][~background[..., 0]] != 0).all()  # the objects keep their codes
    decoded = q.decode(idx)
    assert torch.allclose(decoded[background[..., 0]], q.reconstruct(torch.zeros_like(z))[background[..., 0]])
    q.calibrate(x)
    digest = q.save(tmp_path / "q.safetensors")
    loaded = AlignedVQ.load(tmp_path / "q.safetensors")
    assert loaded.content_hash() == digest and torch.equal(loaded.encode(x)[0], idx)

    q.train()
    out = q(x)
    (out.hidden_states.pow(2).mean() + out.loss).backward()
    assert q.codebooks.grad[0, 0, 0].abs().max() == 0  # the pinned code never learns


def test_ranked_quantizer_calibrates_its_geometry_and_saves_it(tmp_path: Path) -> None:
    q = _fitted(stages=2, refine_threshold=100.0, rank_tokens=TOKENS)
    assert q.config.name == "preln-r2x16-t100-ranked"
    q.calibrate(_features(64, seed=8))
    assert q.rank_books.dtype == torch.int16 and q.rank_books.abs().max() == max_book(8)  # full range
    assert q.rank_offsets.shape == (TOKENS, 1, 2, 8) and q.freqs.sum() == 64 * TOKENS * 2
    digest = q.save(tmp_path / "q.safetensors")
    loaded = AlignedVQ.load(tmp_path / "q.safetensors")
    assert loaded.content_hash() == digest
    assert torch.equal(loaded.rank_offsets, q.rank_offsets) and torch.equal(loaded.rank_books, q.rank_books)
    indices = q.encode(_features(2, seed=9))[0][0].numpy()
    ranking = loaded.ranking()
    assert (ranking.indices(ranking.ranks(indices)) == indices).all()


def test_config_json_omits_later_fields_at_their_defaults() -> None:
    """Quantizer files written before gating and ranking existed keep their content hashes."""
    assert "rank_tokens" not in QuantizerConfig(dim=DIM).to_json()
    assert '"rank_tokens": 9' in QuantizerConfig(dim=DIM, rank_tokens=9).to_json()
    assert "background_norm" not in QuantizerConfig(dim=DIM).to_json()


def test_rate_controlled_quantizer_recounts_its_tables_on_what_it_sends(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rate_lambda"):
        QuantizerConfig(dim=DIM, rate_lambda=1.0)  # rate control prices ranks: ranked only
    assert "rate_lambda" not in QuantizerConfig(dim=DIM, rank_tokens=9).to_json()
    x = _features(64, seed=8)
    plain, q = _rate_controlled(x, stages=2)
    assert q.config.name == "preln-r2x16-t100-l20-ranked"
    assert torch.equal(q.rank_books, plain.rank_books) and torch.equal(q.rank_offsets, plain.rank_offsets)
    assert not torch.equal(q.freqs, plain.freqs) and q.freqs.sum() == plain.freqs.sum()
    sent = q.encode(x)[0]
    assert (sent != plain.encode(x)[0]).any()
    # The table counts the ranks of the indices the quantizer now chooses with it (two passes: the
    # second encode may still move a few choices, so counts agree up to those).
    symbols = q._rank_symbols(sent)[..., 0, :].reshape(-1, 2)
    counts = torch.stack([torch.bincount(symbols[:, s], minlength=16) for s in range(2)])
    assert (counts - q.freqs[0]).abs().sum() <= 0.05 * counts.sum()

    def bits(quantizer: AlignedVQ, idx: torch.Tensor) -> torch.Tensor:
        ranks = quantizer._rank_symbols(idx)[..., 0, :].reshape(-1, 2).T
        return -torch.log2(quantizer.freqs[0] / quantizer.freqs[0].sum()).gather(1, ranks).sum()

    assert bits(q, sent) < bits(plain, plain.encode(x)[0])
    q.save(tmp_path / "q.safetensors")
    assert AlignedVQ.load(tmp_path / "q.safetensors").config.rate_lambda == 20.0


@pytest.mark.parametrize(("groups", "stages", "size"), [(1, 3, 16), (2, 2, 16), (1, 2, 128)])
def test_training_forward_chooses_what_the_edge_sends(groups: int, stages: int, size: int) -> None:
    """A rate-controlled quantizer trains on the edge's own rate-distortion choices
    (models.rate_search in torch), under bf16 autocast too, and never moves its codebooks."""
    x = _features(64, seed=8)
    plain, q = _rate_controlled(x, codebook_size=size, groups=groups, stages=stages)
    sent = q.encode(x)[0]
    assert (sent != plain.encode(x)[0]).any()  # rate control changed some choices
    out = q.train()(x)
    assert torch.equal(out.indices, sent)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(q(x).indices, sent)
    assert not q.codebooks.requires_grad and q.restart_dead_codes(x) == 0
    out.loss.backward()  # the commitment loss pulls the projection towards the chosen codewords
    assert q.down.weight.grad is not None and q.codebooks.grad is None


def test_training_search_rebuilds_its_tables_only_when_they_change() -> None:
    """The rank geometry and code lengths are cached between training steps; a recalibration
    (other tables) must be priced with the new ones, as the edge prices it."""
    x = _features(64, seed=9)
    _, q = _rate_controlled(x, stages=2)
    before = q.encode(x)[0]
    assert torch.equal(q.train()(x).indices, before)
    q.calibrate(_features(64, seed=10) * 3)  # other tables, other choices
    after = q.encode(x)[0]
    assert not torch.equal(after, before)
    assert torch.equal(q(x).indices, after)
