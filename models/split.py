"""Cut any Hugging Face ``LlavaForConditionalGeneration`` into an edge half and a cloud half.

The CLIP vision tower is a plain loop: ``embeddings -> pre_layrnorm -> layers[0..n-1]``; LLaVA reads
``hidden_states[vision_feature_layer]`` (index 0 = the pre-LN output, index i = after block i-1),
drops CLS under the ``default`` strategy, projects, and scatters the result over the ``<image>``
tokens. :func:`split_llava` returns two modules that share the model's weights:

- :class:`EdgeHalf`: ``pixel_values (batch, 3, H, W)`` -> ``hidden_states (batch, tokens, dim)`` at the
  split site;
- :class:`CloudHalf`: those ``hidden_states`` (after the quantizer's round trip) -> image features,
  merged input embeddings, logits or generated tokens; or, in two parts as the worker runs it, the
  keys and values of the prompt prefix that holds the image (:meth:`CloudHalf.prefix`), then the
  tokens generated after it (:meth:`CloudHalf.generate_after`).

The cloud half stops at the deepest feature layer LLaVA reads, so blocks past it are never run (HF
runs them all). A test proves ``cloud(edge(x))`` equals the unsplit model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import SplitSite
from .generation import HFEngine, PrefixKV, greedy_decode


def vision_model(model: nn.Module) -> nn.Module:
    """The CLIP vision transformer inside a LLaVA model (layouts of transformers 4.5x and 5.x)."""
    inner = getattr(model, "model", model)
    tower = inner.vision_tower
    return getattr(tower, "vision_model", tower)


def _run_block(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    out = layer(hidden_states, None)
    return out[0] if isinstance(out, tuple) else out


def vision_tokens(vision_config) -> int:
    """Tokens at the split site: one per patch plus CLS (577 for LLaVA-1.5, 65 for the mini model)."""
    return (vision_config.image_size // vision_config.patch_size) ** 2 + 1


def feature_layer_indices(model: nn.Module) -> list[int]:
    """LLaVA's ``vision_feature_layer`` as non-negative indices into the hidden-state list."""
    layers = model.config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    depth = len(vision_model(model).encoder.layers)
    return [i if i >= 0 else depth + 1 + i for i in layers]


