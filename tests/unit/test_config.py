"""Typed configs: YAML + overrides, every problem reported at once with file:line and a fix."""

from __future__ import annotations

import textwrap

import pytest

from ftune.config import TrainJobConfig
from ftune.errors import ConfigError
from ftune.yaml_config import load_config, parse_override


def write(tmp_path, text: str):
    path = tmp_path / "job.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_and_overrides_are_typed():
    cfg = load_config(TrainJobConfig, None, ["train.lr=2e-4", "lora.r=16", "scaling.num_workers=[1, 2]"])
    assert cfg.train.lr == pytest.approx(2e-4)
    assert cfg.lora.r == 16
    assert (cfg.scaling.min_workers, cfg.scaling.max_workers) == (1, 2)


def test_unknown_key_gets_did_you_mean_with_line(tmp_path):
    path = write(
        tmp_path,
        """
        lora:
          r: 8
          lora_alpha: 16
        train:
          learnig_rate: 0.1
        """,
    )
    with pytest.raises(ConfigError) as e:
        load_config(TrainJobConfig, path, [])
    msg = str(e.value)
    assert "2 problems" in msg
    assert f"{path}:4: lora.lora_alpha" in msg and "did you mean 'lora.alpha'" in msg
    assert f"{path}:6: train.learnig_rate" in msg


def test_all_problems_reported_together_with_values(tmp_path):
    path = write(
        tmp_path,
        """
        lora:
          r: 0
          dropout: 1.5
        train:
          lr: fast
        scaling:
          num_workers: [3, 1]
        """,
    )
    with pytest.raises(ConfigError) as e:
        load_config(TrainJobConfig, path, ["data.max_seq_len=-4", "model.naem_or_path=x"])
    msg = str(e.value)
    assert "6 problems" in msg
    assert f"{path}:3: lora.r: 0 is invalid" in msg
    assert f"{path}:4: lora.dropout: 1.5 is invalid" in msg
    assert f"{path}:6: train.lr: 'fast' is invalid" in msg
    assert f"{path}:8: scaling.num_workers" in msg
    assert "override 'data.max_seq_len=-4': data.max_seq_len: -4 is invalid" in msg
    assert "did you mean 'model.name_or_path'" in msg


def test_cross_section_batch_check_names_key_and_fix():
    with pytest.raises(ConfigError) as e:
        load_config(TrainJobConfig, None, ["train.global_batch_size=12", "train.micro_batch_size=4", "scaling.num_workers=2"])
    msg = str(e.value)
    assert "train.global_batch_size" in msg and "micro_batch_size (4) x workers (2) = 8" in msg


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "train:\n  lr: [1, 2\nlora: {}\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: not valid YAML"):
        load_config(TrainJobConfig, path, [])


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(TrainJobConfig, "no/such.yaml", [])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match=r"override 'train.lr.x=1': train.lr: a mapping is invalid"):
        load_config(TrainJobConfig, None, ["train.lr.x=1"])


def test_fingerprint_ignores_storage_and_workers():
    a = load_config(TrainJobConfig, None, ["storage.path=/a", "scaling.num_workers=1"])
    b = load_config(TrainJobConfig, None, ["storage.path=/b", "scaling.num_workers=2"])
    c = load_config(TrainJobConfig, None, ["train.lr=1e-3"])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_fingerprint_lets_a_resumed_run_train_longer_but_not_differently():
    base = load_config(TrainJobConfig, None, ["train.max_steps=6"]).fingerprint()
    longer = load_config(TrainJobConfig, None, ["train.max_steps=12", "train.eval_every=4", "train.checkpoint_every=3"])
    assert longer.fingerprint() == base
    for change in ("train.lr_schedule=linear", "train.warmup_ratio=0.1", "train.seed=1", "data.max_seq_len=64"):
        assert load_config(TrainJobConfig, None, ["train.max_steps=6", change]).fingerprint() != base, change


def test_every_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"
            sub = field.annotation
            if isinstance(sub, type) and hasattr(sub, "model_fields"):
                walk(sub)

    walk(TrainJobConfig)


def config_error(path) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(TrainJobConfig, path, [])
    return str(e.value)


def test_a_latin1_config_names_the_line_and_the_conversion(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes("model:\n  name_or_path: caf\xe9\n".encode("latin-1"))
    msg = config_error(path)
    assert msg.startswith(f"{path}:2: not UTF-8 text (byte 0xe9 at column 20 of 'name_or_path: caf")
    assert f"iconv -f LATIN1 -t UTF-8 {path} > {tmp_path / 'job.utf8.yaml'}" in msg


@pytest.mark.parametrize(
    ("codec", "named"), [("utf-16", "UTF-16 text"), ("utf-32", "UTF-32 text"), ("utf-16-le", "NUL bytes")]
)
def test_a_utf16_or_utf32_config_says_so(tmp_path, codec, named):
    path = tmp_path / "job.yaml"
    path.write_bytes("train:\n  lr: 0.1\n".encode(codec))
    msg = config_error(path)
    assert msg.startswith(f"{path}:1: {named}" if named == "NUL bytes" else f"{path}:1: the file is {named}")
    assert "-t UTF-8" in msg


def test_a_config_nested_too_deep_is_a_config_error(tmp_path):
    path = write(tmp_path, "train: " + "[" * 5000 + "\n")
    assert config_error(path).startswith(f"{path}: nested too deeply to read")


def test_a_value_yaml_cannot_convert_names_its_line_and_the_fix(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.1\n  seed: 2024-13-45\n")
    msg = config_error(path)
    assert msg.startswith(f"{path}:3: '2024-13-45': YAML cannot convert this value") and "quotes" in msg
    with pytest.raises(ConfigError, match=r"override 'train.seed=2024-13-45': train.seed: '2024-13-45'"):
        load_config(TrainJobConfig, None, ["train.seed=2024-13-45"])


def test_a_control_character_names_its_line(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.1\x07\n")
    expected = f"{path}:2: not valid YAML: control character U+0007 is not allowed in YAML; remove it"
    assert config_error(path) == expected
