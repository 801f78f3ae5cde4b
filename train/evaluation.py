"""Evaluation on the held-out data: token-weighted loss, perplexity and greedy exact match.

Each rank evaluates its own slice of the validation set; sums are all-reduced so every rank
gets the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from train.phases import NO_PHASE_TIMER, PhaseTimer


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def shard(items: list, rank: int, world_size: int) -> list:
    """Every world_size-th item starting at rank (deterministic, balanced)."""
    return items[rank::world_size]


@torch.no_grad()
def evaluate_loss(model, batches, device: torch.device) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over all ranks' batches."""
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0.0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        loss_sum += float(loss)
        tokens += float((labels != -100).sum())
    loss_sum, tokens = _all_reduce_sum([loss_sum, tokens], device)
    model.train(was_training)
    mean = loss_sum / max(tokens, 1.0)
    return {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 50.0)), "eval_tokens": tokens}


@torch.no_grad()
def exact_match(model, tokenizer, examples, device: torch.device, batch_size: int = 8) -> dict[str, float]:
    """Greedy-decode each example's prompt and compare the answer to its reference (stripped).

    Args:
        examples: This rank's examples with ``prompt_ids`` and ``reference``.
    """
    was_training = model.training
    model.eval()
    correct, total = 0.0, 0.0
    pad_id = tokenizer.pad_token_id
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        width = max(len(e.prompt_ids) for e in chunk)
        # Left padding so every prompt ends where generation starts.
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, e in enumerate(chunk):
            ids[i, width - len(e.prompt_ids) :] = torch.tensor(e.prompt_ids)
            mask[i, width - len(e.prompt_ids) :] = 1
        max_new = max(len(tokenizer(e.reference, add_special_tokens=False)["input_ids"]) for e in chunk) + 4
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new,
            do_sample=False,
            use_cache=True,  # training loads the model with the KV cache off
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for i, e in enumerate(chunk):
            answer = tokenizer.decode(out[i, width:], skip_special_tokens=True)
            correct += float(answer.strip() == e.reference.strip())
            total += 1.0
    correct, total = _all_reduce_sum([correct, total], device)
    model.train(was_training)
    return {"exact_match": correct / total if total else float("nan"), "exact_match_examples": total}


@dataclass(frozen=True)
class Evaluator:
    """This rank's share of the held-out evaluation: loss and perplexity, and exact match when the data has references.

    Every rank calls it at the same steps: each evaluates its own shard and the sums are all-reduced.
    """

    model: Any
    tokenizer: Any
    collate: Callable[[list], dict[str, torch.Tensor]]
    device: torch.device
    batch_size: int
    """Examples per forward pass (the training micro-batch)."""
    max_batches: int
    """Evaluate at most this many loss batches per rank (0: all)."""
    loss_shard: list
    """This rank's validation examples."""
    exact_match_shard: list
    """This rank's share of the examples scored by exact match."""
    exact_match_any: bool
    """Any rank has exact-match examples (then every rank joins exact_match's all-reduce)."""
    phases: PhaseTimer = NO_PHASE_TIMER

    @classmethod
    def of(cls, model, tokenizer, collate, device: torch.device, validation: list, *, rank: int, world: int,
           batch_size: int, max_batches: int, exact_match_examples: int,
           phases: PhaseTimer = NO_PHASE_TIMER) -> Evaluator:
        """The evaluator of ``rank`` over ``validation``; exact match on its first ``exact_match_examples`` with a reference."""
        scored = [e for e in validation if e.reference][:exact_match_examples]
        return cls(model, tokenizer, collate, device, batch_size, max_batches, shard(validation, rank, world),
                   shard(scored, rank, world), bool(scored), phases)

    def __call__(self) -> dict[str, float]:
        """The metrics of the model as it is now (a collective: every rank calls it)."""
        size = self.batch_size
        batches = [self.collate(self.loss_shard[i : i + size]) for i in range(0, len(self.loss_shard), size)]
        if self.max_batches:
            batches = batches[: self.max_batches]
        with self.phases.phase("evaluate_loss"):
            out = evaluate_loss(self.model, batches, self.device)
        # Decided from the whole list, not this rank's share: a rank whose share is empty (fewer examples
        # than workers) still joins exact_match's all-reduce.
        if self.exact_match_any:
            with self.phases.phase("exact_match"):
                out.update(exact_match(self.model, self.tokenizer, self.exact_match_shard, self.device,
                                       batch_size=size))
        return out
