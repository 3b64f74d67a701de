"""The fast-path policy: what it turns on where, and that every fast path gives the reference's
results (plain PyTorch) with no monkeypatching: a whole training step of each shipped
config's layout (loss and every gradient), long sequences in float32, dropout between GRU
layers, and greedy and beam search of a trained model."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from conftest import autograd_nodes
from torch.nn import functional as F

from seq2seq.config import Config, ModelConfig, packaged_configs
from seq2seq.decoding.search import beam_search, greedy_search, max_output_lengths
from seq2seq.kernels import apply as apply_kernels
from seq2seq.kernels import decoding_session, policy
from seq2seq.kernels.gru import FusedGRU
from seq2seq.kernels.policy import REFERENCE, FastPaths, Twin, private_ops, resolve
from seq2seq.models.rnn.model import Seq2Seq

VOCAB, PAD, BOS, EOS = 17, 0, 1, 2
LAYOUT = ("cell", "attention", "input_feeding", "bidirectional", "encoder_layers",
          "decoder_layers", "tie_embeddings", "encoder_hidden_size")
NARROW = 4  # make_model's encoder width, per direction, for a layout whose encoder is set narrower
GENERAL = dict(cell="gru", attention="general", input_feeding=False, tie_embeddings=True)
STEPWISE = dict(cell="gru", attention="bahdanau", input_feeding=True, tie_embeddings=True)


def shipped_layouts() -> list[dict]:
    """Each distinct layout of the shipped configs (an encoder set narrower than the decoder
    made ``NARROW`` wide), two more that the fast paths skip, and the step-wise decoder over a
    narrow encoder."""
    configs = packaged_configs()
    assert configs, "no shipped configs found"
    layouts = [{key: getattr(Config.load(configs[name]).model, key) for key in LAYOUT}
               for name in sorted(configs)]
    for layout in layouts:
        layout["encoder_hidden_size"] = NARROW if layout["encoder_hidden_size"] else 0
    layouts += [dict(cell="lstm", attention="general", input_feeding=True, bidirectional=True,
                     encoder_layers=2, decoder_layers=2, tie_embeddings=False, encoder_hidden_size=0),
                dict(cell="gru", attention="dot", input_feeding=True, bidirectional=False,
                     encoder_layers=2, decoder_layers=1, tie_embeddings=False, encoder_hidden_size=0),
                dict(STEPWISE, bidirectional=True, encoder_layers=1, decoder_layers=1,
                     encoder_hidden_size=NARROW)]
    return [dict(t) for t in dict.fromkeys(tuple(d.items()) for d in layouts)]


def make_model(dtype=torch.float64, seed: int = 0, dropout: float = 0.0, **layout) -> Seq2Seq:
    torch.manual_seed(seed)
    config = ModelConfig(embed_size=6, hidden_size=8, dropout=dropout, **layout)
    return Seq2Seq(config, src_vocab=VOCAB, tgt_vocab=VOCAB, pad_id=PAD).to(dtype)


def make_batch(tgt_len: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 4, 6, 1, 8])
    src = torch.randint(3, VOCAB, (5, 9), generator=g)
    src[torch.arange(9) >= lengths.unsqueeze(1)] = PAD
    tgt = torch.randint(3, VOCAB, (5, tgt_len + 1), generator=g)
    tgt[:, 0] = BOS
    tgt[1, tgt_len // 2:] = PAD  # target padding
    return src, lengths, tgt[:, :-1], tgt[:, 1:]


def training_step(model: Seq2Seq, kernels: str, batch, seed: int = 5):
    """(loss, {parameter: gradient}, autograd node names) of one training step."""
    paths = apply_kernels(model, kernels)
    model.train().zero_grad()
    torch.manual_seed(seed)
    src, lengths, tgt_in, tgt_out = batch
    loss, _ = model(src, lengths, tgt_in, tgt_out=tgt_out, label_smoothing=0.1)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.detach(), grads, autograd_nodes(loss), paths


@pytest.mark.parametrize("layout", shipped_layouts(), ids=lambda d: "-".join(
    str(d[k]) for k in ("cell", "attention", "input_feeding", "decoder_layers", "encoder_hidden_size")))
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_training_step_matches_reference(layout, dtype, tol):
    model = make_model(dtype, **layout)
    batch = make_batch()
    fast_loss, fast_grads, fast_nodes, paths = training_step(model, "fast", batch)
    ref_loss, ref_grads, ref_nodes, _ = training_step(model, "reference", batch)
    torch.testing.assert_close(fast_loss, ref_loss, rtol=tol, atol=tol)
    for name, want in ref_grads.items():
        torch.testing.assert_close(fast_grads[name], want, rtol=tol, atol=tol, msg=name)
    # the fast paths that apply to this layout ran, and none of them in the reference
    expect = {"_OutputCrossEntropyBackward": paths.fused_loss,
              "_GRULayerFunctionBackward": paths.fused_gru,
              "_StepwiseGRUFunctionBackward": paths.stepwise}
    assert paths.fused_loss and paths.fused_gru == (layout["cell"] == "gru")
    assert paths.stepwise == (layout["cell"] == "gru" and layout["input_feeding"]
                              and layout["decoder_layers"] == 1)
    for node, used in expect.items():
        assert (node in fast_nodes) == used, node
        assert node not in ref_nodes


def test_long_sequences_in_float32():
    """60 target steps through the step-wise decoder, with tanh through sigmoid at every
    step: the rounding does not build up."""
    model = make_model(torch.float32, **STEPWISE)
    batch = make_batch(tgt_len=60)
    fast_loss, fast_grads, nodes, _ = training_step(model, "fast", batch)
    ref_loss, ref_grads, _, _ = training_step(model, "reference", batch)
    assert "_StepwiseGRUFunctionBackward" in nodes
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name, want in ref_grads.items():
        torch.testing.assert_close(fast_grads[name], want, rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():  # and 60 decoding steps through a session (the fused encoder's)
        model.eval()
        src, lengths, tgt_in, _ = batch
        scores = []
        for kernels in ("fast", "reference"):
            apply_kernels(model, kernels)
            session = decoding_session(model)
            memory, state = session.encode(src, lengths)
            steps = []
            for t in range(tgt_in.size(1)):
                step, state, _ = session.step(tgt_in[:, t:t + 1], state, memory)
                steps.append(step)
            scores.append(torch.cat(steps, 1))
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", [STEPWISE, GENERAL], ids=["stepwise", "general"])
def test_bf16_products_train_as_float32_to_bf16_rounding(layout):
    """``bf16_products``: the fused GRUs' input projections and weight gradients from bf16
    operands. The loss and every gradient stay within bf16's rounding of the float32 path's
    (relative error of each gradient under 2%), and the products did change them."""
    model = make_model(torch.float32, bidirectional=True, encoder_layers=2, **layout)
    batch = make_batch(tgt_len=12)
    float32 = resolve("fast", "cpu", "fp32", model)
    loss, grads, nodes, _ = training_step(model, dataclasses.replace(float32, bf16_products=True), batch)
    ref_loss, ref_grads, _, _ = training_step(model, float32, batch)
    assert "_GRULayerFunctionBackward" in nodes
    assert ("_StepwiseGRUFunctionBackward" in nodes) == layout["input_feeding"]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=0)
    rounded = []
    for name, want in ref_grads.items():
        error = float((grads[name] - want).norm() / want.norm())
        assert error < 0.02, (name, error)
        rounded.append(error > 1e-6)
    products = ("rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l1_reverse")
    assert all(r for name, r in zip(ref_grads, rounded) if name.endswith(products)), rounded


def test_dropout_between_gru_layers():
    """The fused two-layer GRU drops its first layer's outputs with ``F.dropout``'s mask:
    the same as two nn.GRU layers given that mask."""
    torch.manual_seed(0)
    gru = torch.nn.GRU(5, 7, num_layers=2, batch_first=True, dropout=0.4).double()
    FusedGRU.install(gru, FastPaths(fused_gru=True), "cpu")
    first = torch.nn.GRU(5, 7, batch_first=True).double()
    second = torch.nn.GRU(7, 7, batch_first=True).double()
    with torch.no_grad():
        for name, value in gru.named_parameters():
            layer, plain = (first, name[:-1] + "0") if name.endswith("l0") else (second, name[:-1] + "0")
            getattr(layer, plain).copy_(value)
    x = torch.randn(3, 6, 5, dtype=torch.double)
    torch.manual_seed(7)
    fused, _ = gru.forward_padded(x)
    torch.manual_seed(7)
    keep = F.dropout(torch.ones(6, 3, 7, dtype=torch.float64), 0.4).transpose(0, 1)  # (T, B, H) drawn
    assert 0 < int((keep == 0).sum()) < keep.numel()
    plain, _ = second(first(x)[0] * keep)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)


def test_dropout_keeps_expected_values():
    """Fast and reference dropout draw different masks; both keep the loss's expectation:
    over 16 seeds the mean training loss agrees within a few standard errors."""
    model = make_model(torch.float64, dropout=0.3, **STEPWISE)
    batch = make_batch(tgt_len=4)
    losses = {}
    for kernels in ("fast", "reference"):
        losses[kernels] = torch.stack([training_step(model, kernels, batch, seed)[0]
                                       for seed in range(16)])
    fast, ref = losses["fast"], losses["reference"]
    spread = ((fast.var() + ref.var()) / 16).sqrt()
    assert not torch.equal(fast, ref) and fast.std() > 0
    assert (fast.mean() - ref.mean()).abs() < 4 * spread


def test_resolve_by_device_precision_and_model():
    model = make_model(torch.float32, **STEPWISE)
    ops = frozenset({"grad_input"})
    assert resolve("reference", "cpu", "fp32", model, ops) == REFERENCE
    cpu = resolve("fast", "cpu", "fp32", model, ops)
    assert all(dataclasses.astuple(dataclasses.replace(cpu, bf16_output=True, bf16_products=True)))
    bf16 = resolve("fast", "cpu", "bf16", model, ops)
    assert bf16.bf16_output and bf16.bf16_products
    gpu = resolve("fast", "cuda", "bf16", model, ops)  # autocast does the precision there
    assert gpu == FastPaths(fused_loss=True)
    with pytest.raises(ValueError, match="kernels must be 'fast' or 'reference'"):
        resolve("fastest", "cpu", "fp32", model, ops)
    lstm = make_model(torch.float32, cell="lstm", attention="general", input_feeding=True)
    lstm_paths = resolve("fast", "cpu", "fp32", lstm, ops)
    assert not (lstm_paths.fused_gru or lstm_paths.stepwise) and lstm_paths.fused_loss
    assert not resolve("fast", "cpu", "bf16", lstm, ops).bf16_products  # no fused LSTM
    int8 = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    int8_paths = resolve("fast", "cpu", "bf16", int8, ops)
    assert int8_paths.fused_gru and not int8_paths.bf16_output  # its output layer is int8
    assert "fast paths: fused_gru, stepwise" in cpu.describe()
    assert REFERENCE.describe() == "fast paths: none (plain PyTorch)"


def test_without_private_ops_their_paths_stay_off_and_the_rest_runs():
    """A torch without ``aten.*_backward.grad_input``: the paths that need them are off, the
    others on, and training gives the reference's results."""
    model = make_model(torch.float64, **STEPWISE)
    paths = resolve("fast", "cpu", "fp32", model, available=frozenset())
    assert not (paths.fused_gru or paths.stepwise) and paths.fused_loss
    batch = make_batch()
    loss, grads, nodes, _ = training_step(model, paths, batch)
    ref_loss, ref_grads, _, _ = training_step(model, "reference", batch)
    assert "_GRULayerFunctionBackward" not in nodes and "_OutputCrossEntropyBackward" in nodes
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
    for name, want in ref_grads.items():
        torch.testing.assert_close(grads[name], want, rtol=1e-10, atol=1e-10)
    assert private_ops() <= {"grad_input"}