class EdgeHalf(nn.Module):
    """Patch + position embedding, optional pre-LN and the first ``k`` blocks."""

    def __init__(self, model: nn.Module, site: SplitSite) -> None:
        super().__init__()
        vm = vision_model(model)
        self.site = site
        self.embeddings = vm.embeddings
        self.pre_layrnorm = vm.pre_layrnorm if site.kind != "embed" else None
        self.blocks = nn.ModuleList(vm.encoder.layers[: site.edge_blocks])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(batch, 3, H, W)`` -> ``(batch, tokens, dim)`` at the split site."""
        hidden_states = self.embeddings(pixel_values.to(self.embeddings.patch_embedding.weight.dtype))
        if self.pre_layrnorm is not None:
            hidden_states = self.pre_layrnorm(hidden_states)
        for block in self.blocks:
            hidden_states = _run_block(block, hidden_states)
        return hidden_states


class CloudHalf(nn.Module):
    """The rest of the vision tower, the projector and the language model."""

    def __init__(self, model: nn.Module, site: SplitSite, fused: bool = False) -> None:
        super().__init__()
        vm = vision_model(model)
        self.site = site
        self.model = model
        if fused:
            from .fused import CudaGraphed, FusedLlama

            # Compiled on GPUs; on CPU the same code runs eagerly (tests). At small batch the eager
            # vision blocks cost more wall time than the whole prefill, so they replay as graphs.
            self.engine = FusedLlama(model, compile=next(model.parameters()).is_cuda)
            self._features = CudaGraphed(self._image_features)
        else:
            self.engine = HFEngine(model)
            self._features = self._image_features
        self.feature_layers = feature_layer_indices(model)
        first = site.edge_blocks
        if min(self.feature_layers) < first:
            raise ValueError(
                f"split site {site} is past the vision feature layer(s) {model.config.vision_feature_layer}: "
                f"the cloud would need hidden states the edge never sends"
            )
        self.pre_layrnorm = vm.pre_layrnorm if site.kind == "embed" else None
        self.first_block = first
        self.blocks = nn.ModuleList(vm.encoder.layers[first : max(self.feature_layers)])

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def image_features(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(batch, tokens, dim)`` at the site -> projected ``(batch, image_tokens, text_dim)``."""
        return self._features(hidden_states)

    def _image_features(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = self.blocks[0].layer_norm1.weight.dtype if len(self.blocks) else hidden_states.dtype
        h = hidden_states.to(dtype)
        if self.pre_layrnorm is not None:
            h = self.pre_layrnorm(h)
        states = {self.first_block: h}
        for offset, block in enumerate(self.blocks):
            h = _run_block(block, h)
            states[self.first_block + offset + 1] = h
        selected = [states[i] for i in self.feature_layers]
        if self.model.config.vision_feature_select_strategy == "default":
            selected = [s[:, 1:] for s in selected]
        inner = getattr(self.model, "model", self.model)
        return inner.multi_modal_projector(torch.cat(selected, dim=-1))

    def inputs_embeds(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the image features scattered over the ``<image>`` positions."""
        embeds = self.model.get_input_embeddings()(input_ids)
        mask = input_ids == self.image_token_id
        per_row = mask.sum(1)
        if (per_row != image_features.shape[1]).any():
            raise ValueError(
                f"expected {image_features.shape[1]} <image> tokens per prompt, got {per_row.tolist()}"
            )
        return embeds.masked_scatter(mask.unsqueeze(-1), image_features.to(embeds.dtype))

    def forward(
        self, hidden_states: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``(batch, seq, vocab)`` for prompts whose ``<image>`` tokens take the features."""
        embeds = self.inputs_embeds(input_ids, self.image_features(hidden_states))
        return self.model(inputs_embeds=embeds, attention_mask=attention_mask).logits

    @torch.no_grad()
    def generate(
        self,
        hidden_states: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int = 8,
        stop_at_eos: bool = True,
    ) -> torch.Tensor:
        """Greedy decoding from left-padded prompts; returns only the new tokens ``(batch, new)``.

        ``stop_at_eos=False`` always decodes ``max_new_tokens`` (benchmarks: equal work per run).
        """
        embeds = self.inputs_embeds(input_ids, self.image_features(hidden_states))
        generation = self.model.generation_config
        return greedy_decode(
            self.engine,
            embeds,
            attention_mask,
            max_new_tokens,
            eos_token_id=generation.eos_token_id if stop_at_eos else None,
            pad_token_id=generation.pad_token_id,
        )

    @torch.no_grad()
    def prefix(self, hidden_states: torch.Tensor, prefix_ids: torch.Tensor) -> PrefixKV:
        """Keys and values of the prompt prefix ``prefix_ids`` ``(prefix,)`` (BOS, template text,
        the ``<image>`` tokens) with each row's image features from ``hidden_states``."""
        ids = prefix_ids.expand(hidden_states.shape[0], -1)
        return self.engine.prefix(self.inputs_embeds(ids, self.image_features(hidden_states)))

    @torch.no_grad()
    def generate_after(
        self,
        prefix: PrefixKV,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int = 8,
        stop_at_eos: bool = True,
        on_token: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Greedy decoding of left-padded prompt tails ``input_ids`` ``(batch, n)`` after ``prefix``
        (one row each); returns the new tokens ``(batch, new)``, ``on_token`` sees each step's."""
        generation = self.model.generation_config
        return greedy_decode(
            self.engine,
            self.model.get_input_embeddings()(input_ids),
            attention_mask,
            max_new_tokens,
            eos_token_id=generation.eos_token_id if stop_at_eos else None,
            pad_token_id=generation.pad_token_id,
            prefix=prefix,
            on_token=on_token,
        )


def split_llava(
    model: nn.Module, site: SplitSite | str = "preln", fused: bool = False
) -> tuple[EdgeHalf, CloudHalf]:
    """Cut ``model`` at ``site``; both halves share its weights. ``fused``: the cloud half decodes
    with :class:`models.fused.FusedLlama` (compiled, CUDA graphs; for GPUs) instead of the HF
    modules, and replays its vision blocks as CUDA graphs at small batch."""
    site = SplitSite.parse(site) if isinstance(site, str) else site
    return EdgeHalf(model, site), CloudHalf(model, site, fused)
