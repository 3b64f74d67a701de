"""The Transformer: config keys, masks, the key/value cache, search, toy tasks learned, and the
pipeline's parts (training resume and DDP, Translator, server) with a Transformer."""

from __future__ import annotations

import itertools
import math
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_crash_resume as crash
import test_distributed as dist
import torch
from conftest import write_reversal
from fastapi.testclient import TestClient

from seq2seq import cli, kernels
from seq2seq.config import Config, ConfigError
from seq2seq.data.tokenizers import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from seq2seq.decoding.search import beam_search, greedy_search, max_output_lengths
from seq2seq.decoding.translator import Translator
from seq2seq.kernels.ops import precision_autocast
from seq2seq.models.builder import build_model
from seq2seq.models.checkpoint import CheckpointError
from seq2seq.models.transformer.model import Transformer
from seq2seq.models.transformer.session import TransformerSession
from seq2seq.serving.app import create_app
from seq2seq.serving.settings import ServeConfig
from seq2seq.training.schedule import Schedule, ScheduleState

PAD, BOS, EOS = 0, 1, 2
VOCAB = 12
TINY = ("model.arch=transformer", "model.d_model=32", "model.heads=4", "model.ff_size=64",
        "model.encoder_layers=2", "model.decoder_layers=2", "model.dropout=0.1")


def model(*settings: str, seed: int = 0, vocab: int = VOCAB) -> Transformer:
    torch.manual_seed(seed)
    net = build_model(Config().override([*TINY, *settings]).model, vocab, vocab, PAD)
    return net.eval()


