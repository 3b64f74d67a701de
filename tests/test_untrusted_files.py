"""Untrusted model files: loading runs no code and allocates nothing a tampered file asks for.

Weights are read only through safetensors, settings only through JSON or ``yaml.safe_load``.
Each test plants a payload that runs ``touch MARKER`` when unpickled (or YAML-constructed) and
checks that loading refuses the file with an error naming it, and that MARKER never appears.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import within
from safetensors.torch import save as safetensors_bytes

from seq2seq import cli
from seq2seq.config import ConfigError
from seq2seq.decoding.translator import Translator
from seq2seq.models.checkpoint import FORMAT, CheckpointError, read_checkpoint

SRC = Path(__file__).resolve().parents[1] / "src" / "seq2seq"


class Payload:
    """Unpickling this object runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def pickle_bytes(marker: Path) -> bytes:
    return pickle.dumps({"model": Payload(marker)})


def torch_pt_bytes(marker: Path, path: Path) -> bytes:
    """A torch.save file (zip with a pickle inside) that runs the payload on torch.load."""
    torch.save({"state_dict": Payload(marker)}, path)
    return path.read_bytes()


YAML_PAYLOAD = "!!python/object/apply:os.system [{command}]\n"


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PWNED_marker"


@pytest.fixture
def model_dir(trained_model_dir, tmp_path) -> Path:
    """A private copy of the trained model directory, to tamper with."""
    return Path(shutil.copytree(trained_model_dir, tmp_path / "model"))


def test_the_payloads_are_live(tmp_path):
    """The planted files would run code if anything unpickled them: the tests below mean something."""
    first, second, third = tmp_path / "one", tmp_path / "two", tmp_path / "three"
    pickle.loads(pickle_bytes(first))
    torch_pt_bytes(second, tmp_path / "x.pt")
    torch.load(tmp_path / "x.pt", weights_only=False)
    yaml.unsafe_load(YAML_PAYLOAD.format(command=json.dumps(f"touch {third}")))
    assert first.exists() and second.exists() and third.exists()


def translate_cli(model_dir: Path, tmp_path: Path, *extra: str) -> int:
    source = tmp_path / "in.txt"
    source.write_text("a b c\n")
    return cli.main(["translate", "--model-dir", str(model_dir), "--input", str(source),
                     "--output", str(tmp_path / "out.txt"), "--device", "cpu", *extra])


def assert_refused(model_dir: Path, tmp_path: Path, capsys, marker: Path, named: str,
                   checkpoint: str = "best") -> None:
    """Translator.load and ``seq2seq translate`` refuse the folder, name ``named``, run nothing."""
    with pytest.raises(ValueError) as caught:  # CheckpointError, ConfigError: ValueErrors
        Translator.load(model_dir, checkpoint=checkpoint, device="cpu")
    assert named in str(caught.value)
    capsys.readouterr()
    code = translate_cli(model_dir, tmp_path, "--checkpoint", checkpoint)
    err = capsys.readouterr().err
    assert code == cli.EXIT_ERROR
    assert err.startswith("seq2seq: error: ") and named in err and "Traceback" not in err
    assert not (tmp_path / "out.txt").exists()
    assert not marker.exists(), "the payload ran"


# -- pickles planted as weights -------------------------------------------------------------
@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
@pytest.mark.parametrize("checkpoint", ["best", "last"])
def test_pickle_renamed_to_safetensors_is_refused(model_dir, tmp_path, capsys, marker, kind,
                                                  checkpoint):
    target = model_dir / f"{checkpoint}.safetensors"
    data = pickle_bytes(marker) if kind == "pickle" else torch_pt_bytes(marker, tmp_path / "p.pt")
    target.write_bytes(data)
    assert_refused(model_dir, tmp_path, capsys, marker, f"{target}: not a readable safetensors",
                   checkpoint)


def test_pytorch_bin_and_pt_files_are_never_read(model_dir, tmp_path, capsys, marker):
    for name in ("best.safetensors", "last.safetensors"):
        (model_dir / name).unlink()
    (model_dir / "pytorch_model.bin").write_bytes(torch_pt_bytes(marker, tmp_path / "p.pt"))
    (model_dir / "model.pt").write_bytes(pickle_bytes(marker))
    (model_dir / "best.pt").write_bytes(pickle_bytes(marker))
    assert_refused(model_dir, tmp_path, capsys, marker, f"checkpoint not found: {model_dir}")


