"""Config: YAML files, --set strings and the Python API share one set of checks."""

from __future__ import annotations

import pytest

from seq2seq.config import Config, ConfigError, normalize_attention


def write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_yaml_load_sets_every_section(tmp_path):
    config = Config.load(write(tmp_path, """
data: {train_src: a.en, tokenizer: char, lowercase: yes}
model: {cell: lstm, hidden_size: 32, attention: dot}
train: {lr: 0.01, epochs: 3}
decode: {beam: 4, n_best: 2}
"""))
    assert (config.data.train_src, config.data.tokenizer, config.data.lowercase) == ("a.en", "char", True)
    assert (config.model.cell, config.model.hidden_size, config.model.attention) == ("lstm", 32, "dot")
    assert (config.train.lr, config.train.epochs) == (0.01, 3)
    assert (config.decode.beam, config.decode.n_best) == (4, 2)
    assert config.model.embed_size == 256  # untouched keys keep their defaults


def test_empty_file_and_empty_section_mean_defaults(tmp_path):
    assert Config.load(write(tmp_path, "")) == Config()
    assert Config.load(write(tmp_path, "model:\n")) == Config()


def test_save_then_load_roundtrips(tmp_path):
    config = Config().override(["model.attention=luong", "train.max_minutes=2.5", "data.src_lang=en"])
    config.save(tmp_path / "saved.yaml")
    assert Config.load(tmp_path / "saved.yaml") == config
    assert Config.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("text, pattern", [
    ("modle: {cell: gru}\n", r"unknown section 'modle'; expected data, model, train, decode"),
    ("model: {hiden_size: 3}\n", r"unknown setting 'model\.hiden_size'; model has: cell, embed_size"),
    ("train: [1, 2]\n", r"section 'train' must be a mapping"),
    ("- 1\n- 2\n", r"expected a mapping of sections, got list"),
    ("model: {cell: gru\n", r"not valid YAML"),
])
def test_unknown_or_malformed_yaml_names_the_problem(tmp_path, text, pattern):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=pattern) as error:
        Config.load(path)
    assert str(path) in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        Config.load(tmp_path / "nope.yaml")


