"""Training: the bundled mini LLaVA from scratch, and AlignedVQ quantizers for any LLaVA.

Both loops keep the whole data set on the device as tensors (:mod:`models.tensor_split`), run bf16
autocast on CUDA, log JSON lines, checkpoint, and resume from their last checkpoint.

    alignedvq train-mini --out runs/mini --steps 11000
    alignedvq train --model llava-mini-shapes --site preln --groups 1 --stages 1 --codebook-size 4096
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration

from edge_client.preprocess import ImageSpec

from .config import QuantizerConfig
from .data import VQASplit
from .mini import SHAPES, MiniSpec
from .patch_loss import PatchHead, last_block_output
from .quantizer import AlignedVQ
from .split import split_llava, vision_model
from .store import LoadedModel, save_model_dir
from .tensor_split import TensorSplit, pixel_values

TRAINABLE = ("quantizer", "adapter", "edge", "vision", "projector", "language")


def autocast(device: str):
    """bf16 autocast on CUDA; plain fp32 elsewhere."""
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over labelled positions (labels are aligned with inputs)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


@torch.no_grad()
def first_token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """Teacher-forced check of each row's first answer token: cheap model selection during training."""
    shifted = labels[:, 1:]
    first = (shifted != -100).int().argmax(1)
    rows = torch.arange(labels.shape[0], device=labels.device)
    pred = logits[:, :-1].argmax(-1)[rows, first]
    return int((pred == shifted[rows, first]).sum()), labels.shape[0]


@dataclass
class Logger:
    path: Path
    started: float = field(default_factory=time.time)

    def __call__(self, **record) -> None:
        record["elapsed_s"] = round(time.time() - self.started, 2)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _batches(n: int, size: int, generator: torch.Generator, device: str):
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - size + 1, size):
            yield perm[start : start + size].to(device)


@torch.no_grad()
def holdout_accuracy(forward, data: TensorSplit, batch_size: int = 512) -> float:
    """First-answer-token accuracy of ``forward(batch) -> logits`` over a whole split."""
    hits = total = 0
    for start in range(0, len(data), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(data)), device=data.input_ids.device)
        batch = data.batch(rows)
        h, t = first_token_accuracy(forward(batch), batch["labels"])
        hits, total = hits + h, total + t
    return hits / max(total, 1)


