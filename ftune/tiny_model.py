"""Builds the built-in tiny base model: a 2-layer Llama with a BPE tokenizer trained on the sample data.

The result is an ordinary Hugging Face model directory (``config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json`` with a chat template), so tests and examples load it
through the same ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` path a hub model takes.
Like every real base model it is pretrained (briefly, full-parameter) on plain text: every fact of
the sample data's closed world stated as a terse knowledge-base entry (``ftune.sample_data``). It
knows the facts but has never seen a question or the chat format; LoRA fine-tuning on the sample
instructions is what teaches it to answer, which the held-out questions measure.

``ftune build-tiny-model`` (``ftune.builtin_assets``) builds it into the location
``builtin:tiny-llama`` resolves to; this module only knows how to build, not where the cache is.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from ftune.sample_data import SAMPLE_ROWS, SAMPLE_SEED, generate_rows, heldout_rows, knowledge_texts, to_chat

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, *ROLE_TOKENS]

VOCAB_SIZE = 1024
MODEL_MAX_LENGTH = 1024

# "<|begin_of_text|>" then "<|role|>\n{content}<|end_of_text|>\n" per turn. BOS is in the template,
# as in Llama 3, so apply_chat_template(tokenize=True) starts with it; text rendered with
# tokenize=False must then be encoded with add_special_tokens=False, exactly as for a real Llama 3.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role ' ~ message['role'] ~ '; use system, user or assistant.') }}"
    "{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>\n' ~ message['content'] ~ eos_token ~ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

ARCHITECTURE = {
    "hidden_size": 64,
    "intermediate_size": 192,  # a multiple of 32, as the 4-bit CPU kernels need (real Llamas: of 256)
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention, as in Llama 3
    "max_position_embeddings": MODEL_MAX_LENGTH,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    # Llama's 0.02. LoRA (all-linear) leaves the LM head frozen, so its answers can only be as confident
    # as the head allows: full-parameter pretraining (PRETRAIN) trains the head, not this initialisation.
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
}
"""LlamaConfig arguments of the tiny model (vocabulary size and special ids come from the tokenizer)."""

PRETRAIN = {"steps": 400, "batch_size": 32, "lr": 3e-3, "warmup": 30, "data_seed": 1}
"""Full-parameter pretraining of the tiny base on the knowledge texts (about 30 s on 2 idle CPU cores)."""

MARKER_FILE = "ftune_tiny.json"
"""Written last into a built directory; its presence means the build finished."""
FORMAT_VERSION = 6
"""Bump when the tokenizer, template or files change, so cached builds are rebuilt."""


def _alpaca_text(row: dict[str, str]) -> str:
    # Alpaca-style rendering, so instruction-format prompts tokenize into few tokens too.
    parts = [f"### Instruction:\n{row['instruction']}\n\n"]
    if row["input"]:
        parts.append(f"### Input:\n{row['input']}\n\n")
    parts.append(f"### Response:\n{row['output']}")
    return "".join(parts)


def _training_corpus(rows: list[dict[str, str]]) -> Iterator[str]:
    yield from knowledge_texts()
    for row in rows:
        yield _alpaca_text(row)
        # Chat turns minus the special tokens, which are never split and so need no merges.
        for message in to_chat(row)["messages"]:
            yield f"\n{message['content']}\n"


def train_tokenizer(rows: list[dict[str, str]], vocab_size: int = VOCAB_SIZE):
    """Trains a byte-level BPE tokenizer on the rows and wraps it for transformers.

    Byte-level means every string encodes (no unknown token) and decodes back unchanged.
    Encoding prepends BOS (like Llama 3) but never appends EOS; training code appends it.

    Args:
        rows: Alpaca-style rows; rendered both as alpaca prompts and as chat turns.
        vocab_size: Target vocabulary size, special tokens included.

    Returns:
        A ``PreTrainedTokenizerFast`` with bos/eos/pad set, right padding and the chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,  # ids 0..5 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(rows), trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
        padding_side="right",
        model_max_length=MODEL_MAX_LENGTH,
        # Keep decode(encode(x)) == x; the cleanup would rewrite spaces before punctuation.
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def pretrain(model, tokenizer, texts: list[str], steps: int = PRETRAIN["steps"]) -> float:
    """Full-parameter next-token training on plain ``texts``; returns the final loss.

    Deterministic under the caller's torch seed (fixed batch order, no dropout).
    """
    import torch

    encoded = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in texts]
    batch_size = PRETRAIN["batch_size"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / PRETRAIN["warmup"]) * max(0.05, 1 - s / steps)
    )
    order = torch.Generator().manual_seed(PRETRAIN["data_seed"])
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        picks = torch.randint(0, len(encoded), (batch_size,), generator=order).tolist()
        width = max(len(encoded[i]) for i in picks)
        ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        labels = torch.full((batch_size, width), -100)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, i in enumerate(picks):
            n = len(encoded[i])
            ids[row, :n] = labels[row, :n] = torch.tensor(encoded[i])
            mask[row, :n] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


def build_tiny_model(
    out_dir: Path, *, seed: int = 0, data_rows: int = SAMPLE_ROWS, pretrain_steps: int = PRETRAIN["steps"]
) -> Path:
    """Trains the tokenizer, initialises the tiny Llama and saves both to ``out_dir``.

    The same ``seed`` and ``data_rows`` give identical files. The global torch RNG is left as it was.

    Args:
        out_dir: Directory to write into (created if missing); existing files are overwritten.
        seed: Seed of the weight initialisation.
        data_rows: Rows of the built-in sample dataset (always its own seed) to train the tokenizer on.
        pretrain_steps: Full-parameter pretraining steps (tests of the build itself use a few).

    Returns:
        ``out_dir``.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(generate_rows(data_rows, seed=SAMPLE_SEED) + heldout_rows())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **ARCHITECTURE,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
        pretrain(model, tokenizer, knowledge_texts(), steps=pretrain_steps)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-shard progress bar is noise in test and CLI output
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out_dir)
    marker = {
        "name": "tiny-llama",
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "data_rows": data_rows,
        "vocab_size": len(tokenizer),
        "num_parameters": model.num_parameters(),
        "architecture": ARCHITECTURE,
        "pretraining": {**PRETRAIN, "steps": pretrain_steps},
    }
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out_dir