def batch(seed: int = 1, lengths=(7, 4, 2, 5)) -> tuple[torch.Tensor, torch.Tensor]:
    """(4, 7) ids in 3..VOCAB-1 with padding after each length, and the (4,) lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    src = torch.randint(3, VOCAB, (len(lengths), int(lengths.max())), generator=g)
    src[torch.arange(src.size(1)) >= lengths.unsqueeze(1)] = PAD
    return src, lengths


# -- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings, key", [
    (["model.arch=transformer", "model.cell=lstm"], "model.cell"),
    (["model.arch=transformer", "model.hidden_size=64"], "model.hidden_size"),
    (["model.arch=transformer", "model.attention=dot"], "model.attention"),
    (["model.arch=transformer", "model.input_feeding=false"], "model.input_feeding"),
    (["model.d_model=128"], "model.d_model"),  # a Transformer key with the default arch, rnn
    (["model.norm=post"], "model.norm"),
    (["model.arch=transformer", "model.heads=3"], "model.heads"),
    (["model.arch=transformer", "model.norm=sandwich"], "model.norm"),
    (["model.arch=transformer", "model.positions=rotary"], "model.positions"),
    (["model.arch=transformer", "model.attention_dropout=1.5"], "model.attention_dropout"),
    (["model.arch=cnn"], "model.arch"),
    (["model.arch=transformer", "model.share_embeddings=true", "data.tokenizer=char"],
     "model.share_embeddings"),
    (["model.arch=transformer", "train.sampling_ratio=0.2"], "train.sampling_ratio"),
])
def test_a_config_error_names_the_key(settings, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Config().override(settings)


def test_a_saved_transformer_config_loads_back(tmp_path):
    config = Config().override([*TINY, "model.norm=post", "model.positions=learned"])
    config.save(tmp_path / "c.yaml")  # every key, the RNN's at their defaults
    assert Config.load(tmp_path / "c.yaml").model == config.model


def test_embeddings_are_tied_across_source_target_and_output_where_asked():
    net = model("model.share_embeddings=true")
    assert net.src_embed.weight is net.tgt_embed.weight is net.generator.weight
    apart = model("model.tie_embeddings=false")
    assert apart.src_embed.weight is not apart.tgt_embed.weight
    assert apart.generator.weight is not apart.tgt_embed.weight


# -- masks -------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm, positions", [("pre", "sinusoidal"), ("post", "learned")])
def test_padded_source_positions_and_future_targets_change_nothing(norm, positions):
    net = model(f"model.norm={norm}", f"model.positions={positions}")
    src, lengths = batch()
    tgt = torch.randint(3, VOCAB, (4, 6), generator=torch.Generator().manual_seed(2))
    scores, _ = net(src, lengths, tgt)
    noisy = src.clone()
    noisy[src == PAD] = 5  # other ids where the source is padding
    assert torch.equal(net(noisy, lengths, tgt)[0], scores)
    later = tgt.clone()
    later[:, 4:] = 7  # the future from position 4 on
    changed, _ = net(src, lengths, later)
    torch.testing.assert_close(changed[:, :4], scores[:, :4], rtol=0, atol=1e-6)
    assert not torch.allclose(changed[:, 4:], scores[:, 4:])


def test_the_loss_is_the_summed_cross_entropy_of_the_scores():
    net = model()
    src, lengths = batch()
    tgt = torch.randint(3, VOCAB, (4, 5))
    tgt[2, 3:] = PAD
    scores, _ = net(src, lengths, tgt)
    loss, _ = net(src, lengths, tgt, tgt_out=tgt, label_smoothing=0.1)
    want = torch.nn.functional.cross_entropy(scores.reshape(-1, VOCAB), tgt.reshape(-1), ignore_index=PAD,
                                             reduction="sum", label_smoothing=0.1)
    torch.testing.assert_close(loss, want)


def test_estimated_flops_match_torchs_count_of_the_products():
    """torch's FlopCounterMode counts the linear layers' products but not SDPA on CPU: the
    estimate less its attention pairs (4 * d_model FLOPs per pair and layer) must match it."""
    from torch.utils.flop_counter import FlopCounterMode

    net = model("model.tie_embeddings=false")
    src, lengths = batch()
    tgt = torch.randint(3, VOCAB, (4, 6))
    with FlopCounterMode(display=False) as counter:
        net(src, lengths, tgt)
    n, s, t, d = 4, src.size(1), tgt.size(1), net.config.d_model
    attention = 4 * d * (2 * n * s * s + 2 * (n * t * t + n * s * t))  # 2 encoder, 2 decoder layers
    assert net.estimate_flops(n * s, n * t, n * s * t) - attention == counter.get_total_flops()


# -- the cache ---------------------------------------------------------------------------------
@pytest.mark.parametrize("beams", [1, 3])
def test_cached_steps_score_as_recomputing_the_whole_prefix(beams):
    net = model(seed=3)
    session = TransformerSession(net)
    src, lengths = batch()
    memory, state = session.encode(src, lengths)
    rows = len(lengths) * beams
    prefix = torch.full((rows, 1), BOS)
    g = torch.Generator().manual_seed(4)
    with torch.inference_mode():
        for step in range(6):
            if step == 3:  # beams reorder their rows (each sentence's rows among its own)
                index = torch.arange(rows).view(-1, beams).flip(1).reshape(-1)
                state, prefix = session.reorder_state(state, index), prefix[index]
            scores, state, _ = session.step(prefix[:, -1:], state, memory, beams)
            full_src = src.repeat_interleave(beams, 0)
            whole, _ = net(full_src, lengths.repeat_interleave(beams), prefix)
            torch.testing.assert_close(scores[:, 0], whole[:, -1], rtol=0, atol=1e-5)
            prefix = torch.cat([prefix, torch.randint(3, VOCAB, (rows, 1), generator=g)], 1)


def test_the_cache_is_the_sessions_and_the_modules_hold_parameters_only():
    net = model()
    before = {name: t.clone() for name, t in net.state_dict().items()}
    src, lengths = batch()
    greedy_search(net, src, lengths, bos=BOS, eos=EOS, max_lengths=torch.full((4,), 6))
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(vars(m).get("_forward_hooks") or vars(m).get("_forward_pre_hooks") for m in net.modules())


# -- search ------------------------------------------------------------------------------------
def test_greedy_equals_beam_one_and_padding_changes_no_output():
    net = model(seed=5)
    src, lengths = batch()
    limits = torch.full((4,), 8)
    greedy = greedy_search(net, src, lengths, bos=BOS, eos=EOS, max_lengths=limits)
    beam = beam_search(net, src, lengths, beam=1, bos=BOS, eos=EOS, max_lengths=limits, alpha=0.0)
    assert [h.tokens for h in greedy] == [b[0].tokens for b in beam]
    for g, b in zip(greedy, beam):
        assert g.score == pytest.approx(b[0].score, abs=1e-5)
    for i in range(4):  # alone, unpadded: the same output and score
        n = int(lengths[i])
        alone = greedy_search(net, src[i:i + 1, :n], lengths[i:i + 1], bos=BOS, eos=EOS,
                              max_lengths=limits[:1])[0]
        assert alone.tokens == greedy[i].tokens and alone.score == pytest.approx(greedy[i].score, abs=1e-5)
        beam_alone = beam_search(net, src[i:i + 1, :n], lengths[i:i + 1], beam=3, bos=BOS, eos=EOS,
                                 max_lengths=limits[:1])[0][0]
        beam_batch = beam_search(net, src, lengths, beam=3, bos=BOS, eos=EOS, max_lengths=limits)[i][0]
        assert beam_alone.tokens == beam_batch.tokens


def test_beam_search_is_exhaustive_search_on_a_tiny_vocabulary():
    """Vocabulary of 5 (eos and 4 others), at most 3 steps: beam 21 keeps every output; each
    one's score is its teacher-forced log-probability (eos forced at the limit)."""
    vocab, steps = 5, 3
    net = model(seed=6, vocab=vocab)
    src = torch.tensor([[3, 4, 3, 4], [4, 3, 0, 0]])
    lengths = torch.tensor([4, 2])
    results = beam_search(net, src, lengths, beam=21, n_best=21, bos=BOS, eos=EOS,
                          max_lengths=torch.full((2,), steps), alpha=0.0)
    others = [t for t in range(vocab) if t != EOS]
    outputs = [list(o) for n in range(steps) for o in itertools.product(others, repeat=n)]
    with torch.no_grad():
        for i, hyps in enumerate(results):
            want = {}
            for output in outputs:
                tgt = torch.tensor([[BOS, *output]])
                log_probs = torch.log_softmax(net(src[i:i + 1], lengths[i:i + 1], tgt)[0][0], -1)
                ends = [*output, EOS]
                want[tuple(output)] = sum(float(log_probs[t, tok]) for t, tok in enumerate(ends)
                                          if t < steps - 1)  # the last step: eos forced, log 1
            got = {tuple(h.tokens): h.score for h in hyps}
            assert got.keys() == want.keys()
            for output, score in want.items():
                assert got[output] == pytest.approx(score, abs=1e-4)
            assert [h.score for h in hyps] == sorted(got.values(), reverse=True)


