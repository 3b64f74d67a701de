"""Training a translation model: the loop, validation, checkpoints and exact resume.

A run lives in a model directory (its files: ``model_dir.py``). ``run_setup.py`` sets up a run
(the directory's lock, the config, tokenizers, data and model), ``schedule.py`` holds the
learning-rate schedule and early stopping, ``metrics_log.py`` the ``metrics.jsonl`` file.

Resuming reads ``last.safetensors`` and goes on from the same batch of the same epoch. Every
micro-batch seeds the random generator from (seed, its global index), so dropout masks do not
depend on where a run was interrupted, nor on how the batches are split across processes.
Ctrl-C (SIGINT) and SIGTERM finish the current update and write a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import signal
import sys
import threading
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from seq2seq import kernels
from seq2seq.config import Config, TrainConfig, decode_settings
from seq2seq.data.batches import Batch, collate, make_batches
from seq2seq.data.tokenizers import PAD_ID
from seq2seq.decoding.decode import decode_ids, encode_source
from seq2seq.decoding.scores import score_translations
from seq2seq.decoding.translator import Translator
from seq2seq.device import describe_precision
from seq2seq.kernels.ops import precision_autocast
from seq2seq.model_dir import BEST, LAST, METRICS_FILE, remove_stale_temporary_files
from seq2seq.models.builder import build_model
from seq2seq.models.checkpoint import load_model, load_training_state, save_checkpoint
from seq2seq.training import distributed
from seq2seq.training import setup as run_setup
from seq2seq.training.average import keep_checkpoint
from seq2seq.training.metrics_log import MetricsLog
from seq2seq.training.schedule import Schedule, ScheduleState, make_adam
from seq2seq.training.setup import TrainingError

__all__ = ["TrainState", "TrainingError", "TrainingInterrupted", "train", "train_translator"]
VALID_BATCH_SIZE = 250  # sentences per validation decoding batch, at most
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # SIGTERM: how Slurm and Kubernetes stop a job


class TrainingInterrupted(TrainingError):
    """Ctrl-C or SIGTERM: a last checkpoint was written and the run can be resumed."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's code for a process ended by that signal


@dataclass
class TrainState(ScheduleState):
    """Where a run is. Saved in every training checkpoint as JSON."""

    step: int = 0  # optimizer updates done
    epoch: int = 0  # the epoch in progress (0-based)
    position: int = 0  # updates done in this epoch
    tokens: int = 0  # target tokens trained on, all processes together
    elapsed_s: float = 0.0  # training time over all sessions of this run
    bad_steps: int = 0  # non-finite losses in a row
    last_valid_step: int = -1
    finished: bool = False
    world_size: int = 1
    accumulate: int = 1  # world_size * accumulate batches make one update


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train_translator(config: Config | str | Path, model_dir: str | Path,
                     data_dir: str | Path | None = None, resume: bool = False,
                     overrides: Sequence[str] = (), overwrite: bool = False,
                     init_from: str | Path | None = None, init_checkpoint: str = "best") -> Translator:
    """Train a model into ``model_dir`` (as ``seq2seq train`` does) and load its best checkpoint.

    ``config``: a Config, or a YAML file. The config's data paths are relative to ``data_dir``
    (default: the current directory). ``overrides``: ``section.key=value`` settings, as
    ``--set`` takes them. A trained model already in ``model_dir`` is an error unless
    ``resume`` (go on training it) or ``overwrite`` (replace it). ``init_from``: fine-tune
    the model in that folder (see ``train``).
    """
    if not isinstance(config, Config):
        if not resume:
            run_setup.refuse_own_config(Path(config), Path(model_dir))
        config = Config.load(config)
    config.override(list(overrides))
    train(config, Path(model_dir), data_dir=data_dir, resume=resume, overwrite=overwrite,
          init_from=init_from, init_checkpoint=init_checkpoint)
    return Translator.load(model_dir)