def test_search_gives_the_reference_outputs(translator):
    """Greedy and beam 5 of the trained toy model (GRU, Bahdanau): the same translations and
    scores with the fast paths as with plain PyTorch."""
    sentences = ["a b c d", "h g f e d c b a", "c c a", "b", "e f g h a b c d"] * 4
    results = {}
    for kernels in ("fast", "reference"):
        apply_kernels(translator.model, kernels)
        results[kernels] = [translator.hypotheses(sentences, beam=beam) for beam in (1, 5)]
    apply_kernels(translator.model, "fast")
    for fast, ref in zip(results["fast"], results["reference"]):
        assert [h[0].tokens for h in fast] == [h[0].tokens for h in ref]
        for f, r in zip(fast, ref):
            assert f[0].score == pytest.approx(r[0].score, abs=1e-4)


def test_search_with_input_feeding_gives_the_reference_outputs():
    """The same for the step-wise layout (Bahdanau with input feeding), on a model whose
    sharpened random weights end sentences at varied lengths."""
    model = make_model(torch.float32, seed=3, **STEPWISE).eval()
    with torch.no_grad():
        model.generator.weight.mul_(3.0)
    src, lengths, _, _ = make_batch()
    limits = max_output_lengths(lengths, 2.0)
    outputs = {}
    for kernels in ("fast", "reference"):
        apply_kernels(model, kernels)
        greedy = greedy_search(model, src, lengths, bos=BOS, eos=EOS, max_lengths=limits)
        beam = beam_search(model, src, lengths, beam=5, bos=BOS, eos=EOS, max_lengths=limits)
        outputs[kernels] = ([h.tokens for h in greedy], [h[0].tokens for h in beam])
    assert outputs["fast"] == outputs["reference"]
    assert len({len(tokens) for tokens in outputs["fast"][0]}) > 1