def test_a_plain_safetensors_file_is_not_taken_for_a_checkpoint(model_dir, tmp_path, capsys, marker):
    tensors, _ = read_checkpoint(model_dir / "best.safetensors")
    (model_dir / "best.safetensors").write_bytes(safetensors_bytes(tensors))  # no metadata
    assert_refused(model_dir, tmp_path, capsys, marker, "not a seq2seq checkpoint")


def test_checkpoint_metadata_that_is_not_json_is_refused(model_dir, tmp_path, capsys, marker):
    tensors, _ = read_checkpoint(model_dir / "best.safetensors")
    header = {"format": FORMAT, "meta": pickle_bytes(marker).decode("latin-1")}
    (model_dir / "best.safetensors").write_bytes(safetensors_bytes(tensors, metadata=header))
    assert_refused(model_dir, tmp_path, capsys, marker, "metadata is not valid JSON")


# -- settings: YAML tags, tampered tokenizer JSON -------------------------------------------
@pytest.mark.parametrize("where", ["whole file", "one value"])
def test_python_tags_in_config_yaml_are_refused(model_dir, tmp_path, capsys, marker, where):
    payload = YAML_PAYLOAD.format(command=json.dumps(f"touch {marker}"))
    path = model_dir / "config.yaml"
    if where == "whole file":
        path.write_text(payload)
    else:
        text = path.read_text()
        path.write_text(re.sub(r"hidden_size: \d+", "hidden_size: " + payload.strip(), text))
    assert_refused(model_dir, tmp_path, capsys, marker, f"{path}: not valid YAML")


@pytest.mark.parametrize("name", ["tokenizer.json", "src.vocab.json"])
def test_pickled_tokenizer_files_are_refused(model_dir, tmp_path, capsys, marker, name):
    (model_dir / name).write_bytes(pickle_bytes(marker))
    assert_refused(model_dir, tmp_path, capsys, marker, f"{model_dir / name}: not valid JSON")


@pytest.mark.parametrize("spec, named", [
    ({"kind": "word", "src": "../../etc/passwd", "tgt": "tgt"}, "field 'src'"),
    ({"kind": "word", "src": "/tmp/src", "tgt": "tgt"}, "field 'src'"),
    ({"kind": "word", "tgt": "tgt"}, "field 'src' is missing"),
    (["src", "tgt"], "expected a JSON object"),
], ids=["relative path", "absolute path", "missing", "a list"])
def test_tampered_tokenizer_json_is_refused(model_dir, tmp_path, capsys, marker, spec, named):
    (model_dir / "tokenizer.json").write_text(json.dumps(spec))
    assert_refused(model_dir, tmp_path, capsys, marker, named)


@pytest.mark.parametrize("change, named", [
    (lambda spec: spec.update(tokens="<pad> <unk>"), "field 'tokens'"),
    (lambda spec: spec.update(tokens=["a", "b"]), "field 'tokens'"),
    (lambda spec: spec.update(kind="pickle"), "field 'kind'"),
    (lambda spec: spec.update(lowercase="yes"), "field 'lowercase'"),
    (lambda spec: spec.update(kind="sentencepiece", model="model.pt", size=12), "not a sentencepiece"),
    (lambda spec: spec.update(kind="sentencepiece", model="../config.yaml", size=12), "field 'model'"),
], ids=["tokens a string", "no specials", "unknown kind", "lowercase a string",
        "pickle as sentencepiece", "path outside"])
def test_tampered_vocabulary_is_refused(model_dir, tmp_path, capsys, marker, change, named):
    (model_dir / "model.pt").write_bytes(pickle_bytes(marker))
    path = model_dir / "src.vocab.json"
    spec = json.loads(path.read_text())
    change(spec)
    path.write_text(json.dumps(spec))
    assert_refused(model_dir, tmp_path, capsys, marker, str(path))
    assert named in str(pytest.raises(ValueError, Translator.load, model_dir).value)


# -- settings that do not match the weights -----------------------------------------------
def _edit_config(model_dir: Path, section: str, key: str, value) -> None:
    path = model_dir / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config[section][key] = value
    path.write_text(yaml.safe_dump(config))


@pytest.mark.parametrize("value", [48, 10**6])
def test_config_that_does_not_match_the_weights_is_refused_before_allocating(model_dir, tmp_path,
                                                                             capsys, marker, value):
    _edit_config(model_dir, "model", "hidden_size", value)  # 10**6: 12 TB of GRU weights
    # Building a 12 TB model would fail to allocate (a different error) or exhaust memory: the
    # shape error proves the refusal came first.
    assert_refused(model_dir, tmp_path, capsys, marker, "has shape")
    with pytest.raises(CheckpointError, match=r"weight '[\w.]+' has shape \(\d+, \d+\), the model "
                                              r"that the settings describe expects"):
        Translator.load(model_dir)


