"""The built-in tiny Llama: HF-format build, tokenizer and chat template, determinism, builtin resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from ftune import builtin_assets, tiny_model
from ftune.builtin_assets import ensure_sample_dataset, ensure_tiny_model, resolve_builtin
from ftune.sample_data import generate_rows, jsonl_text, to_chat
from ftune.tiny_model import ARCHITECTURE, MARKER_FILE, build_tiny_model

FAST = 3  # pretraining steps: these tests check the build mechanics, not how well the model learns


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0, pretrain_steps=FAST)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FTUNE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def test_loads_through_the_auto_classes_as_a_float32_llama(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert isinstance(model, LlamaForCausalLM)
    assert model.dtype == torch.float32
    config = model.config
    assert config.architectures == ["LlamaForCausalLM"]
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "tie_word_embeddings",
    ):
        assert getattr(config, key) == ARCHITECTURE[key], key
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_config_special_ids_and_vocab_match_the_tokenizer(model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.vocab_size == len(tokenizer) == model.get_input_embeddings().num_embeddings
    assert model.config.bos_token_id == tokenizer.bos_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3


def test_forward_and_generate_run(model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    batch = tokenizer(["What is 2 + 3?", "Hi"], padding=True, return_tensors="pt")
    logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, len(tokenizer))
    out = model.generate(batch["input_ids"][:1], max_new_tokens=4, do_sample=False)
    assert out.shape[1] > batch["input_ids"].shape[1]


def test_tokenizer_settings(tokenizer):
    assert tokenizer.bos_token == "<|begin_of_text|>"
    assert tokenizer.eos_token == "<|end_of_text|>"
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.padding_side == "right"
    assert tokenizer.model_max_length == 1024
    assert len(tokenizer) == tiny_model.VOCAB_SIZE
    for token in ("<|system|>", "<|user|>", "<|assistant|>"):
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [
            tokenizer.convert_tokens_to_ids(token)
        ]


def test_encoding_adds_bos_only(tokenizer):
    ids = tokenizer("What is 2 + 3?")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.eos_token_id not in ids


def test_decode_inverts_encode_on_sample_text_and_beyond(tokenizer):
    texts = [t for row in generate_rows(200, seed=5) for t in row.values()]
    texts += ["Ünïcödé → 🙂", "  two  spaces\tand a tab\n", "### Response:\n"]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_sample_text_compresses_well(tokenizer):
    # The BPE was trained on this data: an instruction is a handful of tokens, not bytes.
    ids = tokenizer("What is the capital of France?", add_special_tokens=False)["input_ids"]
    assert len(ids) <= 8


def test_chat_template_renders_all_roles(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|begin_of_text|><|system|>\nBe brief.<|end_of_text|>\n"
        "<|user|>\nWhat is 2 + 3?<|end_of_text|>\n<|assistant|>\n5<|end_of_text|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == text[: text.index("5<|end_of_text|>")]
    no_prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False)
    assert not no_prompt.endswith("<|assistant|>\n")


def test_chat_template_tokenizes_with_one_bos_and_round_trips(tokenizer):
    messages = to_chat(
        {"instruction": "Reverse the letters of the word.", "input": "river", "output": "revir"}
    )
    text = tokenizer.apply_chat_template(messages["messages"], tokenize=False)
    ids = tokenizer.apply_chat_template(messages["messages"], tokenize=True, return_dict=True)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids) == text


def test_chat_template_rejects_unknown_roles(tokenizer):
    with pytest.raises(Exception, match="Unknown role tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_same_seed_gives_identical_files_and_other_seed_other_weights(model_dir, tmp_path):
    again = build_tiny_model(tmp_path / "again", seed=0, pretrain_steps=FAST)
    first, second = _tensors(model_dir), _tensors(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", MARKER_FILE):
        assert (model_dir / name).read_bytes() == (again / name).read_bytes(), name
    other_dir = build_tiny_model(tmp_path / "other", seed=1, pretrain_steps=FAST)
    other = _tensors(other_dir)
    name = "model.embed_tokens.weight"
    assert other[name].shape == first[name].shape and not torch.equal(other[name], first[name])
    # The tokenizer comes from the sample dataset, not the weight seed.
    assert (other_dir / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()


def test_build_leaves_the_global_torch_rng_alone(tmp_path):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    build_tiny_model(tmp_path / "m", data_rows=200, pretrain_steps=FAST)
    assert torch.equal(torch.rand(3), expected)


def test_marker_records_the_build(model_dir):
    marker = json.loads((model_dir / MARKER_FILE).read_text())
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert marker["seed"] == 0 and marker["data_rows"] == 4000
    assert marker["num_parameters"] == model.num_parameters()
    assert marker["architecture"] == json.loads(json.dumps(ARCHITECTURE))


def test_ensure_builds_once_under_ftune_home(home, monkeypatch):
    path = ensure_tiny_model(pretrain_steps=FAST)
    assert path == home / "models" / "tiny-llama"
    assert (path / "model.safetensors").is_file() and (path / MARKER_FILE).is_file()
    assert [p.name for p in path.parent.iterdir()] == ["tiny-llama"]  # no temp dirs left behind

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt an up-to-date model")

    monkeypatch.setattr(builtin_assets, "build_tiny_model", fail)
    assert ensure_tiny_model(pretrain_steps=FAST) == path


def test_ensure_rebuilds_for_another_seed_and_when_forced(home):
    path = ensure_tiny_model(seed=0, pretrain_steps=FAST)
    before = _tensors(path)["lm_head.weight"]
    ensure_tiny_model(seed=1, pretrain_steps=FAST)
    assert json.loads((path / MARKER_FILE).read_text())["seed"] == 1
    assert not torch.equal(_tensors(path)["lm_head.weight"], before)
    (path / "stray.txt").write_text("from the old build")
    ensure_tiny_model(seed=1, force=True, pretrain_steps=FAST)
    assert not (path / "stray.txt").exists()
    # A cache from an older build format is rebuilt, not reused.
    marker = json.loads((path / MARKER_FILE).read_text())
    (path / MARKER_FILE).write_text(json.dumps({**marker, "format_version": tiny_model.FORMAT_VERSION - 1}))
    (path / "stray.txt").write_text("from the old build")
    ensure_tiny_model(seed=1, pretrain_steps=FAST)
    assert not (path / "stray.txt").exists()
    assert json.loads((path / MARKER_FILE).read_text())["format_version"] == tiny_model.FORMAT_VERSION
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny-llama"]


def test_ensure_keeps_the_copy_of_a_process_that_finished_first(home, monkeypatch):
    final = home / "models" / "tiny-llama"
    real_build = tiny_model.build_tiny_model

    def build_while_another_process_publishes(out_dir, **kwargs):
        real_build(out_dir, **kwargs)
        real_build(final, **kwargs)  # the competitor wins the race while we are still building
        (final / "winner.txt").write_text("competitor")

    monkeypatch.setattr(builtin_assets, "build_tiny_model", build_while_another_process_publishes)
    assert ensure_tiny_model(pretrain_steps=FAST) == final
    assert (final / "winner.txt").read_text() == "competitor"
    assert [p.name for p in final.parent.iterdir()] == ["tiny-llama"]


def test_ensure_refuses_to_overwrite_a_foreign_directory(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a tiny-model build"):
        ensure_tiny_model(foreign, pretrain_steps=FAST)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_ensure_sample_dataset_writes_and_repairs_the_file(home):
    path = ensure_sample_dataset()
    assert path == home / "data" / "sample" / "train.jsonl"
    expected = jsonl_text(generate_rows(builtin_assets.SAMPLE_ROWS, seed=builtin_assets.SAMPLE_SEED)).encode()
    assert path.read_bytes() == expected
    path.write_text('{"instruction": "stale"}\n')
    assert ensure_sample_dataset().read_bytes() == expected
    assert [p.name for p in path.parent.iterdir()] == ["train.jsonl"]


def test_resolve_builtin(ftune_home, tiny_model_dir, sample_data_path):
    model = resolve_builtin("builtin:tiny-llama")
    assert model == str(ftune_home / "models" / "tiny-llama") == str(tiny_model_dir)
    assert AutoTokenizer.from_pretrained(model).bos_token == "<|begin_of_text|>"
    data = resolve_builtin("builtin:sample-instructions")
    assert data == str(ftune_home / "data" / "sample" / "train.jsonl") == str(sample_data_path)
    assert len(Path(data).read_text().splitlines()) == builtin_assets.SAMPLE_ROWS
    for name in ("meta-llama/Llama-3.2-1B", "/data/train.jsonl", "tiny-llama", ""):
        assert resolve_builtin(name) == name


def test_resolve_builtin_rejects_unknown_names_and_lists_the_known_ones(home):
    with pytest.raises(ValueError, match="builtin:tiny-lama") as info:
        resolve_builtin("builtin:tiny-lama")
    assert "builtin:tiny-llama" in str(info.value) and "builtin:sample-instructions" in str(info.value)
    assert not home.exists()  # nothing is built for a bad name


def test_cli_builds_and_reports(tmp_path, home, capsys):
    builtin_assets.main(["--out", str(tmp_path / "cli"), "--seed", "2", "--pretrain-steps", str(FAST)])
    out = capsys.readouterr().out
    marker = json.loads((tmp_path / "cli" / MARKER_FILE).read_text())
    assert marker["seed"] == 2
    assert f"{marker['num_parameters']:,} parameters" in out
    assert str(home / "data" / "sample" / "train.jsonl") in out