def train(config: Config, model_dir: str | Path, data_dir: str | Path | None = None,
          resume: bool = False, overwrite: bool = False, init_from: str | Path | None = None,
          init_checkpoint: str = "best") -> TrainState:
    """Train (or resume training) a translation model into ``model_dir``.

    ``overwrite`` replaces a trained model found there (without it, that is an error).
    ``init_from``: fine-tune the trained model in that folder: start from its weights
    (``init_checkpoint``: 'best', 'last' or 'averaged') and tokenizers, with a fresh optimizer,
    schedule and step count; ``config``'s model section and vocabulary settings must be that
    model's (``setup.init_from``). ``init.json`` records the start, and the run validates once
    before its first update (the start's own scores, step 0).
    """
    config = Config.from_dict(config.to_dict())  # a private, validated copy
    model_dir = Path(model_dir)
    start = None
    if init_from is not None:
        if resume:
            raise TrainingError("--init-from starts a new run from a trained model; --resume continues "
                                "a run: give one of them")
        start = run_setup.init_from(config, init_from, init_checkpoint)
        if model_dir.resolve() == start.model_dir:  # --overwrite would delete the weights it starts from
            raise TrainingError(f"--init-from {init_from} is the --model-dir of this run; fine-tune into "
                                f"another folder")
    dist = distributed.setup(config.train.backend, config.train.device)
    lock = None
    try:
        resume = dist.broadcast(resume)  # rank 0 decides, so that every rank takes the same path
        if dist.is_main:  # rank 0 alone writes into the directory: it alone locks it
            try:
                lock = run_setup.claim_model_dir(model_dir, resume, overwrite)
            except (TrainingError, OSError) as error:
                dist.broadcast(str(error))  # the other ranks stop too, with the same message
                raise
        problem = dist.broadcast("")
        if problem:
            raise TrainingError(problem)
        return _Run(config, model_dir, data_dir, resume, dist, start).run()
    except BaseException as error:
        lost = dist.on_failure(error)  # a message naming the lost rank, if a peer is gone
        if lost:
            last = model_dir / LAST
            then = (f"the last checkpoint is {last}: resume with --resume" if last.is_file()
                    else "no checkpoint was written yet")
            raise distributed.DistributedError(f"{lost}; {then}") from None
        raise
    finally:
        if lock is not None:
            lock.release()
        dist.close()


def restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, dist: distributed.Distributed,
            accumulate: int) -> TrainState:
    """Model, optimizer and random state from the checkpoint ``path``; the run's state, its
    position in the epoch converted when the processes x accumulation changed."""
    fields = typing.get_type_hints(TrainState)  # name -> type: the checkpoint's are checked
    meta = load_training_state(path, model, optimizer, state_fields=fields)
    known = set(fields)
    state = TrainState(**{k: v for k, v in meta["train_state"].items() if k in known})
    # The same batches per update (processes x accumulate) continue exactly, however split.
    saved_group, group = state.world_size * state.accumulate, dist.world_size * accumulate
    if saved_group != group:
        done = state.position * saved_group  # batches of this epoch already trained on
        state.position = -(-done // group)  # rounded up: no batch is seen twice
        if dist.is_main:
            log(f"warning: the run was started with {state.world_size} process(es) x "
                f"{state.accumulate} accumulation and resumes with {dist.world_size} x "
                f"{accumulate}: the effective batch and the data order change from here")
    state.world_size, state.accumulate = dist.world_size, accumulate
    if dist.is_main:
        log(f"resuming from step {state.step} (epoch {state.epoch + 1}, update {state.position} of "
            f"the epoch)")
    return state


@torch.inference_mode()
def validation_scores(model: nn.Module, data: run_setup.RunData, config: Config,
                      device: torch.device) -> dict[str, Any]:
    """Validation loss (teacher forced) and the BLEU and chrF of the translations."""
    t, valid = config.train, data.valid
    model.eval()
    loss_sum, tokens = 0.0, 0
    for indices in make_batches([len(s) for s in valid.src], [len(s) for s in valid.tgt], t.batch_tokens,
                                t.max_sentences, seed=0, epoch=0, shuffle=False):
        batch = collate(indices, valid.src, valid.tgt).to(device)
        with precision_autocast(t.precision, device.type, model):
            loss, _ = model(batch.src, batch.src_lengths, batch.tgt_in, tgt_out=batch.tgt_out)
        loss_sum += float(loss)
        tokens += batch.n_tokens
    # Validation sources over decode.max_input_len are cut, never refused: training goes on.
    limit = config.decode.max_input_len
    src_ids = [encode_source(s, data.src_tok, limit, "truncate") for s in data.valid_src]
    # small batches: validation's (rows, vocabulary) buffers sit on top of training's peak
    settings = decode_settings(config.decode, "train.valid_beam", beam=t.valid_beam, n_best=1,
                               batch_size=min(config.decode.batch_size, VALID_BATCH_SIZE))
    found = decode_ids(model, src_ids, settings, device, t.precision, source=config.data.valid_src)
    model.train()
    scores = score_translations([data.tgt_tok.decode(hyps[0].tokens) for hyps in found], data.valid_ref)
    valid_loss = loss_sum / max(tokens, 1)
    return {"valid_loss": round(valid_loss, 4), "valid_ppl": round(math.exp(min(valid_loss, 50)), 2),
            "valid_bleu": scores["bleu"], "valid_chrf": scores["chrf"]}


@contextlib.contextmanager
def handling(signals: tuple[int, ...], handler: Callable[[int, Any], None]) -> Iterator[None]:
    """``handler`` for ``signals`` inside, where Python allows it (the main thread)."""
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, handler) for s in signals} if main else {}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def phase(name: str) -> torch.profiler.record_function:
    """A labelled part of a training step (``seq2seq.batch``, ``.forward``, ``.backward``,
    ``.clip``, ``.optimizer``) for ``torch.profiler``; nearly free when no profiler runs
    (benchmarks/profile_step.py)."""
    return torch.profiler.record_function(f"seq2seq.{name}")