def test_config_of_an_impossible_size_is_refused(model_dir, tmp_path, capsys, marker):
    _edit_config(model_dir, "model", "hidden_size", 10**10)
    assert_refused(model_dir, tmp_path, capsys, marker,
                   f"{model_dir / 'config.yaml'}: cannot build the model it describes")


def test_unknown_setting_in_config_yaml_names_it(model_dir, tmp_path, capsys, marker):
    _edit_config(model_dir, "model", "hiden_size", 64)
    assert_refused(model_dir, tmp_path, capsys, marker, "'model.hiden_size'")
    with pytest.raises(ConfigError, match="unknown setting 'model.hiden_size'; model has: cell"):
        Translator.load(model_dir)


def test_setting_of_the_wrong_type_names_it(model_dir, tmp_path, capsys, marker):
    _edit_config(model_dir, "model", "dropout", "lots")
    assert_refused(model_dir, tmp_path, capsys, marker, "model.dropout: expected float, got 'lots'")


def test_vocabulary_that_does_not_match_the_weights_is_refused(model_dir, tmp_path, capsys, marker):
    path = model_dir / "src.vocab.json"
    spec = json.loads(path.read_text())
    spec["tokens"].append("extra")
    path.write_text(json.dumps(spec))
    assert_refused(model_dir, tmp_path, capsys, marker, "'src_embed.weight' has shape")


@pytest.mark.parametrize("change, named", [
    (lambda t: t.update({"model.extra.weight": torch.zeros(2)}), "unknown weight 'extra.weight'"),
    (lambda t: t.pop("model.generator.bias"), "weight 'generator.bias' is missing"),
    (lambda t: t.update({k: v.double() for k, v in t.items() if k.endswith("generator.bias")}),
     "'generator.bias' has dtype torch.float64, expected torch.float32"),
], ids=["unknown", "missing", "dtype"])
def test_tampered_tensors_are_refused(model_dir, tmp_path, capsys, marker, change, named):
    path = model_dir / "best.safetensors"
    tensors, meta = read_checkpoint(path)
    assert "model.generator.bias" in tensors
    change(tensors)
    header = {"format": FORMAT, "meta": json.dumps(meta)}
    path.write_bytes(safetensors_bytes(tensors, metadata=header))
    assert_refused(model_dir, tmp_path, capsys, marker, named)


# -- the code itself --------------------------------------------------------------------------
def test_no_module_uses_a_loader_that_can_run_code():
    """Weights through safetensors, settings through json and yaml.safe_load: nothing else."""
    unsafe = re.compile(r"\b(pickle|cPickle|dill|joblib|marshal|shelve)\b|torch\.load\(|"
                        r"yaml\.(load|unsafe_load|full_load)\(|allow_pickle\s*=\s*True|(?<![.\w])(eval|exec)\(")
    found = [f"{path.name}:{number}: {line.strip()}" for path in sorted(SRC.glob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), start=1)
             if unsafe.search(line)]
    assert not found, found


# -- EncoderDecoderRNN.load ---------------------------------------------------------------------
@pytest.fixture
def rnn_dir(tmp_path) -> Path:
    from seq2seq.vectors.model import EncoderDecoderRNN

    EncoderDecoderRNN(2, 8, 3, loss="cross_entropy", attention="bahdanau", seed=0,
                      device="cpu").save(tmp_path / "rnn")
    return tmp_path / "rnn"


def _refused_by_rnn_load(rnn_dir: Path, marker: Path, named: str) -> None:
    from seq2seq.vectors.model import EncoderDecoderRNN

    with pytest.raises(ValueError) as caught:
        EncoderDecoderRNN.load(rnn_dir, device="cpu")
    assert named in str(caught.value)
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("name", ["model.safetensors", "settings.json"])
def test_rnn_load_refuses_pickles(rnn_dir, tmp_path, marker, name):
    (rnn_dir / name).write_bytes(pickle_bytes(marker))
    (rnn_dir / "model.pt").write_bytes(torch_pt_bytes(marker, tmp_path / "p.pt"))
    _refused_by_rnn_load(rnn_dir, marker, str(rnn_dir / name))


def test_rnn_load_never_reads_pt_files(rnn_dir, tmp_path, marker):
    (rnn_dir / "model.safetensors").unlink()
    (rnn_dir / "model.pt").write_bytes(torch_pt_bytes(marker, tmp_path / "p.pt"))
    (rnn_dir / "pytorch_model.bin").write_bytes(pickle_bytes(marker))
    _refused_by_rnn_load(rnn_dir, marker, f"{rnn_dir / 'model.safetensors'} not found")


