"""Training a translation model: data, the loop, validation, checkpoints and exact resume.

The run lives in a model directory:
    config.yaml         the full config (data paths made absolute)
    tokenizer files     written before training starts
    last.safetensors    model, optimizer, schedule, random state and position in the data
    best.safetensors    the weights with the best validation BLEU
    metrics.jsonl       one JSON object per logging step and per validation

Resuming reads ``last.safetensors`` and goes on from the same batch of the same epoch. Every
micro-batch seeds the random generator from (seed, its global index), so dropout masks do not
depend on where a run was interrupted, nor on how the batches are split across processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from seq2seq import distributed
from seq2seq.checkpoint import atomic_write_text, load_training_state, save_checkpoint
from seq2seq.config import Config, ConfigError
from seq2seq.data import Batch, DataError, EncodedCorpus, collate, encode_corpus, make_batches, read_parallel
from seq2seq.metrics import score_translations
from seq2seq.ops import keep_freed_memory, precision_autocast, precision_plan
from seq2seq.tokenize import load_tokenizers, train_tokenizers
from seq2seq.translator import BEST, CONFIG_FILE, LAST, Translator, build_model

METRICS_FILE = "metrics.jsonl"


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


class TrainingInterrupted(TrainingError):
    """Ctrl-C: a last checkpoint was written and the run can be resumed."""


@dataclass
class TrainState:
    """Where a run is. Saved in every training checkpoint as JSON."""

    step: int = 0  # optimizer updates done
    epoch: int = 0  # the epoch in progress (0-based)
    position: int = 0  # updates done in this epoch
    tokens: int = 0  # target tokens trained on, all processes together
    elapsed_s: float = 0.0  # training time over all sessions of this run
    best_bleu: float = -1.0
    best_step: int = 0
    bad_validations: int = 0  # since the best, for early stopping
    plateau_count: int = 0  # since the last improvement or lr drop
    lr_scale: float = 1.0  # from reduce-on-plateau
    bad_steps: int = 0  # non-finite losses in a row
    last_valid_step: int = -1
    finished: bool = False
    world_size: int = 1
    accumulate: int = 1  # world_size * accumulate batches make one update
    stop_reason: str = ""


VALID_BATCH_SIZE = 250  # sentences per validation decoding batch, at most


def make_adam(params, lr: float) -> torch.optim.Optimizer:
    """Adam with the fused kernel (one call updates every parameter) where this torch has it
    for the device (CPU since torch 2.4), else the multi-tensor one."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, foreach=True)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_data_paths(config: Config, data_dir: str | Path | None) -> None:
    """Make the data section's paths absolute, relative to ``data_dir`` (default: cwd)."""
    base = Path(data_dir) if data_dir is not None else Path.cwd()
    for field in ("train_src", "train_tgt", "valid_src", "valid_tgt", "test_src", "test_tgt"):
        value = getattr(config.data, field)
        if value:
            setattr(config.data, field, str((base / value).resolve()))


def train(config: Config, model_dir: str | Path, data_dir: str | Path | None = None,
          resume: bool = False) -> TrainState:
    """Train (or resume training) a translation model into ``model_dir``."""
    config = Config.from_dict(config.to_dict())  # a private, validated copy
    model_dir = Path(model_dir)
    dist = distributed.setup(config.train.backend, config.train.device)
    try:
        resume = dist.broadcast(resume)  # rank 0 decides, so that every rank takes the same path
        return _Run(config, model_dir, data_dir, resume, dist).run()
    except BaseException as error:
        lost = dist.on_failure(error)  # a message naming the lost rank, if a peer is gone
        if lost:
            last = model_dir / LAST
            then = (f"the last checkpoint is {last}: resume with --resume" if last.is_file()
                    else "no checkpoint was written yet")
            raise distributed.DistributedError(f"{lost}; {then}") from None
        raise
    finally:
        dist.close()


