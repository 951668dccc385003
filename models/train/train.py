"""The resumable training loop, held-out loss and the unigram baseline."""
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from localmoe.errors import LocalMoEError

from .model import Config


class CheckpointError(LocalMoEError):
    """The run directory holds a checkpoint of another configuration."""


@dataclass(frozen=True)
class Schedule:
    steps: int
    batch: int             # sequences of cfg.ctx tokens per step
    lr: float = 3e-3
    warmup: int = 100
    min_lr_frac: float = 0.1
    weight_decay: float = 0.1
    aux_coef: float = 0.01  # auxiliary balancing loss weight (the model's: Switch, or DeepSeek-V3 sequence-wise)
    bias_rate: float = 0.0  # DeepSeek-V3 selection-bias update per step (models with update_bias)
    clip: float = 1.0
    seed: int = 0
    log_every: int = 25
    eval_every: int = 250
    ckpt_minutes: float = 10.0


def lr_at(s: Schedule, step: int) -> float:
    """Linear warm-up, then cosine down to min_lr_frac * lr at the last step."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    t = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (s.min_lr_frac + (1 - s.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def batch_at(tokens: np.ndarray, ctx: int, batch: int, seed: int, step: int) -> torch.Tensor:
    """Random windows of ctx + 1 tokens, a pure function of (seed, step) so a resumed run sees the same data."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - ctx - 1, size=batch)
    return torch.from_numpy(np.stack([tokens[s:s + ctx + 1] for s in starts]).astype(np.int64))


def heldout_windows(tokens: np.ndarray, ctx: int, n: int) -> torch.Tensor:
    """n windows of ctx + 1 tokens spread evenly over the held-out stream (fixed, for comparable evals)."""
    starts = np.linspace(0, len(tokens) - ctx - 1, n).astype(np.int64)
    return torch.from_numpy(np.stack([tokens[s:s + ctx + 1] for s in starts]).astype(np.int64))


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats) over every position of the windows."""
    model.eval()
    chunk = max(1, min(8, 2048 // (windows.shape[1] - 1)))   # <= 8 windows and <= 2048 tokens at once
    total, n = 0.0, 0
    for i in range(0, len(windows), chunk):
        w = windows[i:i + chunk]
        logits = model(w[:, :-1])[0]
        total += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        n += w[:, 1:].numel()
    model.train()
    return total / n


def unigram_loss(train_tokens: np.ndarray, windows: torch.Tensor, n_vocab: int) -> float:
    """Cross-entropy (nats) of the windows' targets under train-set unigram frequencies (add-one)."""
    counts = np.bincount(train_tokens, minlength=n_vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[windows[:, 1:].numpy().ravel()].mean())


def same_schedule(saved: dict, sched: Schedule) -> bool:
    """A checkpoint's schedule equals SCHED; fields it predates count as their defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(Schedule) if f.default is not dataclasses.MISSING}
    return {**defaults, **saved} == sched.__dict__


def train(cfg: Config, sched: Schedule, train_tokens: np.ndarray, windows: torch.Tensor, out: Path,
          max_minutes: float | None = None, log=print):
    """Train (or resume from out/ckpt.pt) up to sched.steps or max_minutes; checkpoints every ckpt_minutes."""
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "ckpt.pt"
    torch.manual_seed(sched.seed)
    model = cfg.build()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "gate_inp" not in n]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2 or "gate_inp" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": sched.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=sched.lr, betas=(0.9, 0.95))
    step, elapsed = 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state["cfg"] != cfg.to_dict() or not same_schedule(state["sched"], sched):
            raise CheckpointError(f"{ckpt} was written for another config; use another --out or delete it")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, elapsed = state["step"], state["elapsed"]
        log(f"resumed at step {step} ({elapsed / 60:.1f} min trained)")

    def save():
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed,
                    "cfg": cfg.to_dict(), "sched": sched.__dict__}, tmp)
        os.replace(tmp, ckpt)

    t_start = t_ckpt = t_log = time.perf_counter()
    cpu_log, tok_log, loss_log = time.process_time(), 0, []
    load = torch.zeros(cfg.n_moe_layers, cfg.n_expert, dtype=torch.int64)   # routed slots since the last log
    model.train()
    with open(out / "log.jsonl", "a") as logf:
        while step < sched.steps:
            if max_minutes is not None and time.perf_counter() - t_start > 60 * max_minutes:
                log(f"stopping at step {step}: --max-minutes {max_minutes} reached")
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(sched, step)
            w = batch_at(train_tokens, cfg.ctx, sched.batch, sched.seed, step)
            logits, aux, l = model(w[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            (loss + sched.aux_coef * aux).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), sched.clip)
            opt.step()
            if sched.bias_rate:
                model.update_bias(l, sched.bias_rate)
            step += 1
            load += l
            tok_log += w[:, 1:].numel()
            loss_log.append(loss.item())
            if step % sched.log_every == 0 or step == sched.steps:
                now = time.perf_counter()
                elapsed += now - t_log
                rec = {"step": step, "minutes": elapsed / 60, "loss": float(np.mean(loss_log)), "aux": aux.item(),
                       "lr": lr_at(sched, step - 1), "tok_s": tok_log / (now - t_log),
                       "tok_per_cpu_s": tok_log / (time.process_time() - cpu_log),
                       "expert_share": (load.double() / load.sum(1, keepdim=True)).numpy().round(4).tolist()}
                if hasattr(model, "routing_bias"):
                    rec["bias"] = model.routing_bias().numpy().round(4).tolist()
                if step % sched.eval_every == 0 or step == sched.steps:
                    rec["heldout_loss"] = heldout_loss(model, windows)
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                log(_describe(rec))
                load.zero_()
                t_log, cpu_log, tok_log, loss_log = time.perf_counter(), time.process_time(), 0, []
            if time.perf_counter() - t_ckpt > 60 * sched.ckpt_minutes:
                save()
                t_ckpt = time.perf_counter()
    elapsed += time.perf_counter() - t_log   # the steps since the last log record
    save()
    return model


def _describe(rec: dict) -> str:
    share = np.array(rec["expert_share"])   # [n_layer, n_expert]; 1/n_expert each when balanced
    held = f" heldout {rec['heldout_loss']:.3f}" if "heldout_loss" in rec else ""
    bias = np.array(rec.get("bias", 0.0))
    return (f"step {rec['step']}: loss {rec['loss']:.3f}{held} aux {rec['aux']:.3f} {rec['tok_s']:.0f} tok/s "
            f"({rec['tok_per_cpu_s']:.0f} per CPU s); expert share min/max per layer "
            + " ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(share.min(1), share.max(1)))
            + (f"; bias {bias.min():+.3f}..{bias.max():+.3f}" if "bias" in rec else ""))