@pytest.mark.parametrize("change, named", [
    ({"hidden_size": 16}, "weight 'decoder.attention.energy_layer.weight' has shape (1, 8), the model "
                          "that the settings describe expects (1, 16)"),
    ({"hidden_size": 10**6}, "has shape"),  # 4 TB of weights: refused before allocating
    ({"hidden_size": 10**10}, "settings.json: cannot build the model it describes"),
    ({"attention": None}, "unknown weight 'decoder.attention.energy_layer.weight'"),
    ({"hidden_size": "8"}, "settings.json: hidden_size must be a positive integer, got '8'"),
    ({"hiden_size": 8}, "settings.json: unknown setting(s) hiden_size"),
    ({"target_length": -1}, "settings.json: target_length must be null or a positive integer"),
    ({"format": "pickle"}, "settings.json: format must be 'seq2seq.EncoderDecoderRNN'"),
])
def test_rnn_load_names_the_setting_that_does_not_fit(rnn_dir, marker, change, named):
    path = rnn_dir / "settings.json"
    settings = json.loads(path.read_text())
    settings.update(change)
    path.write_text(json.dumps(settings))
    _refused_by_rnn_load(rnn_dir, marker, named)


# -- names in a prepared corpus's manifest ------------------------------------------------------
def _prepared_run(tmp_path: Path):
    """A small corpus prepared into ``tmp_path/shared``; the config that names it."""
    from seq2seq.config import Config
    from seq2seq.data.prepare import binarize

    words = [f"w{i}" for i in range(40)]
    lines = [" ".join(words[(i * 7 + j) % 40] for j in range(1 + i % 9)) for i in range(300)]
    (tmp_path / "train.src").write_text("".join(line + "\n" for line in lines))
    (tmp_path / "train.tgt").write_text("".join(line[::-1] + "\n" for line in lines))
    config = Config.from_dict({"data": {"train_src": str(tmp_path / "train.src"),
                                        "train_tgt": str(tmp_path / "train.tgt"), "tokenizer": "word",
                                        "vocab_size": 100, "prepared": str(tmp_path / "shared")}})
    binarize(config, tmp_path / "shared", workers=1, log=lambda _message: None)
    return config


def _edit_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["../planted", "../../planted", "/tmp/planted", "sub/planted", ".."])
def test_tokenizer_file_names_in_a_manifest_cannot_write_outside_the_model_folder(tmp_path, name):
    """train copies the files a manifest's tokenizer_files names into the model folder: a name
    with a folder in it (``../x``) is refused, naming it and the manifest, and nothing is written."""
    import hashlib

    from seq2seq.data.text import DataError
    from seq2seq.training.distributed import Distributed
    from seq2seq.training.setup import training_corpus

    config = _prepared_run(tmp_path)
    shared = tmp_path / "shared"
    (tmp_path / "planted").write_text("export EVIL=1\n")  # what a real ../planted would read
    digest = hashlib.sha256(b"export EVIL=1\n").hexdigest()
    _edit_manifest(shared, lambda m: m["tokenizer_files"].update({name: digest}))
    model_dir = tmp_path / "deep" / "model"
    model_dir.mkdir(parents=True)
    before = sorted(p for p in tmp_path.rglob("*") if "shared" not in p.parts)
    with pytest.raises(DataError, match=rf"^{re.escape(str(shared / 'manifest.json'))}: .*"
                                        rf"{re.escape(repr(name))} is not a plain file name"):
        training_corpus(config, model_dir, Distributed(), resume=False, log=lambda _message: None)
    assert sorted(p for p in tmp_path.rglob("*") if "shared" not in p.parts) == before
    assert not (tmp_path / "deep" / "planted").exists() and list(model_dir.iterdir()) == []


@pytest.mark.parametrize("kind", ["symlink to /dev/zero", "fifo", "symlink to a copy"])
def test_tokenizer_files_that_are_links_or_fifos_are_refused_at_once(tmp_path, kind):
    """A tokenizer file of a prepared folder that is a link to /dev/zero, a FIFO or any link:
    prepare and train refuse it within seconds, naming it, and the model folder gets nothing."""
    from seq2seq.data.text import DataError
    from seq2seq.training.distributed import Distributed
    from seq2seq.training.setup import training_corpus

    config = _prepared_run(tmp_path)
    shared = tmp_path / "shared"
    path = shared / json.loads((shared / "manifest.json").read_text())["tokenizer_files"].popitem()[0]
    path.rename(tmp_path / "copy")
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero" if kind == "symlink to /dev/zero" else tmp_path / "copy")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    what = "not a regular file" if kind == "fifo" else "a symbolic link"
    error = within(lambda: training_corpus(config, model_dir, Distributed(), resume=False,
                                           log=lambda _message: None),
                   30, "training_corpus on the planted file")
    assert isinstance(error, DataError), error
    assert re.search(rf"^{re.escape(str(path))} \(named by .*manifest\.json, tokenizer_files\): {what}",
                     str(error)), str(error)
    assert list(model_dir.iterdir()) == []