class _Run:
    """One training session of a run (a resume is a new session of the same run)."""

    def __init__(self, config: Config, model_dir: Path, data_dir: str | Path | None,
                 resume: bool, dist: distributed.Distributed,
                 start: run_setup.InitFrom | None = None) -> None:
        self.dist, self.model_dir, self.start = dist, model_dir, start
        cores = os.cpu_count() or 1
        torch.set_num_threads(config.train.threads or max(1, cores // dist.local_world_size))
        self.device = dist.device(config.train.device)
        requested_precision = config.train.precision
        self.config = run_setup.prepare_config(config, model_dir, data_dir, resume, dist.is_main,
                                               self.device)
        self.t = t = self.config.train
        if dist.is_main:
            remove_stale_temporary_files(model_dir)
            if start is not None:
                run_setup.record_init(model_dir, start)
        self.interrupted, self.interrupted_at, self.stop_signal = False, 0.0, signal.SIGINT
        session_start = time.monotonic()  # preparing the data counts towards train.max_minutes
        self.data = run_setup.load_data(self.config, model_dir, resume, dist, log, start)
        run_setup.check_model_size(self.config, self.data.src_tok, self.data.tgt_tok, self.device)

        torch.manual_seed(t.seed)
        self.model = build_model(self.config.model, len(self.data.src_tok), len(self.data.tgt_tok),
                                 PAD_ID).to(self.device)
        if start is not None:
            load_model(start.checkpoint, self.model)
            if dist.is_main:
                log(f"fine-tuning from {start.checkpoint} (sha256 {start.sha256[:16]}...)")
        paths = kernels.apply(self.model, self.t.kernels, self.device, self.t.precision)
        self.optimizer = make_adam(self.model.parameters(), t.lr)
        self.schedule = Schedule.from_config(t)
        self.state = TrainState(world_size=dist.world_size, accumulate=t.accumulate)
        if resume:
            self.state = restore(model_dir / LAST, self.model, self.optimizer, dist, t.accumulate)
        score = None if self.data.valid is None else functools.partial(
            validation_scores, self.model, self.data, self.config, self.device)
        self.files = _RunFiles(model_dir, self.model, self.optimizer, self.state, self.schedule, dist,
                               score, resume, session_start, t.checkpoint_delay_s,
                               (t.keep_checkpoints, dataclasses.asdict(self.config.model)))
        self.net: nn.Module = self.model
        if dist.enabled:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if dist.is_main:
            group = dist.world_size * t.accumulate
            log(f"model: {self.model.num_parameters():,} parameters; {len(self.data.train.src):,} "
                f"training pairs; device {self.device} ({paths.describe()}); precision "
                f"{describe_precision(requested_precision, t.precision, resume)}; "
                f"{dist.world_size} process(es) x {t.accumulate} "
                f"accumulation = effective batch of {group} x {t.batch_tokens} target tokens")

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> TrainState:
        state, t = self.state, self.t
        if state.finished:
            if not _budget_left(t, self.schedule, state):
                if self.dist.is_main:
                    log(f"this run already finished ({state.stop_reason}); nothing to do")
                return state
            if self.dist.is_main:
                log(f"the run had stopped ({state.stop_reason}); the new budget allows more: "
                    f"continuing")
            state.finished, state.stop_reason = False, ""
        with handling(STOP_SIGNALS, self._on_signal):
            if self.start is not None and state.step == 0 and state.last_valid_step < 0:
                self.files.validate()  # the start's own scores: a fine-tuning run's baseline
            while state.epoch < t.epochs and not state.stop_reason:
                self._run_epoch()
                if not state.stop_reason:
                    state.epoch, state.position = state.epoch + 1, 0
                    if t.valid_every == 0:
                        if state.last_valid_step != state.step:  # a step budget may have stopped here
                            self.files.validate()
                        self.files.save_last()
            if not state.stop_reason:
                state.stop_reason = f"{t.epochs} epochs done"
            if state.last_valid_step != state.step:
                self.files.validate()
            state.finished = True
            self.files.save_last()
            if self.data.valid is None:
                self.files.save_best({"step": state.step})
            if self.dist.is_main:
                best = (f"best validation BLEU {state.best_bleu:.2f} at step {state.best_step}"
                        if self.data.valid is not None else "no validation data: best is last")
                log(f"training finished: {state.stop_reason}; {best}; model in {self.model_dir}")
            return state

    def _run_epoch(self) -> None:
        state, t = self.state, self.t
        batches = make_batches(self.data.train.src.lengths, self.data.train.tgt.lengths, t.batch_tokens,
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
                index = state.step * group + self.dist.rank * t.accumulate  # of the run's batches
                loss_sum, tokens = self._update(batches[first:first + t.accumulate], first_index=index)
                state.position += 1
                state.step += 1
                loss_sum, tokens = self.dist.sum([loss_sum, tokens], self.device)
                state.tokens += int(tokens)
                window_loss += loss_sum
                window_tokens += int(tokens)
                if state.step % t.log_every == 0 or state.position == updates:
                    mean_loss = window_loss / max(window_tokens, 1)
                    seconds = time.monotonic() - window_start
                    self.files.log({"train_loss": round(mean_loss, 4),
                                       "lr": self.optimizer.param_groups[0]["lr"]})
                    bar.set_postfix(loss=f"{mean_loss:.3f}", ppl=f"{math.exp(min(mean_loss, 50)):.1f}",
                                    tok_s=f"{window_tokens / max(seconds, 1e-9):,.0f}", refresh=False)
                    window_loss, window_tokens, window_start = 0.0, 0, time.monotonic()
                bar.update(1)
                if t.valid_every and state.step % t.valid_every == 0:
                    self.files.validate()
                    self.files.save_last()
                if self._should_stop():
                    return
        finally:
            bar.close()

    def _update(self, batches: list[list[int]], first_index: int) -> tuple[float, int]:
        """One optimizer update over this process's micro-batches; (loss sum, tokens)."""
        state, t = self.state, self.t
        self.net.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule.learning_rate(state.step, state)
        loss_total, tokens_total, finite = 0.0, 0, True
        for i, indices in enumerate(batches):
            torch.manual_seed(t.seed * 1_000_003 + first_index + i)  # dropout masks per micro-batch
            with phase("batch"):
                batch = collate(indices, self.data.train.src, self.data.train.tgt).to(self.device)
            sync = i == len(batches) - 1 or not self.dist.enabled
            context = contextlib.nullcontext() if sync else self.net.no_sync()
            with context:
                with self._autocast(), phase("forward"):
                    loss = self._loss(batch)
                with phase("backward"):
                    (loss / (batch.n_tokens * len(batches))).backward()
            value = float(loss.detach())
            finite = finite and math.isfinite(value)
            loss_total += value
            tokens_total += batch.n_tokens
        with phase("clip"):
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_grad or float("inf"))
            finite = finite and bool(torch.isfinite(norm))
        if self.dist.any(not finite, self.device):
            self.optimizer.zero_grad(set_to_none=True)
            state.bad_steps += 1
            self.files.log({"event": "non-finite loss, update skipped", "bad_steps": state.bad_steps})
            if state.bad_steps >= t.max_bad_steps:
                raise TrainingError(
                    f"stopped: {state.bad_steps} updates in a row had a non-finite loss or "
                    f"gradient (step {state.step}); the last good checkpoint is "
                    f"{self.model_dir / LAST}. Lower train.lr or check the data.")
            return 0.0, 0
        state.bad_steps = 0
        with phase("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss_total, tokens_total

    def _loss(self, batch: Batch) -> torch.Tensor:
        """Summed (label-smoothed) cross-entropy over the real target tokens."""
        loss, _ = self.net(batch.src, batch.src_lengths, batch.tgt_in,
                           sampling_ratio=self.t.sampling_ratio, tgt_out=batch.tgt_out,
                           label_smoothing=self.t.label_smoothing)
        return loss

    def _autocast(self):
        """Autocast for ``train.precision`` (see ``ops.precision_autocast``)."""
        return precision_autocast(self.t.precision, self.device.type, self.model)

    def _should_stop(self) -> bool:
        t, state = self.t, self.state
        if state.stop_reason:  # early stopping, decided by validation on every rank
            return True
        # Ranks may disagree (a signal reaches one, clocks differ): all take the most urgent reason.
        reasons = ("", f"time budget of {t.max_minutes:g} minute(s) used", f"{t.max_steps} steps done",
                   "interrupted")
        code = (3 if self.interrupted else 2 if t.max_steps and state.step >= t.max_steps
                else 1 if t.max_minutes and self.files.elapsed() >= t.max_minutes * 60 else 0)
        reason = reasons[self.dist.maximum(code, self.device)]
        if not reason:
            return False
        if reason == "interrupted":
            self.files.save_last()
            name = "" if self.stop_signal == signal.SIGINT else f" by {signal.Signals(self.stop_signal).name}"
            raise TrainingInterrupted(
                f"interrupted{name} at step {state.step}; a checkpoint is in {self.model_dir / LAST}. "
                f"Resume with: seq2seq train --model-dir {self.model_dir} --resume", self.stop_signal)
        state.stop_reason = reason
        return True

    def _on_signal(self, signum: int, frame: Any) -> None:
        # A second signal stops at once; within a second it is the first one, which torchrun
        # forwards to workers that the terminal has already signalled.
        if self.interrupted and time.monotonic() - self.interrupted_at > 1.0:
            raise KeyboardInterrupt
        if self.interrupted:
            return
        self.interrupted, self.interrupted_at, self.stop_signal = True, time.monotonic(), signum
        if self.dist.is_main:
            what = "interrupt" if signum == signal.SIGINT else signal.Signals(signum).name
            log(f"\n{what}: finishing the current update and writing a checkpoint "
                "(Ctrl-C again to stop at once) ...")


def _budget_left(t: TrainConfig, schedule: Schedule, state: TrainState) -> bool:
    """Whether this session's budget allows more training than the run has done: a run that
    finished for its epochs, steps or minutes goes on when resumed with a bigger budget,
    one that stopped early (no better validation BLEU) does not."""
    if schedule.patience_spent(state):
        return False
    return (state.epoch < t.epochs and not (t.max_steps and state.step >= t.max_steps)
            and not (t.max_minutes and state.elapsed_s >= t.max_minutes * 60))


class _RunFiles:
    """What a session writes into the model directory, from rank 0: the last checkpoint (with
    the run's state and training time), the best one, chosen by validation, and metrics.jsonl.

    ``score`` gives the validation entry (``validation_scores``); None without validation data.
    """

    def __init__(self, model_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 state: TrainState, schedule: Schedule, dist: distributed.Distributed,
                 score: Callable[[], dict[str, Any]] | None, resume: bool, session_start: float,
                 delay_s: float, keep: tuple[int, dict[str, Any]] = (0, {})) -> None:
        """``keep``: how many of the last checkpoints' weights to keep (``train.keep_checkpoints``),
        and the model settings recorded with them."""
        self.model_dir, self.model, self.optimizer, self.state = model_dir, model, optimizer, state
        self.keep = keep
        self.schedule, self.dist, self.score, self.delay_s = schedule, dist, score, delay_s
        self.session_start = session_start
        self.metrics = MetricsLog(model_dir / METRICS_FILE, enabled=dist.is_main)
        if resume:
            self.metrics.truncate(state.step)
        else:
            self.metrics.clear()

    def elapsed(self) -> float:
        """Training time over all sessions of the run, this one included."""
        return self.state.elapsed_s + time.monotonic() - self.session_start

    def validate(self) -> None:
        """Validation loss and BLEU on rank 0; the decisions reach every rank."""
        state = self.state
        state.last_valid_step = state.step
        if self.score is None:
            return
        if self.dist.is_main:
            entry = self.score()
            improved = self.schedule.record(state, entry["valid_bleu"], state.step)
            if improved:
                self.save_best({"step": state.step, "valid_bleu": entry["valid_bleu"]})
            self.log(entry)
            log(f"validation at step {state.step}: loss {entry['valid_loss']:.3f}, BLEU "
                f"{entry['valid_bleu']:.2f}, chrF {entry['valid_chrf']:.2f}"
                + (" (best)" if improved else f" (best {state.best_bleu:.2f})"))
        shared = self.dist.broadcast({f.name: getattr(state, f.name)
                                      for f in dataclasses.fields(ScheduleState)})
        for key, value in shared.items():
            setattr(state, key, value)

    def save_best(self, meta: dict[str, Any]) -> None:
        if self.dist.is_main:
            save_checkpoint(self.model_dir / BEST, self.model, meta)

    def save_last(self) -> None:
        self.state.elapsed_s = self.elapsed()
        self.session_start = time.monotonic()
        if self.dist.is_main:
            save_checkpoint(self.model_dir / LAST, self.model,
                            {"train_state": dataclasses.asdict(self.state)},
                            optimizer=self.optimizer, delay_s=self.delay_s)
            if self.keep[0]:
                keep_checkpoint(self.model_dir, self.model, self.state.step, self.keep[0],
                                {"model": self.keep[1]})
        self.dist.barrier()  # the others wait patiently, not in a lock-step collective's timeout

    def log(self, entry: dict[str, Any]) -> None:
        """One line of metrics.jsonl: the step, epoch, training time and tokens, and ``entry``."""
        state = self.state
        self.metrics.append({"step": state.step, "epoch": state.epoch + 1,
                             "elapsed_s": round(self.elapsed(), 2), "tokens": state.tokens, **entry})