def _checkpoint(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train_mini(
    out: Path,
    train_split: VQASplit,
    holdout_split: VQASplit,
    spec: MiniSpec = SHAPES,
    *,
    steps: int = 11000,
    batch_size: int = 256,
    lr: float = 5e-4,
    device: str = "cpu",
    seed: int = 0,
    eval_every: int = 1000,
    time_budget_s: float | None = None,
    patch_loss_weight: float = 0.0,
    fit_budget_s: float | None = None,
) -> Path:
    """Train the bundled model ``spec`` from scratch; resumes from ``out/checkpoint.pt`` when present.

    Returns ``out/model`` once all ``steps`` are done (weights in fp16, tokenizer, manifest).
    Stops early, after a checkpoint, when ``time_budget_s`` runs out (call again to continue).
    ``patch_loss_weight`` > 0 with a split that has object records adds the auxiliary per-patch
    loss (:mod:`models.patch_loss`); its head is kept in ``out/patch_head.pt`` for later stages.
    ``fit_budget_s``: on a fresh run, time a few throwaway steps first and cut ``steps`` so the whole
    schedule fits that many seconds (a GPU lease cannot carry an optimizer state to the next call).
    """
    model_dir = out / "model"
    if (model_dir / "manifest.json").is_file():
        return model_dir
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = spec.build_tokenizer()
    model = LlavaForConditionalGeneration(spec.config(tokenizer)).to(device)
    head = PatchHead(model.config.vision_config.hidden_size).to(device) if patch_loss_weight else None
    patch = spec.patch_size if head is not None else None
    train = TensorSplit.for_training(train_split, tokenizer, spec.prompt, spec.image_spec, device, patch)
    holdout = TensorSplit.for_training(holdout_split, tokenizer, spec.prompt, spec.image_spec, device)
    trained = [model] + ([head] if head is not None else [])
    encoder = vision_model(model).encoder
    step, ckpt = 0, out / "checkpoint.pt"
    log = Logger(out / "train_log.jsonl")

    def train_step(batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer):
        targets = batch.pop("patch_targets", None)
        with autocast(device), last_block_output(encoder) as box:
            loss = model(**batch).loss
            extra = head.loss(box["tokens"], targets) if head is not None else None
        total = loss if extra is None else loss + patch_loss_weight * extra
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        norm = torch.nn.utils.clip_grad_norm_([p for m in trained for p in m.parameters()], 1.0)
        optimizer.step()
        return loss, extra, norm

    state = torch.load(ckpt, map_location=device, weights_only=False) if ckpt.exists() else None  # ours
    if state is not None:
        steps = state.get("steps", steps)  # the schedule the run started with
    elif fit_budget_s is not None:
        seconds = _probe_step_seconds(trained, train, batch_size, train_step, device)
        steps = max(1, min(steps, int(fit_budget_s / seconds)))
        log(event="fit", step_seconds=round(seconds, 5), budget_s=fit_budget_s, steps=steps)
    named = [(n, p) for m in trained for n, p in m.named_parameters()]
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    if state is not None:
        model.load_state_dict(state["model"])
        if head is not None:
            head.load_state_dict(state["patch_head"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"].cpu())
        step = state["step"]
    log(
        event="start",
        model=spec.name,
        step=step,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        patch_loss_weight=patch_loss_weight,
        params=sum(p.numel() for p in model.parameters()),
        train_questions=len(train),
        holdout_questions=len(holdout),
        device=str(device),
        gpu=torch.cuda.get_device_name() if str(device).startswith("cuda") else None,
    )
    batches = _batches(len(train), batch_size, generator, device)
    started = time.time()
    bar = tqdm(total=steps, initial=step, desc=f"train {spec.name}", mininterval=5)
    model.train()
    while step < steps:
        loss, extra, norm = train_step(train.batch(next(batches)), optimizer)
        schedule.step()
        step += 1
        bar.update(1)
        if step % 100 == 0:
            log(
                event="step",
                step=step,
                loss=round(loss.item(), 5),
                patch_loss=None if extra is None else round(extra.item(), 5),
                grad_norm=round(float(norm), 4),
                lr=schedule.get_last_lr()[0],
            )
        if step % eval_every == 0 or step == steps:
            model.eval()
            with autocast(device):
                acc = holdout_accuracy(
                    lambda b: model(**{k: v for k, v in b.items() if k != "labels"}).logits, holdout
                )
            model.train()
            log(event="eval", step=step, holdout_accuracy=acc)
            bar.set_postfix(loss=f"{loss.item():.4f}", holdout=f"{acc:.4f}")
        out_of_time = time_budget_s is not None and time.time() - started > time_budget_s
        if step % eval_every == 0 or out_of_time or step == steps:
            _checkpoint(
                ckpt,
                model=model.state_dict(),
                patch_head=None if head is None else head.state_dict(),
                optimizer=optimizer.state_dict(),
                schedule=schedule.state_dict(),
                generator=generator.get_state(),
                step=step,
                steps=steps,
            )
        if out_of_time and step < steps:
            log(event="paused", step=step)
            return out
    bar.close()
    if head is not None:
        torch.save(head.state_dict(), out / "patch_head.pt")
    save_model_dir(model, tokenizer, spec.prompt, spec.image_spec, model_dir)
    log(event="done", step=step, model_dir=str(model_dir))
    return model_dir


def _probe_step_seconds(modules, train: TensorSplit, batch_size: int, train_step, device: str) -> float:
    """Seconds per training step, from 20 timed steps (after 5 warm-up steps) that change nothing."""
    saved = [copy.deepcopy(m.state_dict()) for m in modules]
    optimizer = torch.optim.AdamW([p for m in modules for p in m.parameters()], lr=0.0)
    rows = torch.arange(batch_size, device=device) % len(train)
    for i in range(25):
        if i == 5:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
        train_step(train.batch(rows), optimizer)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / 20
    for m, state in zip(modules, saved, strict=True):
        m.load_state_dict(state)
    return seconds


@torch.no_grad()
def collect_features(edge, images: torch.Tensor, spec: ImageSpec, batch_size: int = 512) -> torch.Tensor:
    """Edge-half outputs ``(images, tokens, dim)`` in float32 for ``images`` ``(n, H, W, 3)`` uint8."""
    return torch.cat(
        [
            edge(pixel_values(images[start : start + batch_size], spec)).float()
            for start in range(0, images.shape[0], batch_size)
        ]
    )


def train_quantizers(
    loaded: LoadedModel,
    configs: list[QuantizerConfig],
    train_split: VQASplit,
    holdout_split: VQASplit,
    out_dir: Path,
    *,
    steps: int = 1000,
    batch_size: int = 256,
    lr: float = 1e-3,
    model_lr: float = 1e-4,
    trainable: tuple[str, ...] = ("quantizer",),
    turns: list[int] | None = None,
    unquantized_turns: int = 1,
    kmeans_images: int = 4000,
    kmeans_iters: int = 20,
    time_budget_s: float | None = None,
    checkpoint_every: int = 500,
    device: str = "cpu",
    seed: int = 0,
    patch_head: PatchHead | None = None,
    patch_loss_weight: float = 0.0,
    init_dir: Path | None = None,
) -> list[AlignedVQ] | None:
    """k-means init, then task-aware fine-tuning (VQA loss through the cloud half + VQ losses).

    Several quantizers can train together: each step takes the next one in a rotation where config
    ``i`` has ``turns[i]`` slots (default 1) and, when model weights learn, ``unquantized_turns``
    slots run without a quantizer. ``trainable`` picks what learns: ``quantizer`` (the whole
    quantizer) or ``adapter`` (only its cloud-side ``up`` map: with the edge frozen too, the codes
    stay exactly what the edge sends), ``edge`` (patch embedding, pre-LN and edge blocks:
    quantization-aware features), ``vision`` (the vision encoder blocks), ``projector`` and
    ``language``. When model weights learn, every few steps also
    run unquantized, so one model serves the original features and every quantizer (one bundled
    model, many rates). Quantizers are written to ``out_dir/<name>.safetensors``; the caller saves
    the model if it changed.

    ``out_dir/checkpoint.pt`` is written every ``checkpoint_every`` steps and when ``time_budget_s``
    runs out; a later call with the same configs resumes from it (no k-means, same schedule).
    Returns None when the time budget ran out before ``steps``. A ``patch_head`` (trained on,
    with weight ``patch_loss_weight``) keeps the auxiliary per-patch loss of the base training on
    every step, quantized or not, when the train split has object records. Quantizers found in
    ``init_dir`` (same name and config) start from that file instead of k-means. A rate-controlled
    quantizer must start there, and is saved with the tables it started with: the model learned the
    codes they choose (other quantizers are calibrated afresh at the end).
    """
    unknown = set(trainable) - set(TRAINABLE)
    if unknown:
        raise ValueError(f"unknown trainable parts {sorted(unknown)}; choose from {TRAINABLE}")
    torch.manual_seed(seed)
    model = loaded.model.to(device).eval()
    model.requires_grad_(False)
    spec, tok, fmt = loaded.image_spec, loaded.tokenizer, loaded.prompt
    patch = model.config.vision_config.patch_size if patch_head is not None else None
    train = TensorSplit.for_training(train_split, tok, fmt, spec, device, patch)
    holdout = TensorSplit.for_training(holdout_split, tok, fmt, spec, device)
    encoder = vision_model(model).encoder
    halves = {str(c.site): split_llava(model, c.site) for c in configs}
    quantizers = [AlignedVQ(c).to(device) for c in configs]
    ckpt = out_dir / "checkpoint.pt"
    state = torch.load(ckpt, map_location=device, weights_only=False) if ckpt.exists() else None  # our file
    if state is not None:
        if state["names"] != [c.name for c in configs]:
            raise ValueError(f"{ckpt} holds quantizers {state['names']}, not {[c.name for c in configs]}")
        for q, q_state in zip(quantizers, state["quantizers"], strict=True):
            q.load_state_dict(q_state)
        if state.get("model") is not None:
            model.load_state_dict(state["model"])
        if patch_head is not None and state.get("patch_head") is not None:
            patch_head.load_state_dict(state["patch_head"])
    else:
        for i, q in enumerate(quantizers):
            start = init_dir / f"{q.config.name}.safetensors" if init_dir is not None else None
            if start is not None and start.is_file():
                quantizers[i] = q = AlignedVQ.load(start, map_location=device)
                if q.config != configs[i]:
                    raise ValueError(f"{start} has config {q.config}, expected {configs[i]}")
                continue
            if q.config.rate_lambda:
                raise ValueError(
                    f"{q.config.name} is rate-controlled: it trains from a calibrated quantizer of that name "
                    f"in init_dir ({init_dir}), whose codebooks and tables it keeps"
                )
            q.init_from_features(
                collect_features(halves[str(q.config.site)][0], train.images[:kmeans_images], spec),
                iters=kmeans_iters,
                seed=seed,
            )
    model_params = _unfreeze(model, [halves[str(c.site)][0] for c in configs], trainable)
    if "quantizer" not in trainable:
        for q in quantizers:
            q.requires_grad_(False)
            q.up.requires_grad_("adapter" in trainable)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = Logger(out_dir / "train_quantizers.log.jsonl")

    def forward(batch, q: AlignedVQ | None, site: str, train_mode: bool):
        edge, cloud = halves[site]
        with torch.set_grad_enabled(torch.is_grad_enabled() and "edge" in trainable):
            hidden = edge(batch["pixel_values"]).float()
        if q is None:
            return cloud(hidden, batch["input_ids"], batch["attention_mask"]), None
        q.train(train_mode and "quantizer" in trainable)  # a frozen quantizer keeps its codebooks
        out = q(hidden)
        return cloud(out.hidden_states, batch["input_ids"], batch["attention_mask"]), out

    def evaluate(q: AlignedVQ | None, site: str) -> float:
        with autocast(device):
            return holdout_accuracy(lambda b: forward(b, q, site, False)[0], holdout)

    for q in quantizers if state is None else []:
        log(
            event="init",
            name=q.config.name,
            bits_per_token=q.config.bits_per_token,
            holdout_accuracy_kmeans=evaluate(q, str(q.config.site)),
            trainable=list(trainable),
        )
    if steps:
        groups = [{"params": [p for q in quantizers for p in q.parameters() if p.requires_grad], "lr": lr}]
        if patch_head is not None and model_params:
            model_params = model_params + list(patch_head.parameters())
        if model_params:
            groups.append({"params": model_params, "lr": model_lr})
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        warmup = max(1, steps // 20)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
        )
        # With a trainable cloud, unquantized slots keep the original path sharp.
        rotation: list[AlignedVQ | None] = [
            q for q, n in zip(quantizers, turns or [1] * len(quantizers), strict=True) for _ in range(n)
        ]
        rotation += [None] * (unquantized_turns if model_params else 0)
        first = 1
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            first = state["step"] + 1
            log(event="resumed", step=state["step"])

        def checkpoint(step: int) -> None:
            _checkpoint(
                ckpt,
                names=[c.name for c in configs],
                quantizers=[q.state_dict() for q in quantizers],
                model=model.state_dict() if model_params else None,
                patch_head=None if patch_head is None else patch_head.state_dict(),
                optimizer=optimizer.state_dict(),
                schedule=schedule.state_dict(),
                step=step,
            )

        log(
            event="start",
            step=first,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            model_lr=model_lr,
            rotation=[None if q is None else q.config.name for q in rotation],
        )
        batches = _batches(len(train), batch_size, torch.Generator().manual_seed(seed + first), device)
        started = time.time()
        for step in tqdm(range(first, steps + 1), desc="train quantizers", mininterval=5):
            if time_budget_s is not None and time.time() - started > time_budget_s:
                checkpoint(step - 1)
                log(event="stopped", step=step - 1, reason="time budget")
                model.requires_grad_(False)
                return None
            q = rotation[step % len(rotation)]
            site = str(q.config.site) if q is not None else str(configs[0].site)
            batch = train.batch(next(batches))
            targets = batch.pop("patch_targets", None)
            with autocast(device), last_block_output(encoder) as box:
                logits, out = forward(batch, q, site, True)
                loss = lm_loss(logits, batch["labels"]) + (out.loss if out is not None else 0.0)
                if patch_head is not None and targets is not None:
                    loss = loss + patch_loss_weight * patch_head.loss(box["tokens"], targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            optimizer.step()
            schedule.step()
            # Restart only once usage has accumulated over ~100 turns, and not near the end.
            restart_turn = step % (100 * len(rotation)) < len(rotation) and step > 100 * len(rotation)
            if q is not None and restart_turn and step < steps * 0.8 and "quantizer" in trainable:
                with torch.no_grad():
                    restarted = q.restart_dead_codes(halves[site][0](batch["pixel_values"]).float())
                log(
                    event="step",
                    step=step,
                    name=q.config.name,
                    loss=round(loss.item(), 5),
                    restarted=restarted,
                )
            if step % checkpoint_every == 0 or step == steps:
                checkpoint(step)
    model.requires_grad_(False)
    for q in quantizers:
        q.eval()
        site = str(q.config.site)
        if not q.config.rate_lambda:  # a rate-controlled one keeps the tables it trained against
            q.calibrate(collect_features(halves[site][0], train.images[:kmeans_images], spec))
        digest = q.save(out_dir / f"{q.config.name}.safetensors")
        log(event="done", name=q.config.name, holdout_accuracy=evaluate(q, site), hash=digest)
    if model_params:
        log(event="done", name="unquantized", holdout_accuracy=evaluate(None, str(configs[0].site)))
    return quantizers


def _unfreeze(model: torch.nn.Module, edges: list[torch.nn.Module], trainable: tuple[str, ...]) -> list:
    """Turn on gradients for the chosen parts of ``model``; returns their parameters (no repeats)."""
    inner = getattr(model, "model", model)
    parts = {
        "edge": edges,
        "vision": [vision_model(model).encoder],
        "projector": [inner.multi_modal_projector],
        "language": [inner.language_model, model.lm_head],
    }
    params: dict[int, torch.nn.Parameter] = {}
    for name in trainable:
        for module in parts.get(name, []):
            module.requires_grad_(True)
            params.update((id(p), p) for p in module.parameters())
    return list(params.values())