@pytest.mark.parametrize("kind", ["symlink to a good copy", "symlink to /dev/zero", "fifo"])
def test_vocabularies_named_by_tokenizer_json_are_not_read_through_links(model_dir, tmp_path, capsys, marker,
                                                                        kind):
    """``tokenizer.json`` names the vocabularies: each is a name from data, read only as a regular
    file in the model folder (O_NOFOLLOW), even a link to a good copy."""
    vocab = model_dir / "src.vocab.json"
    shutil.move(vocab, tmp_path / "copy.vocab.json")
    if kind == "fifo":
        os.mkfifo(vocab)
    else:
        vocab.symlink_to("/dev/zero" if kind == "symlink to /dev/zero" else tmp_path / "copy.vocab.json")
    what = "not a regular file (a FIFO)" if kind == "fifo" else "a symbolic link"
    assert_refused(model_dir, tmp_path, capsys, marker,
                   f"src.vocab.json (named by {model_dir / 'tokenizer.json'}): {what}")


def test_a_sentencepiece_model_name_is_a_plain_name_read_without_following_links(tmp_path):
    from seq2seq.config import DataConfig
    from seq2seq.data.text import DataError
    from seq2seq.data.tokenizers import Tokenizer, train_tokenizers

    lines = [f"w{i % 37} w{(i * 7) % 41} w{(i * 3) % 29}" for i in range(300)]
    data = DataConfig(tokenizer="sentencepiece", vocab_size=60, joint_vocab=True)
    train_tokenizers(data, lines, lines, tmp_path, log=lambda _message: None)
    spec = json.loads((tmp_path / "joint.vocab.json").read_text())
    model = tmp_path / spec["model"]
    assert len(Tokenizer.load(tmp_path, "joint")) == spec["size"]
    model.rename(tmp_path / "elsewhere.model")
    model.symlink_to(tmp_path / "elsewhere.model")
    named = rf"{re.escape(str(model))} \(named by .*joint\.vocab\.json\)"
    with pytest.raises(DataError, match=f"{named}: a symbolic link"):
        Tokenizer.load(tmp_path, "joint")
    for bad, message in [("../elsewhere.model", "field 'model' must be a file name in the same folder"),
                         ("/etc/passwd", "field 'model' must be a file name in the same folder"),
                         ("..", r"joint\.vocab\.json: file name '\.\.' is not a plain file name")]:
        (tmp_path / "joint.vocab.json").write_text(json.dumps({**spec, "model": bad}))
        with pytest.raises(DataError, match=message):
            Tokenizer.load(tmp_path, "joint")


def test_the_train_command_refuses_a_planted_tokenizer_name_in_one_line(tmp_path, capsys):
    """``seq2seq train`` with ``data.prepared`` naming a folder whose manifest plants
    ``../planted`` (read from beside the folder, written beside the model folder): exit 1, one
    line naming the name and the manifest, nothing written outside the model folder."""
    import hashlib

    import yaml

    config = _prepared_run(tmp_path)
    shared = tmp_path / "shared"
    body = b"export EVIL=1\n"
    (tmp_path / "planted").write_bytes(body)  # what shared/../planted reads
    digest = hashlib.sha256(body).hexdigest()
    _edit_manifest(shared, lambda m: m["tokenizer_files"].update({"../planted": digest}))
    settings = config.to_dict()
    settings["model"].update(embed_size=8, hidden_size=8)
    settings["train"].update(epochs=1, device="cpu", max_steps=1)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(settings))
    model_dir = tmp_path / "runs" / "model"
    def files() -> list[Path]:  # outside the model folder; prepare's lock is its own
        return sorted(p for p in tmp_path.rglob("*") if "runs" not in p.parts and p.name != "prepare.lock")

    before = files()
    capsys.readouterr()
    code = cli.main(["train", "--config", str(tmp_path / "cfg.yaml"), "--model-dir", str(model_dir)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and err.count("\n") == 1
    assert err.startswith(f"seq2seq: error: {shared / 'manifest.json'}: ") and "'../planted'" in err
    assert files() == before and not (tmp_path / "runs" / "planted").exists()