def test_n_best_and_the_length_penalty():
    net = model(seed=7)
    src, lengths = batch()
    limits = torch.full((4,), 8)
    for alpha in (0.0, 1.0):
        found = beam_search(net, src, lengths, beam=4, n_best=3, bos=BOS, eos=EOS, max_lengths=limits,
                            alpha=alpha)
        for hyps in found:
            assert len(hyps) == 3 and [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    raw = beam_search(net, src, lengths, beam=4, bos=BOS, eos=EOS, max_lengths=limits, alpha=0.0)
    normed = beam_search(net, src, lengths, beam=4, bos=BOS, eos=EOS, max_lengths=limits, alpha=1.0)
    hyp = raw[0][0]
    if hyp.tokens == normed[0][0].tokens:
        assert normed[0][0].score == pytest.approx(hyp.score / ((5 + len(hyp.tokens) + 1) / 6), abs=1e-5)


def test_attention_rows_sum_to_one_over_real_positions_per_layer_and_head():
    net = model(seed=8)
    src, lengths = batch()
    limits = torch.full((4,), 6)
    for layer, head in ((-1, None), (0, 2)):
        session = TransformerSession(net, attention_layer=layer, attention_head=head)
        hyps = beam_search(net, src, lengths, beam=2, bos=BOS, eos=EOS, max_lengths=limits,
                           with_attention=True, session=session)
        for i, (hyp,) in enumerate(hyps):
            weights = hyp.attention
            assert weights.shape == (len(hyp.tokens) + 1, src.size(1))
            torch.testing.assert_close(weights.sum(-1), torch.ones(len(weights)))
            assert torch.all(weights[:, int(lengths[i]):] == 0)
    with pytest.raises(ValueError, match="attention_head"):
        TransformerSession(net, attention_head=4)


def test_int8_decodes_and_bf16_autocasts_the_whole_model_on_cpu():
    net = model(seed=9)
    src, lengths = batch()
    limits = torch.full((4,), 6)
    quantized = torch.ao.quantization.quantize_dynamic(net, {torch.nn.Linear}, dtype=torch.qint8)
    assert kernels.apply(quantized, "fast", "cpu") == kernels.REFERENCE
    found = greedy_search(quantized, src, lengths, bos=BOS, eos=EOS, max_lengths=limits)
    assert all(math.isfinite(h.score) for h in found)
    assert kernels.apply(net, "fast", "cpu", precision="bf16") == kernels.REFERENCE
    tgt = torch.randint(3, VOCAB, (4, 5))
    with precision_autocast("fp32", "cpu", net):
        full = net(src, lengths, tgt)[0]
    with precision_autocast("bf16", "cpu", net):
        half = net(src, lengths, tgt)[0]
        found = greedy_search(net, src, lengths, bos=BOS, eos=EOS, max_lengths=limits)
    assert full.dtype == torch.float32 and half.dtype == torch.bfloat16  # the products ran in bf16
    assert torch.allclose(half.float(), full, atol=0.1) and not torch.equal(half.float(), full)
    assert all(math.isfinite(h.score) for h in found)


# -- toy tasks ---------------------------------------------------------------------------------
def sequences(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def pad(rows: list[list[int]], first: list[int] = ()) -> torch.Tensor:
    width = max(len(r) for r in rows) + len(first)
    return torch.tensor([[*first, *r] + [PAD] * (width - len(r) - len(first)) for r in rows])


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: a model this small loses much to a second one on busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("task", ["reversal", "copy"])
def test_learns_the_task_to_every_held_out_sequence(task, one_thread):
    """Sequences of 3-8 of 9 symbols, fresh ones every step; 200 others are held out."""
    torch.manual_seed(0)
    config = Config().override(["model.arch=transformer", "model.d_model=64", "model.heads=4",
                                "model.ff_size=128", "model.encoder_layers=2", "model.decoder_layers=2",
                                "model.dropout=0.0", "model.positions=learned"])
    net = build_model(config.model, VOCAB, VOCAB, PAD)
    optimizer = torch.optim.Adam(net.parameters(), betas=(0.9, 0.98))
    schedule = Schedule(lr=3e-3, warmup_steps=100, kind="inverse_sqrt")
    turn = (lambda s: s[::-1]) if task == "reversal" else (lambda s: s)
    for step in range(600):
        optimizer.param_groups[0]["lr"] = schedule.learning_rate(step, ScheduleState())
        src = sequences(64, seed=100 + step)
        tgt = [turn(s) for s in src]
        loss, _ = net(pad(src), torch.tensor([len(s) for s in src]), pad(tgt, [BOS]),
                      tgt_out=pad([[*t, EOS] for t in tgt]))
        optimizer.zero_grad()
        (loss / sum(len(t) + 1 for t in tgt)).backward()
        optimizer.step()
    net.eval()
    held_out = sequences(200, seed=1)
    found = greedy_search(net, pad(held_out), torch.tensor([len(s) for s in held_out]), bos=BOS, eos=EOS,
                          max_lengths=torch.full((200,), 12))
    wrong = [(s, h.tokens) for h, s in zip(found, held_out) if h.tokens != turn(s)]
    assert not wrong


# -- the pipeline: training resume and DDP, Translator, server ----------------------------------
PIPELINE_CONFIG = """\
data: {train_src: train.src, train_tgt: train.tgt, valid_src: valid.src, valid_tgt: valid.tgt,
       tokenizer: word, vocab_size: 100}
model: {arch: transformer, d_model: 16, heads: 2, ff_size: 32, encoder_layers: 1, decoder_layers: 2,
        dropout: 0.1, attention_dropout: 0.1}
train: {batch_tokens: 300, epochs: 2, lr: 0.005, schedule: inverse_sqrt, warmup_steps: 10, log_every: 5,
        valid_every: 10, threads: 1, device: cpu, seed: 3}
decode: {beam: 2}
"""


@pytest.fixture(scope="module")
def pipeline_corpus(tmp_path_factory) -> Path:
    """test_crash_resume's reversal corpus (2,000 pairs), with the Transformer's cfg.yaml."""
    directory = crash.write_corpus(tmp_path_factory.mktemp("tf_corpus"))
    (directory / "cfg.yaml").write_text(PIPELINE_CONFIG)
    return directory


@pytest.fixture(scope="module")
def pipeline_run(pipeline_corpus, tmp_path_factory) -> Path:
    """One uninterrupted run, in a child process like the runs it is compared with."""
    model_dir = tmp_path_factory.mktemp("tf_reference") / "model"
    code, err = crash.finish(crash.train_args(pipeline_corpus, model_dir), model_dir.parent / "err.txt")
    assert code == 0, err
    assert "training finished: 2 epochs done" in err and "fast paths: none" in err
    return model_dir


def test_sigkill_mid_epoch_then_resume_is_exact(pipeline_corpus, pipeline_run, tmp_path):
    model_dir = tmp_path / "model"
    last = model_dir / "last.safetensors"
    process = crash.start(crash.train_args(pipeline_corpus, model_dir), tmp_path / "run1.txt")
    crash.wait_for(lambda: last.is_file() and max(crash.logged_steps(model_dir), default=0) >= 25, process,
                   "step 25")
    process.send_signal(signal.SIGKILL)
    assert process.wait(30) == -signal.SIGKILL
    killed_at = crash.step_of(last)
    assert 10 <= killed_at < 45
    code, err = crash.finish(crash.train_args(pipeline_corpus, model_dir, "--resume"), tmp_path / "run2.txt")
    assert code == 0, err
    assert f"resuming from step {killed_at}" in err
    crash.assert_same_run(model_dir, pipeline_run)


def test_two_processes_train_as_one_with_accumulation(tmp_path):
    corpus = write_reversal(tmp_path / "corpus", {"train": 400, "valid": 16})
    (corpus / "cfg.yaml").write_text(PIPELINE_CONFIG.replace(
        "epochs: 2,", "epochs: 100, max_steps: 8,").replace("batch_tokens: 300", "batch_tokens: 60"))
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run([sys.executable, *dist.train_args(corpus, one, "train.accumulate=2")],
                            env=dist.clean_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    double = subprocess.run([*launcher, *dist.train_args(corpus, two)], env=dist.clean_env(),
                            capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "2 process(es) x 1 accumulation" in double.stderr
    dist.assert_same_training(one, two)


def test_translator_server_and_attention_decode_a_transformer(pipeline_run):
    translator = Translator.load(pipeline_run, device="cpu")
    assert isinstance(translator.model, Transformer)
    sources = ["a b c d", "h g", "c c a b e f", ""]
    expected = translator.translate(sources, n_best=2)
    app = create_app({"tf": lambda: translator}, ServeConfig())
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.05)
        info = client.get("/v1/models").json()["models"][0]
        assert info["arch"] == "transformer" and info["attention"] == "multi-head"
        response = client.post("/v1/translate", json={"text": sources, "return_tokens": True,
                                                      "return_attention": True, "n_best": 2})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [[h["translation"] for h in r["n_best"]] for r in results] == expected
    for result in results[:3]:
        weights = result["attention"]
        assert len(weights) == len(result["target_tokens"])
        assert all(sum(row) == pytest.approx(1, abs=1e-3) for row in weights)
    alignment = translator.attention("a b c d")
    assert alignment.weights.shape == (len(alignment.target_pieces), 5)


def test_the_attention_shown_is_the_chosen_layer_and_head(pipeline_run, tmp_path, capsys):
    translator = Translator.load(pipeline_run, device="cpu")
    ids = translator.encode_source("a b c d")
    src, lengths = torch.tensor([ids]), torch.tensor([len(ids)])
    limits = max_output_lengths(lengths, translator.config.decode.max_len_ratio)

    def weights(layer: int, head: int | None) -> torch.Tensor:  # the session's, straight
        session = TransformerSession(translator.model, layer, head)
        with torch.inference_mode():
            found = greedy_search(translator.model, src, lengths, bos=BOS_ID, eos=EOS_ID, max_lengths=limits,
                                  banned=[PAD_ID, BOS_ID, UNK_ID], with_attention=True, session=session)
        return found[0].attention

    shown = {}
    for layer, head in [(-1, -1), (0, -1), (0, 1)]:
        translator.config.decode.attention_layer, translator.config.decode.attention_head = layer, head
        shown[layer, head] = translator.decode_ids([ids], beam=1, return_attention=True)[0][0]
        assert torch.equal(shown[layer, head].attention, weights(layer, None if head == -1 else head))
    assert not torch.allclose(shown[-1, -1].attention, shown[0, -1].attention)
    assert not torch.allclose(shown[0, -1].attention, shown[0, 1].attention)

    png = tmp_path / "layer0-head1.png"
    assert cli.main(["attention", "--model-dir", str(pipeline_run), "--text", "a b c", "--output", str(png),
                     "--attention-layer", "0", "--attention-head", "1", "--device", "cpu"]) == 0
    assert png.stat().st_size > 1000
    for flag, value, key in [("--attention-layer", "2", "decode.attention_layer"),
                             ("--attention-head", "2", "decode.attention_head"),
                             ("--attention-head", "-2", "decode.attention_head")]:
        capsys.readouterr()
        assert cli.main(["attention", "--model-dir", str(pipeline_run), "--text", "a b c", "--output",
                         str(tmp_path / "x.png"), flag, value]) == cli.EXIT_ERROR
        assert key in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_a_config_that_does_not_fit_the_weights_is_refused_before_loading(pipeline_run, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(pipeline_run, model_dir)
    config = model_dir / "config.yaml"
    config.write_text(config.read_text().replace("ff_size: 32", "ff_size: 48"))
    with pytest.raises(CheckpointError, match="ff_size|shape|32"):
        Translator.load(model_dir, device="cpu")