def test_first_probe_inside_shapes_only_still_finds_the_ops():
    """The probe runs once per process, at the first model built: when that model is a
    meta-device skeleton (``Translator.load`` checks shapes first), it still probes on CPU."""
    code = ("from seq2seq.models.checkpoint import shapes_only\n"
            "from seq2seq.config import ModelConfig\n"
            "from seq2seq.models.rnn.model import Seq2Seq\n"
            "from seq2seq.kernels.policy import private_ops\n"
            "with shapes_only():\n"
            "    Seq2Seq(ModelConfig(embed_size=4, hidden_size=4), src_vocab=9, tgt_vocab=9)\n"
            "print(sorted(private_ops()))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.split("\n")[-2] == str(sorted(private_ops()))


def test_translator_load_takes_the_kernels(trained_model_dir):
    from seq2seq.config import ConfigError
    from seq2seq.decoding.translator import Translator

    assert policy(Translator.load(trained_model_dir, device="cpu", kernels="reference").model) \
        == REFERENCE
    fast = policy(Translator.load(trained_model_dir, device="cpu").model)  # train.kernels: fast
    assert fast.fused_gru and fast.fused_loss
    with pytest.raises(ConfigError, match="train.kernels must be 'fast' or 'reference'"):
        Translator.load(trained_model_dir, device="cpu", kernels="turbo")


def _twins(model) -> set[str]:
    return {type(m).__name__ for m in model.modules() if isinstance(m, Twin)}


def test_twins_keep_the_models_parameters_and_reference_swaps_them_back():
    model = make_model(torch.float32, **STEPWISE)
    state, parameters = model.state_dict(), list(model.parameters())
    apply_kernels(model, "fast")
    assert _twins(model) == {"FusedGRU", "FusedEncoder", "StepwiseDecoder", "FusedOutputLoss",
                             "UniformDropout"}
    assert all(a is b for a, b in zip(model.parameters(), parameters, strict=True))
    assert model.state_dict().keys() == state.keys()
    assert apply_kernels(model, "reference") == REFERENCE == policy(model)
    assert not _twins(model) and type(model.decoder.rnn) is torch.nn.GRU


def test_moving_the_model_decides_the_policy_again():
    """Off the CPU (here the meta device, as a GPU would be) the twins are the plain modules
    and the policy has no CPU kernel; back on the CPU both return."""
    model = make_model(torch.float32, **STEPWISE)
    cpu = apply_kernels(model, "fast")
    batch = make_batch()
    assert cpu.fused_gru and cpu.stepwise and cpu.fused_loss
    model.to("meta")
    assert policy(model) == resolve("fast", "meta", "fp32", model)
    assert not (policy(model).fused_gru or policy(model).stepwise)
    assert all(not m.on_cpu for m in model.modules() if isinstance(m, Twin))
    model.to_empty(device="cpu")
    assert policy(model) == cpu
    nn_init = make_model(torch.float32, **STEPWISE)
    model.load_state_dict(nn_init.state_dict())
    _, _, nodes, _ = training_step(model, cpu, batch)
    assert {"_GRULayerFunctionBackward", "_StepwiseGRUFunctionBackward"} <= nodes
    # what a twin does where its module is not on a CPU (meta runs no kernel): the plain path
    twins = [m for m in model.modules() if isinstance(m, Twin)]
    for twin in twins:
        twin.device_type = "cuda"
    ref_loss, _, _, _ = training_step(nn_init, "reference", batch)
    model.train().zero_grad()
    torch.manual_seed(5)
    loss, _ = model(*batch[:3], tgt_out=batch[3], label_smoothing=0.1)
    nodes = autograd_nodes(loss)
    assert not nodes & {"_GRULayerFunctionBackward", "_StepwiseGRUFunctionBackward"}
    torch.testing.assert_close(loss, ref_loss)


def cuda_test(test):
    """A test that runs on a CUDA GPU (``-m gpu``), skipped with its reason elsewhere."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(),
                                              reason="needs a CUDA GPU")(test))


@cuda_test
@pytest.mark.parametrize("layout", [STEPWISE, GENERAL,
                                    dict(cell="lstm", attention="bahdanau", input_feeding=True)])
def test_cuda_runs_cudnn_and_matches_the_cpu_reference(layout):
    """On CUDA the policy is cuDNN and the plain step loop (no CPU kernel), and a training
    step gives the CPU reference's loss and gradients (float64: cuDNN's float32 RNNs may
    round through TF32)."""
    model = make_model(torch.float64, **layout)
    batch = make_batch()
    ref_loss, ref_grads, _, _ = training_step(model, "reference", batch)
    paths = apply_kernels(model, "fast", "cuda")
    assert not (paths.fused_gru or paths.stepwise)
    assert all(not m.on_cpu for m in model.modules() if isinstance(m, Twin))
    model.train().zero_grad()
    src, lengths, tgt_in, tgt_out = (t.cuda() for t in batch)
    loss, _ = model(src, lengths, tgt_in, tgt_out=tgt_out, label_smoothing=0.1)
    loss.backward()
    nodes = autograd_nodes(loss)
    assert "_GRULayerFunctionBackward" not in nodes and "_StepwiseGRUFunctionBackward" not in nodes
    assert any("Cudnn" in node or "CUDNN" in node.upper() for node in nodes), sorted(nodes)
    torch.testing.assert_close(loss.cpu(), ref_loss, rtol=1e-10, atol=1e-10)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.cpu(), ref_grads[name], rtol=1e-8, atol=1e-10,
                                   msg=lambda message, name=name: f"{name}: {message}")


@cuda_test
def test_cuda_training_learns_in_fp32_and_bf16_and_decodes_as_the_cpu():
    from seq2seq.kernels.ops import precision_autocast

    batch = make_batch()
    for precision in ("fp32", "bf16"):
        model = make_model(torch.float32, seed=4, **STEPWISE)
        apply_kernels(model, "fast", "cuda", precision)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
        src, lengths, tgt_in, tgt_out = (t.cuda() for t in batch)
        losses = []
        for _ in range(30):
            optimizer.zero_grad()
            with precision_autocast(precision, "cuda"):
                loss, _ = model.train()(src, lengths, tgt_in, tgt_out=tgt_out)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        assert losses[-1] < 0.5 * losses[0], (precision, losses)
    model.eval()  # the fp32-then-bf16 model, decoded in float32 on both devices
    limits = max_output_lengths(batch[1], 2.0)
    cuda = (greedy_search(model, src, lengths, bos=BOS, eos=EOS, max_lengths=limits),
            beam_search(model, src, lengths, beam=3, bos=BOS, eos=EOS, max_lengths=limits))
    apply_kernels(model, "fast", "cpu")
    cpu = (greedy_search(model, batch[0], batch[1], bos=BOS, eos=EOS, max_lengths=limits),
           beam_search(model, batch[0], batch[1], beam=3, bos=BOS, eos=EOS, max_lengths=limits))
    assert [h.tokens for h in cuda[0]] == [h.tokens for h in cpu[0]]
    assert [h[0].tokens for h in cuda[1]] == [h[0].tokens for h in cpu[1]]