class _Run:
    """One training session of a run (a resume is a new session of the same run)."""

    def __init__(self, config: Config, model_dir: Path, data_dir: str | Path | None,
                 resume: bool, dist: distributed.Distributed) -> None:
        self.dist = dist
        self.model_dir = model_dir
        t = config.train
        cores = os.cpu_count() or 1
        torch.set_num_threads(t.threads or max(1, cores // dist.local_world_size))
        self.device = dist.device(t.device)
        if self.device.type == "cpu":
            keep_freed_memory()  # no page faults on reusing the last step's buffers
        self.config = self._prepare_config(config, data_dir, resume)
        self.t = self.config.train
        if dist.is_main:
            self._remove_stale_temporary_files()
        self.interrupted, self.interrupted_at = False, 0.0
        self.session_start = time.monotonic()

        data = self.config.data
        src_lines, tgt_lines = read_parallel(data.train_src, data.train_tgt or None, data.max_line_chars)
        if not src_lines:
            raise DataError(f"{data.train_src}: the training data is empty")
        self.src_tok, self.tgt_tok = self._tokenizers(src_lines, tgt_lines, resume)
        say = log if dist.is_main else (lambda _msg: None)
        self.train_data = encode_corpus(src_lines, tgt_lines, self.src_tok, self.tgt_tok,
                                        data.max_len, data.long_pairs, log=say)
        if not self.train_data.src:
            raise DataError(f"{data.train_src}: no usable training pairs (all empty or too long)")
        self.valid_src: list[str] = []
        self.valid_ref: list[str] = []
        self.valid_data: EncodedCorpus | None = None
        if data.valid_src:
            self.valid_src, self.valid_ref = read_parallel(data.valid_src, data.valid_tgt or None,
                                                           data.max_line_chars)
            self.valid_data = encode_corpus(self.valid_src, self.valid_ref, self.src_tok,
                                            self.tgt_tok, data.max_len, "truncate",
                                            log=lambda _msg: None)

        torch.manual_seed(t.seed)
        self.model = build_model(self.config, self.src_tok, self.tgt_tok).to(self.device)
        self.optimizer = make_adam(self.model.parameters(), t.lr)
        self.state = TrainState(world_size=dist.world_size, accumulate=t.accumulate)
        self.metrics_path = model_dir / METRICS_FILE
        if resume:
            self._restore()
        elif dist.is_main:
            self.metrics_path.unlink(missing_ok=True)
        self.net: nn.Module = self.model
        if dist.enabled:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if dist.is_main:
            params = self.model.num_parameters()
            group = dist.world_size * t.accumulate
            log(f"model: {params:,} parameters; {len(self.train_data.src):,} training pairs; "
                f"device {self.device}; {dist.world_size} process(es) x {t.accumulate} "
                f"accumulation = effective batch of {group} x {t.batch_tokens} target tokens")

    # -- setup -------------------------------------------------------------------------------
    def _prepare_config(self, config: Config, data_dir: str | Path | None, resume: bool) -> Config:
        last, saved_path = self.model_dir / LAST, self.model_dir / CONFIG_FILE
        if resume:
            if not last.is_file():
                raise TrainingError(f"--resume: no checkpoint to resume from at {last} (the run "
                                    f"stopped before its first one); start it again without --resume")
            saved = Config.load(saved_path)
            resolve_data_paths(config, data_dir)
            for section in ("data", "model"):
                mine, theirs = getattr(config, section), getattr(saved, section)
                for field in dataclasses.fields(mine):
                    a, b = getattr(mine, field.name), getattr(theirs, field.name)
                    if a != b and not (section == "data" and field.name.endswith(("_src", "_tgt"))
                                       and not a):
                        raise ConfigError(
                            f"--resume: {section}.{field.name} is {a!r} but the run in "
                            f"{self.model_dir} was started with {b!r}")
            saved.train, saved.decode = config.train, config.decode
            return saved
        if last.is_file():
            raise TrainingError(
                f"{self.model_dir} already holds a training run; add --resume to continue it, "
                f"or choose another --model-dir")
        resolve_data_paths(config, data_dir)
        if self.dist.is_main:
            self.model_dir.mkdir(parents=True, exist_ok=True)
            config.save(saved_path)
        return config

    def _remove_stale_temporary_files(self) -> None:
        """Half-written checkpoints of a killed session: atomic writes leave them only then."""
        for name in (LAST, BEST, METRICS_FILE):
            for stale in self.model_dir.glob(f".{name}.*.tmp"):
                stale.unlink(missing_ok=True)

    def _tokenizers(self, src_lines: list[str], tgt_lines: list[str], resume: bool):
        if resume:
            return load_tokenizers(self.model_dir)
        if self.dist.is_main:
            log(f"training {self.config.data.tokenizer} tokenizer(s) ...")
            train_tokenizers(self.config.data, src_lines, tgt_lines, self.model_dir, log=log)
        self.dist.barrier()
        return load_tokenizers(self.model_dir)

    def _restore(self) -> None:
        meta = load_training_state(self.model_dir / LAST, self.model, self.optimizer)
        known = {f.name for f in dataclasses.fields(TrainState)}
        self.state = TrainState(**{k: v for k, v in meta["train_state"].items() if k in known})
        # The same batches per update (processes x accumulate) continue exactly, however split.
        saved_group = self.state.world_size * self.state.accumulate
        group = self.dist.world_size * self.t.accumulate
        if saved_group != group:
            done = self.state.position * saved_group  # batches of this epoch already trained on
            self.state.position = -(-done // group)  # rounded up: no batch is seen twice
            if self.dist.is_main:
                log(f"warning: the run was started with {self.state.world_size} process(es) x "
                    f"{self.state.accumulate} accumulation and resumes with {self.dist.world_size} x "
                    f"{self.t.accumulate}: the effective batch and the data order change from here")
        self.state.world_size, self.state.accumulate = self.dist.world_size, self.t.accumulate
        if self.dist.is_main:
            self._truncate_metrics(self.state.step)
            log(f"resuming from step {self.state.step} (epoch {self.state.epoch + 1}, "
                f"update {self.state.position} of the epoch)")

    def _truncate_metrics(self, step: int) -> None:
        """Keep the metrics logged up to the checkpoint; later lines will be logged again."""
        if not self.metrics_path.is_file():
            return
        kept = []
        for line in self.metrics_path.read_text("utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line from a killed process
            if isinstance(entry, dict) and entry.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.metrics_path, "".join(k + "\n" for k in kept))

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> TrainState:
        state, t = self.state, self.t
        if state.finished:
            if not self._budget_left():
                if self.dist.is_main:
                    log(f"this run already finished ({state.stop_reason}); nothing to do")
                return state
            if self.dist.is_main:
                log(f"the run had stopped ({state.stop_reason}); the new budget allows more: "
                    f"continuing")
            state.finished, state.stop_reason = False, ""
        previous = signal.signal(signal.SIGINT, self._on_sigint) if self._can_handle_signals() else None
        try:
            while state.epoch < t.epochs and not state.stop_reason:
                self._run_epoch()
                if not state.stop_reason:
                    state.epoch, state.position = state.epoch + 1, 0
                    if t.valid_every == 0:
                        if state.last_valid_step != state.step:  # a step budget may have stopped here
                            self._validate()
                        self._save_last()
            if not state.stop_reason:
                state.stop_reason = f"{t.epochs} epochs done"
            if state.last_valid_step != state.step:
                self._validate()
            state.finished = True
            self._save_last()
            if self.valid_data is None and self.dist.is_main:
                save_checkpoint(self.model_dir / BEST, self.model, {"step": state.step})
            if self.dist.is_main:
                best = (f"best validation BLEU {state.best_bleu:.2f} at step {state.best_step}"
                        if self.valid_data is not None else "no validation data: best is last")
                log(f"training finished: {state.stop_reason}; {best}; model in {self.model_dir}")
            return state
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _run_epoch(self) -> None:
        state, t = self.state, self.t
        batches = make_batches([len(s) for s in self.train_data.src],
                               [len(s) for s in self.train_data.tgt], t.batch_tokens,
                               t.max_sentences, seed=t.seed, epoch=state.epoch)
        group = self.dist.world_size * t.accumulate
        updates = len(batches) // group
        if updates == 0:
            raise TrainingError(
                f"the training data makes {len(batches)} batch(es), fewer than the "
                f"{group} that one update needs (processes x train.accumulate); lower "
                f"train.batch_tokens or add data")
        bar = tqdm(total=updates, initial=state.position, desc=f"epoch {state.epoch + 1}",
                   disable=not self.dist.is_main, file=sys.stderr, mininterval=1.0,
                   dynamic_ncols=True, leave=False)
        window_loss, window_tokens, window_start = 0.0, 0, time.monotonic()
        try:
            while state.position < updates:
                first = state.position * group + self.dist.rank * t.accumulate
                mine = batches[first:first + t.accumulate]
                loss_sum, tokens = self._update(mine, first_index=state.step * group
                                                + self.dist.rank * t.accumulate)
                state.position += 1
                state.step += 1
                loss_sum, tokens = self.dist.sum([loss_sum, tokens], self.device)
                state.tokens += int(tokens)
                window_loss += loss_sum
                window_tokens += int(tokens)
                if state.step % t.log_every == 0 or state.position == updates:
                    total = window_tokens
                    mean_loss = window_loss / max(total, 1)
                    seconds = time.monotonic() - window_start
                    self._log_metrics({"train_loss": round(mean_loss, 4),
                                       "lr": self.optimizer.param_groups[0]["lr"]})
                    bar.set_postfix(loss=f"{mean_loss:.3f}", ppl=f"{math.exp(min(mean_loss, 50)):.1f}",
                                    tok_s=f"{total / max(seconds, 1e-9):,.0f}", refresh=False)
                    window_loss, window_tokens, window_start = 0.0, 0, time.monotonic()
                bar.update(1)
                if t.valid_every and state.step % t.valid_every == 0:
                    self._validate()
                    self._save_last()
                if self._should_stop():
                    return
        finally:
            bar.close()

    def _update(self, batches: list[list[int]], first_index: int) -> tuple[float, int]:
        """One optimizer update over this process's micro-batches; (loss sum, tokens)."""
        state, t = self.state, self.t
        self.net.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self._learning_rate()
        loss_total, tokens_total, finite = 0.0, 0, True
        for i, indices in enumerate(batches):
            torch.manual_seed(t.seed * 1_000_003 + first_index + i)  # dropout masks per micro-batch
            batch = collate(indices, self.train_data.src, self.train_data.tgt).to(self.device)
            sync = i == len(batches) - 1 or not self.dist.enabled
            context = contextlib.nullcontext() if sync else self.net.no_sync()
            with context:
                with self._autocast():
                    loss = self._loss(batch)
                (loss / (batch.n_tokens * len(batches))).backward()
            value = float(loss.detach())
            finite = finite and math.isfinite(value)
            loss_total += value
            tokens_total += batch.n_tokens
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_grad or float("inf"))
        finite = finite and bool(torch.isfinite(norm))
        if self.dist.any(not finite, self.device):
            self.optimizer.zero_grad(set_to_none=True)
            state.bad_steps += 1
            self._log_metrics({"event": "non-finite loss, update skipped",
                               "bad_steps": state.bad_steps})
            if state.bad_steps >= t.max_bad_steps:
                raise TrainingError(
                    f"stopped: {state.bad_steps} updates in a row had a non-finite loss or "
                    f"gradient (step {state.step}); the last good checkpoint is "
                    f"{self.model_dir / LAST}. Lower train.lr or check the data.")
            return 0.0, 0
        state.bad_steps = 0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_total, tokens_total

    def _loss(self, batch: Batch) -> torch.Tensor:
        """Summed (label-smoothed) cross-entropy over the real target tokens."""
        loss, _ = self.net(batch.src, batch.src_lengths, batch.tgt_in,
                           sampling_ratio=self.t.sampling_ratio, tgt_out=batch.tgt_out,
                           label_smoothing=self.t.label_smoothing,
                           output_dtype=self._output_dtype)
        return loss

    def _learning_rate(self) -> float:
        t, state = self.t, self.state
        warmup = min(1.0, (state.step + 1) / t.warmup_steps) if t.warmup_steps else 1.0
        return t.lr * warmup * state.lr_scale

    def _autocast(self):
        """Autocast for ``train.precision`` (see ``ops.precision_plan``)."""
        return precision_autocast(self.t.precision, self.device.type)

    @property
    def _output_dtype(self) -> torch.dtype | None:
        """The output layer's product dtype for ``Seq2Seq.forward`` (``ops.precision_plan``)."""
        return precision_plan(self.t.precision, self.device.type)[1]

    def _should_stop(self) -> bool:
        t, state = self.t, self.state
        if state.stop_reason:  # early stopping, decided by validation on every rank
            return True
        # Ranks may disagree (a Ctrl-C reaches one, clocks differ): all take the most urgent reason.
        reasons = ("", f"time budget of {t.max_minutes:g} minute(s) used", f"{t.max_steps} steps done",
                   "interrupted")
        code = (3 if self.interrupted else 2 if t.max_steps and state.step >= t.max_steps
                else 1 if t.max_minutes and self._elapsed() >= t.max_minutes * 60 else 0)
        reason = reasons[self.dist.maximum(code, self.device)]
        if not reason:
            return False
        if reason == "interrupted":
            self._save_last()
            raise TrainingInterrupted(
                f"interrupted at step {state.step}; a checkpoint is in {self.model_dir / LAST}. "
                f"Resume with: seq2seq train --model-dir {self.model_dir} --resume")
        state.stop_reason = reason
        return True

    def _budget_left(self) -> bool:
        """Whether this session's budget allows more training than the run has done: a run that
        finished for its epochs, steps or minutes goes on when resumed with a bigger budget,
        one that stopped early (no better validation BLEU) does not."""
        t, state = self.t, self.state
        if t.patience and state.bad_validations >= t.patience:
            return False
        return (state.epoch < t.epochs and not (t.max_steps and state.step >= t.max_steps)
                and not (t.max_minutes and state.elapsed_s >= t.max_minutes * 60))

    def _elapsed(self) -> float:
        return self.state.elapsed_s + time.monotonic() - self.session_start

    # -- validation and checkpoints ----------------------------------------------------------
    def _validate(self) -> None:
        """Validation loss and BLEU on rank 0; the decisions reach every rank."""
        state, t = self.state, self.t
        state.last_valid_step = state.step
        if self.valid_data is None:
            return
        if self.dist.is_main:
            entry = self._evaluate_validation()
            improved = entry["valid_bleu"] > state.best_bleu
            if improved:
                state.best_bleu, state.best_step = entry["valid_bleu"], state.step
                state.bad_validations, state.plateau_count = 0, 0
                save_checkpoint(self.model_dir / BEST, self.model,
                                {"step": state.step, "valid_bleu": entry["valid_bleu"]})
            else:
                state.bad_validations += 1
                state.plateau_count += 1
                if state.plateau_count >= t.plateau_patience and t.plateau_factor < 1.0:
                    state.lr_scale = max(state.lr_scale * t.plateau_factor, t.min_lr / t.lr)
                    state.plateau_count = 0
                if t.patience and state.bad_validations >= t.patience:
                    state.stop_reason = (f"early stopping: no better validation BLEU in "
                                         f"{t.patience} validations")
            self._log_metrics(entry)
            log(f"validation at step {state.step}: loss {entry['valid_loss']:.3f}, BLEU "
                f"{entry['valid_bleu']:.2f}, chrF {entry['valid_chrf']:.2f}"
                + (" (best)" if improved else f" (best {state.best_bleu:.2f})"))
        shared = self.dist.broadcast({k: getattr(state, k) for k in (
            "best_bleu", "best_step", "bad_validations", "plateau_count", "lr_scale", "stop_reason")})
        for key, value in shared.items():
            setattr(state, key, value)

    @torch.inference_mode()
    def _evaluate_validation(self) -> dict[str, Any]:
        self.model.eval()
        data = self.valid_data
        loss_sum, tokens = 0.0, 0
        for indices in make_batches([len(s) for s in data.src], [len(s) for s in data.tgt],
                                    self.t.batch_tokens, self.t.max_sentences, seed=0, epoch=0,
                                    shuffle=False):
            batch = collate(indices, data.src, data.tgt).to(self.device)
            with self._autocast():
                loss, _ = self.model(batch.src, batch.src_lengths, batch.tgt_in,
                                     tgt_out=batch.tgt_out, output_dtype=self._output_dtype)
            loss_sum += float(loss)
            tokens += batch.n_tokens
        # Validation sources over decode.max_input_len are cut, never refused: training goes on.
        config = dataclasses.replace(self.config, data=dataclasses.replace(self.config.data,
                                                                           long_pairs="truncate"))
        translator = Translator(self.model, self.src_tok, self.tgt_tok, config, self.device)
        # small batches: validation's (rows, vocabulary) buffers sit on top of training's peak
        hypotheses = translator.translate(self.valid_src, beam=self.t.valid_beam,
                                          batch_size=min(self.config.decode.batch_size,
                                                         VALID_BATCH_SIZE))
        self.model.train()
        scores = score_translations(hypotheses, self.valid_ref)
        valid_loss = loss_sum / max(tokens, 1)
        return {"valid_loss": round(valid_loss, 4), "valid_ppl": round(math.exp(min(valid_loss, 50)), 2),
                "valid_bleu": scores["bleu"], "valid_chrf": scores["chrf"]}

    def _save_last(self) -> None:
        self.state.elapsed_s = self._elapsed()
        self.session_start = time.monotonic()
        if self.dist.is_main:
            save_checkpoint(self.model_dir / LAST, self.model,
                            {"train_state": dataclasses.asdict(self.state)},
                            optimizer=self.optimizer, delay_s=self.t.checkpoint_delay_s)
        self.dist.barrier()  # the others wait patiently, not in a lock-step collective's timeout

    def _log_metrics(self, entry: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        state = self.state
        line = {"step": state.step, "epoch": state.epoch + 1, "elapsed_s": round(self._elapsed(), 2),
                "tokens": state.tokens, **entry}
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")  # one write: a kill leaves no torn line

    # -- signals -----------------------------------------------------------------------------
    @staticmethod
    def _can_handle_signals() -> bool:
        import threading

        return threading.current_thread() is threading.main_thread()

    def _on_sigint(self, signum: int, frame: Any) -> None:
        # A second Ctrl-C stops at once; within a second it is the first one, which torchrun
        # forwards to workers that the terminal has already signalled.
        if self.interrupted and time.monotonic() - self.interrupted_at > 1.0:
            raise KeyboardInterrupt
        if self.interrupted:
            return
        self.interrupted, self.interrupted_at = True, time.monotonic()
        if self.dist.is_main:
            log("\ninterrupt: finishing the current update and writing a checkpoint "
                "(Ctrl-C again to stop at once) ...")