@pytest.mark.parametrize("key, value, expected", [
    ("train.lr", 1, 1.0),  # int -> float
    ("train.lr", "1e-4", 1e-4),  # YAML 1.1 reads 1e-4 as a string
    ("train.epochs", 4.0, 4),  # integral float -> int
    ("data.lowercase", "yes", True),
    ("data.lowercase", "False", False),
    ("model.attention", None, None),
    ("model.attention", "bahdanau", "bahdanau"),
])
def test_type_coercion(key, value, expected):
    config = Config()
    config.set(key, value)
    section, name = key.split(".")
    got = getattr(getattr(config, section), name)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("key, value, pattern", [
    ("train.epochs", 2.5, r"train\.epochs: expected int, got 2\.5"),
    ("train.epochs", True, r"train\.epochs: expected int, got True"),
    ("train.lr", "fast", r"train\.lr: expected float, got 'fast'"),
    ("data.lowercase", 1, r"data\.lowercase: expected bool, got 1"),
    ("data.train_src", 3, r"data\.train_src: expected str, got 3"),
    ("train.lr", None, r"train\.lr: a value is required"),
])
def test_wrong_types_name_the_key(key, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        Config().set(key, value)


def test_set_strings_are_parsed_as_yaml_scalars():
    config = Config().override(["train.lr=5e-4", "train.epochs=3", "data.lowercase=true",
                                "model.attention=none", "data.src_lang = en", "data.test_src="])
    assert config.train.lr == 5e-4 and config.train.epochs == 3 and config.data.lowercase is True
    assert config.model.attention is None and config.data.src_lang == "en" and config.data.test_src == ""


@pytest.mark.parametrize("assignment, pattern", [
    ("train.lr", r"--set 'train\.lr': expected section\.key=value"),
    ("lr=0.1", r"'lr' must look like section\.key"),
    ("train=0.1", r"'train' must look like section\.key"),
    ("train.lrr=0.1", r"unknown setting 'train\.lrr'"),
    ("train.epochs=0", r"train\.epochs must be > 0, got 0"),
    ("decode.n_best=9", r"decode\.n_best \(9\) must be <= decode\.beam \(5\)"),
    ("model.dropout=1.5", r"model\.dropout must be in \[0, 1\)"),
    ("model.cell=transformer", r"model\.cell must be one of"),
    ("train.min_lr=0.1", r"train\.min_lr \(0\.1\) must be <= train\.lr"),
    ("train.valid_beam=0", r"train\.valid_beam must be > 0"),
    ("train.plateau_patience=0", r"train\.plateau_patience must be > 0"),
    ("train.plateau_factor=1.5", r"train\.plateau_factor must be in \(0, 1\]"),
    ("train.patience=-1", r"train\.patience must be >= 0"),
])
def test_bad_set_is_an_error_naming_it(assignment, pattern):
    with pytest.raises(ConfigError, match=pattern):
        Config().override([assignment])


def test_luong_is_an_alias_of_general(tmp_path):
    assert normalize_attention("luong") == "general" and normalize_attention("Luong") == "general"
    assert normalize_attention("none") is None and normalize_attention(None) is None
    assert Config.load(write(tmp_path, "model: {attention: luong}\n")).model.attention == "general"
    assert Config().override(["model.attention=luong"]).model.attention == "general"
    with pytest.raises(ConfigError, match="unknown attention 'bahdanov'"):
        Config().override(["model.attention=bahdanov"])


# -- packaged configs and where data paths point ----------------------------------------------
def test_a_packaged_config_loads_by_name_and_a_file_by_path_wins(tmp_path, monkeypatch):
    from seq2seq.config import packaged_configs

    configs = packaged_configs()
    assert {"multi30k_en_de", "multi30k_en_de_fast", "multi30k_en_de_joey", "multi30k_en_fr"} <= set(configs)
    by_name = Config.load("multi30k_en_de")
    assert by_name.to_dict() == Config.load(configs["multi30k_en_de"]).to_dict()
    assert Config.load("multi30k_en_de.yaml").to_dict() == by_name.to_dict()
    assert by_name.data.train_tgt == "train.de.gz"
    assert Config.load("multi30k_en_fr").data.train_tgt == "train.fr.gz"
    monkeypatch.chdir(tmp_path)  # a file of that name in the current folder is read instead
    (tmp_path / "multi30k_en_de").write_text("model: {hidden_size: 48}\n", encoding="utf-8")
    assert Config.load("multi30k_en_de").model.hidden_size == 48
    with pytest.raises(ConfigError, match=r"not found: multi30k_en_xx \(packaged configs: .*multi30k_en_de"):
        Config.load("multi30k_en_xx")
    with pytest.raises(ConfigError, match=r"config file not found: sub/multi30k_en_fr"):
        Config.load("sub/multi30k_en_fr")  # a path with a folder is a path, never a packaged name


def test_the_clone_configs_folder_is_the_packaged_one():
    from pathlib import Path

    from seq2seq.config import packaged_configs

    clone = Path(__file__).resolve().parents[1] / "configs"
    assert sorted(p.name for p in clone.glob("*.yaml")) == sorted(p.name for p in packaged_configs().values())


def test_the_configs_command_lists_and_prints_them(capsys):
    from seq2seq import cli

    assert cli.main(["configs"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert any(line.startswith("multi30k_en_de ") and "English -> German" in line for line in listed)
    assert cli.main(["configs", "multi30k_en_de_joey"]) == 0
    import yaml

    assert Config.from_dict(yaml.safe_load(capsys.readouterr().out)).model.attention == "bahdanau"
    assert cli.main(["configs", "nope"]) == 1
    assert "no packaged config 'nope'; the configs are: multi30k_en_de" in capsys.readouterr().err


def test_data_paths_are_relative_to_data_dir_else_the_current_folder(tmp_path, monkeypatch):
    from seq2seq.training.setup import resolve_data_paths

    config_dir, cwd = tmp_path / "configs", tmp_path / "cwd"
    config_dir.mkdir()
    cwd.mkdir()
    path = write(config_dir, "data: {train_src: train.en, train_tgt: /abs/train.de}\n")
    monkeypatch.chdir(cwd)
    config = Config.load(path)
    resolve_data_paths(config, None)  # not the config file's folder, as DataConfig says
    assert config.data.train_src == str(cwd.resolve() / "train.en")
    assert config.data.train_tgt == "/abs/train.de"
    config = Config.load(path)
    resolve_data_paths(config, tmp_path / "data")
    assert config.data.train_src == str((tmp_path / "data" / "train.en").resolve())


@pytest.mark.parametrize("assignment, pattern", [
    ("train.seed=4611686018427387904",
     r"train\.seed must be <= 4294967295 \(2\*\*32 - 1, the range the random generators take\), "
     r"got 4611686018427387904"),
    ("train.seed=4294967296", r"train\.seed must be <= 4294967295"),
    ("train.seed=-1", r"train\.seed must be >= 0"),
    ("data.vocab_size=1099511627776", r"data\.vocab_size must be <= 2147483647 \(2\*\*31 - 1"),
])
def test_numbers_past_what_the_libraries_take_are_refused_naming_the_key(tmp_path, assignment, pattern):
    with pytest.raises(ConfigError, match=pattern):
        Config().override([assignment])
    key, value = assignment.split("=")
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=pattern):
        Config.load(write(tmp_path, f"{section}: {{{name}: {value}}}\n"))


def test_the_largest_seed_trains(tmp_path):
    """train.seed=2**32 - 1 passes validation and really seeds every generator: one step trains."""
    from conftest import write_reversal

    from seq2seq import cli

    data = write_reversal(tmp_path / "data", {"train": 40, "valid": 4})
    config = write(tmp_path, "data: {train_src: train.src, train_tgt: train.tgt, valid_src: valid.src, "
                             "valid_tgt: valid.tgt, tokenizer: char}\n"
                             "model: {embed_size: 8, hidden_size: 8}\n"
                             "train: {epochs: 1, batch_tokens: 200, device: cpu, max_steps: 2, "
                             "seed: 4294967295, threads: 1}\n")
    assert cli.main(["train", "--config", str(config), "--data-dir", str(data), "--model-dir",
                     str(tmp_path / "model")]) == 0
    assert (tmp_path / "model" / "last.safetensors").is_file()
